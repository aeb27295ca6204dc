#!/usr/bin/env bash
# Builds Kokkos 3.4.01 (Serial + Cuda, Hopper sm_90) and Kokkos Kernels 3.4.01 (cuBLAS TPL, ETI off: header-only use)
# from Debian bookworm's trilinos source, patched for CUDA 13 (cmake/deps/kokkos-3.4.01-cuda13.patch), into a cached
# prefix. Needs nvcc (CUDA >= 12) but no GPU: the build runs on the CPU machine and the result runs on the H100.
#
#   cmake/deps/build_kokkos_cuda.sh [PREFIX_ROOT]   PREFIX_ROOT defaults to ${KMOE_DEPS_PREFIX:-$HOME/.cache/kmoe-deps}
#
# Prints the install prefix on its last line. Consumers compile with "$prefix/bin/nvcc_wrapper" as the C++ compiler
# (the patched copy defaults to sm_90). Skipped when the prefix already holds a stamp for the same recipe (this
# script + the patch).
#
# Why each piece (DEPENDENCIES.md has the measurements):
#  - Kokkos 3.4 has no Hopper option, and a build for AMPERE80 aborts at Kokkos::initialize on the H100: the patch
#    adds KOKKOS_ARCH_HOPPER90 (CHECK_CUDA_ARCH sm_90) beside AMPERE86.
#  - CUDA 13 changed cudaMemPrefetchAsync/cudaMemAdvise (cudaMemLocation), cudaGraphAddDependencies (edge data),
#    cudaGraphInstantiate (3 arguments since 12) and removed __half2double: each hunk is guarded by CUDART_VERSION.
#  - nvcc_wrapper defaults to sm_35, which CUDA 13 rejects: the patch makes it sm_90.
#  - Kokkos Kernels: cuSPARSE TPL off (3.4 calls cuSPARSE functions CUDA 13 removed); no host BLAS TPL, so the GPU
#    build needs no OpenBLAS on the device machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${1:-${KMOE_DEPS_PREFIX:-$HOME/.cache/kmoe-deps}}
version=3.4.01
patch_file="$here/kokkos-$version-cuda13.patch"
recipe=$(cat "$0" "$patch_file" | sha256sum | cut -c1-12)
prefix="$root/kokkos-$version-cuda-sm90-$recipe"
jobs=${KMOE_DEPS_JOBS:-2}
if [ -f "$prefix/.kmoe-stamp" ] && [ "$(cat "$prefix/.kmoe-stamp")" = "$version $recipe" ]; then
  echo "build_kokkos_cuda: cached: $prefix" >&2
  echo "$prefix"
  exit 0
fi
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
command -v nvcc >/dev/null || { echo "build_kokkos_cuda: nvcc not found (looked on PATH and /usr/local/cuda/bin)" >&2; exit 1; }
src="$root/src"
bash "$here/fetch_trilinos_source.sh" "$src" >&2
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# Patch a private copy: the shared source tree also feeds the CPU build.
cp -a "$src/kokkos" "$build/kokkos-src"
(cd "$build/kokkos-src" && patch -p1 --forward --quiet < "$patch_file") >&2
rm -rf "$prefix"
wrapper="$build/kokkos-src/bin/nvcc_wrapper"
echo "build_kokkos_cuda: building Kokkos $version (Serial+Cuda, HOPPER90) into $prefix" >&2
cmake -S "$build/kokkos-src" -B "$build/kokkos" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCMAKE_CXX_COMPILER="$wrapper" -DCMAKE_CXX_STANDARD=17 -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
  -DKokkos_ENABLE_SERIAL=ON -DKokkos_ENABLE_CUDA=ON -DKokkos_ENABLE_CUDA_LAMBDA=ON \
  -DKokkos_ARCH_HOPPER90=ON -DKokkos_ENABLE_TESTS=OFF >&2
cmake --build "$build/kokkos" -j "$jobs" >&2
cmake --install "$build/kokkos" >&2
echo "build_kokkos_cuda: building Kokkos Kernels $version (cuBLAS TPL, ETI off)" >&2
cmake -S "$src/kokkos-kernels" -B "$build/kk" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCMAKE_CXX_COMPILER="$prefix/bin/nvcc_wrapper" -DCMAKE_CXX_STANDARD=17 -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
  -DKokkos_ROOT="$prefix" \
  -DKokkosKernels_ENABLE_TPL_CUBLAS=ON -DKokkosKernels_ENABLE_TPL_CUSPARSE=OFF -DKokkosKernels_ENABLE_TPL_BLAS=OFF \
  -DKokkosKernels_ADD_DEFAULT_ETI=OFF \
  -DKokkosKernels_INST_FLOAT=OFF -DKokkosKernels_INST_DOUBLE=OFF -DKokkosKernels_INST_LAYOUTLEFT=OFF \
  -DKokkosKernels_INST_LAYOUTRIGHT=OFF -DKokkosKernels_INST_ORDINAL_INT=OFF -DKokkosKernels_INST_OFFSET_SIZE_T=OFF \
  -DKokkosKernels_INST_OFFSET_INT=OFF -DKokkosKernels_INST_EXECSPACE_SERIAL=OFF -DKokkosKernels_INST_EXECSPACE_CUDA=OFF \
  -DKokkosKernels_INST_MEMSPACE_CUDAUVMSPACE=OFF -DKokkosKernels_INST_MEMSPACE_CUDASPACE=OFF \
  -DKokkosKernels_ENABLE_TESTS=OFF -DKokkosKernels_ENABLE_EXAMPLES=OFF >&2
cmake --build "$build/kk" -j "$jobs" >&2
cmake --install "$build/kk" >&2
echo "$version $recipe" > "$prefix/.kmoe-stamp"
echo "$prefix"
