#!/usr/bin/env bash
# CPU-machine half of the GPU recipe: builds kmoe for sm_90 here (nvcc present, no GPU needed) and packs what the
# device machine needs into .carry/ (git-ignored; the device tool carries it with `carry: [".carry"]`):
#   .carry/kmoe-gpu-build.tgz   build tree outputs: bin/ (kmoe, tests, benchmarks) + ctest files
#   .carry/shared/testdata      the transformers oracle (../shared does not travel)
#   .carry/BUILD_INFO           commit, date, toolchain
# Then, on the device:  bash perf/device/run.sh   (docs/gpu.md).
#
#   perf/device/pack.sh [SRC] [BUILD]   SRC defaults to this checkout, BUILD to SRC's build-gpu
# Binaries built here run there: both x86-64, same CUDA major (13), glibc here (2.36) older than there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
src=${1:-$repo}
build=${2:-$repo/build-gpu}
export PATH=/usr/local/cuda/bin:$PATH
kokkos=$(bash "$repo/cmake/deps/build_kokkos_cuda.sh" | tail -n 1)
# CUTLASS 4.2 headers (the Hopper grouped GEMM engine, KMOE_ENABLE_CUTLASS): fetched once into the deps cache.
cutlass=$(bash "$repo/cmake/deps/fetch_cutlass.sh" | tail -n 1)
if [ ! -f "$build/CMakeCache.txt" ]; then
  # MPI and HDF5 off: the device image's Open MPI / serial HDF5 differ from Debian's, and the GPU tests need neither.
  cmake -S "$src" -B "$build" -DCMAKE_PREFIX_PATH="$kokkos" -DCMAKE_CXX_COMPILER="$kokkos/bin/nvcc_wrapper" \
    -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc -DKMOE_ENABLE_CUDA=ON -DKMOE_ENABLE_MPI=OFF \
    -DKMOE_ENABLE_HDF5=OFF -DKMOE_ENABLE_EXAMPLES=OFF -DCMAKE_FIND_PACKAGE_TARGETS_GLOBAL=ON \
    -DKMOE_CUTLASS_DIR="$cutlass"
fi
cmake --build "$build" -j "${KMOE_JOBS:-2}" ${KMOE_TARGETS:+--target $KMOE_TARGETS}
# Libraries of this machine that the device image lacks (Debian's Google Benchmark): next to the binaries.
mkdir -p "$build/carry-lib"
cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian "$build/carry-lib/"
mkdir -p "$repo/.carry/shared"
rm -rf "$repo/.carry/shared/testdata"
cp -a "$src/../shared/testdata" "$repo/.carry/shared/testdata"
(cd "$(dirname "$build")" && tar czf "$repo/.carry/kmoe-gpu-build.tgz" \
  "$(basename "$build")/bin" "$(basename "$build")/test-scratch" "$(basename "$build")/carry-lib" \
  $(cd "$(dirname "$build")" && find "$(basename "$build")" -name CTestTestfile.cmake))
{
  echo "commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src/cuda src/include/kmoe/core/cuda tests/src/cuda perf/device || echo '+local changes')"
  echo "built: $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname)"
  echo "src: $src  build: $build"
  echo "nvcc: $(nvcc --version | tail -n 2 | head -n 1)"
  echo "kokkos: $kokkos"
  echo "cutlass: $cutlass"
} > "$repo/.carry/BUILD_INFO"
du -sh "$repo/.carry"/* >&2
