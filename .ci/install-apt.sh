#!/usr/bin/env bash
# Installs the Debian packages kmoe builds on (DEPENDENCIES.md): MPI, parallel HDF5, OpenBLAS, GoogleTest,
# Google Benchmark, clang's fuzzer runtime, nlohmann-json (io/ parses JSON with it).
# Skips apt entirely when everything is already there.
set -euo pipefail
pkgs=(libopenmpi-dev openmpi-bin libhdf5-openmpi-dev libhdf5-dev libopenblas-dev libgtest-dev libgmock-dev
      libbenchmark-dev clang libclang-rt-14-dev dpkg-dev nlohmann-json3-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-apt: all packages present"
  exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
echo "install-apt: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
