#!/usr/bin/env bash
# Fetches Debian bookworm's trilinos 13.2.0 source (the only Kokkos 3.4.01 the registry serves, DEPENDENCIES.md)
# and unpacks packages/kokkos and packages/kokkos-kernels into $1. Idempotent.
set -euo pipefail
dest=${1:?usage: fetch_trilinos_source.sh DEST}
if [ -f "$dest/kokkos/CMakeLists.txt" ] && [ -f "$dest/kokkos-kernels/CMakeLists.txt" ]; then
  exit 0
fi
mkdir -p "$dest"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
list=/etc/apt/sources.list.d/kmoe-bookworm-src.sources
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/ ; then
  printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    | $SUDO tee "$list" >/dev/null
  $SUDO apt-get update -qq
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get source --download-only -qq trilinos/bookworm >/dev/null)
orig=$(ls "$work"/trilinos_*.orig.tar.* | head -n 1)
[ -f "$orig" ] || { echo "fetch_trilinos_source: no trilinos orig tarball downloaded" >&2; exit 1; }
top=$( (tar -tf "$orig" || true) | head -n 1 | cut -d/ -f1)
tar -xf "$orig" -C "$work" "$top/packages/kokkos" "$top/packages/kokkos-kernels"
rm -rf "$dest/kokkos" "$dest/kokkos-kernels"
mv "$work/$top/packages/kokkos" "$dest/kokkos"
mv "$work/$top/packages/kokkos-kernels" "$dest/kokkos-kernels"
echo "fetch_trilinos_source: kokkos + kokkos-kernels unpacked under $dest"
