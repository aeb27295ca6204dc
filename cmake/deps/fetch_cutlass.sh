#!/usr/bin/env bash
# Fetches CUTLASS 4.2.0.0's C++ headers (header-only) into a cached prefix, for the CUDA build's Hopper grouped GEMM
# engine (src/cuda/cutlass_grouped.cu). CUTLASS ships no C++ tarball on a registry we can reach, but PyPI's
# `nvidia-cutlass` wheel carries the full headers (cutlass_library/source/include and tools/util/include).
# Not Debian's libcutlass-dev 3.4.1: with nvcc 13 its Hopper ptr-array grouped GEMM returns wrong results silently
# (DEPENDENCIES.md).
#
#   cmake/deps/fetch_cutlass.sh [PREFIX_ROOT]   PREFIX_ROOT defaults to ${KMOE_DEPS_PREFIX:-$HOME/.cache/kmoe-deps}
#
# Prints the include directory (PREFIX/include, holding cutlass/ and cute/) on its last line; pass it to CMake as
# -DKMOE_CUTLASS_DIR=... (or leave it in the cache: CMake looks there by itself). Skipped when the prefix holds a stamp.
set -euo pipefail
root=${1:-${KMOE_DEPS_PREFIX:-$HOME/.cache/kmoe-deps}}
version=4.2.0.0
prefix="$root/cutlass-$version"
if [ -f "$prefix/.kmoe-stamp" ] && [ "$(cat "$prefix/.kmoe-stamp")" = "$version" ]; then
  echo "fetch_cutlass: cached: $prefix" >&2
  echo "$prefix/include"
  exit 0
fi
command -v unzip >/dev/null || { echo "fetch_cutlass: unzip not found" >&2; exit 1; }
py=$(command -v python3 || true)
[ -n "$py" ] && "$py" -m pip --version >/dev/null 2>&1 || { echo "fetch_cutlass: python3 -m pip not found" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch_cutlass: downloading nvidia-cutlass==$version (PyPI wheel, headers only)" >&2
"$py" -m pip download --quiet --no-deps --only-binary=:all: "nvidia-cutlass==$version" -d "$tmp" >&2
wheel=$(ls "$tmp"/nvidia_cutlass-"$version"-*.whl)
unzip -qo "$wheel" 'cutlass_library/source/include/*' 'cutlass_library/source/tools/util/include/*' \
  '*.dist-info/licenses/LICENSE.txt' -d "$tmp/x"
src="$tmp/x/cutlass_library/source"
[ -f "$src/include/cutlass/version.h" ] || { echo "fetch_cutlass: $wheel holds no include/cutlass/version.h" >&2; exit 1; }
rm -rf "$prefix"
mkdir -p "$prefix/include"
# One include dir: the library's headers and the tools/util helpers (both under cutlass/) merge without collisions.
cp -a "$src/include/." "$prefix/include/"
cp -a "$src/tools/util/include/." "$prefix/include/"
cp "$tmp"/x/*.dist-info/licenses/LICENSE.txt "$prefix/"
echo "$version" > "$prefix/.kmoe-stamp"
echo "fetch_cutlass: installed $(du -sh "$prefix" | cut -f1) into $prefix" >&2
echo "$prefix/include"
