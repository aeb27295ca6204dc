#!/usr/bin/env bash
# Builds Kokkos 3.4.01 (Serial + OpenMP) and Kokkos Kernels 3.4.01 (BLAS TPL = OpenBLAS) from Debian bookworm's
# trilinos source into a cached prefix (DEPENDENCIES.md explains why this is the Kokkos we use).
#
#   cmake/deps/build_kokkos.sh [PREFIX]      PREFIX defaults to ${KMOE_DEPS_PREFIX:-$HOME/.cache/kmoe-deps}
#
# Prints the install prefix on its last line. Skips the build when PREFIX already holds a stamp for the same
# version and the same build recipe (this script's hash), so CI pays the ~11 minutes only once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${1:-${KMOE_DEPS_PREFIX:-$HOME/.cache/kmoe-deps}}
version=3.4.01
recipe=$(cat "$0" | sha256sum | cut -c1-12)
prefix="$root/kokkos-$version-openmp-$recipe"
jobs=${KMOE_DEPS_JOBS:-2}
if [ -f "$prefix/.kmoe-stamp" ] && [ "$(cat "$prefix/.kmoe-stamp")" = "$version $recipe" ]; then
  echo "build_kokkos: cached: $prefix" >&2
  echo "$prefix"
  exit 0
fi
src="$root/src"
bash "$here/fetch_trilinos_source.sh" "$src" >&2
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
rm -rf "$prefix"
echo "build_kokkos: building Kokkos $version (Serial+OpenMP) into $prefix" >&2
cmake -S "$src/kokkos" -B "$build/kokkos" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCMAKE_CXX_STANDARD=17 -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
  -DKokkos_ENABLE_SERIAL=ON -DKokkos_ENABLE_OPENMP=ON -DKokkos_ENABLE_TESTS=OFF >&2
cmake --build "$build/kokkos" -j "$jobs" >&2
cmake --install "$build/kokkos" >&2
echo "build_kokkos: building Kokkos Kernels $version (BLAS TPL, float/double ETI)" >&2
# ETI cut to what kmoe uses (float/double, LayoutLeft, int ordinal, size_t offset): 10 min instead of an hour.
cmake -S "$src/kokkos-kernels" -B "$build/kk" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
  -DCMAKE_CXX_STANDARD=17 -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DKokkos_ROOT="$prefix" \
  -DKokkosKernels_ENABLE_TPL_BLAS=ON -DKokkosKernels_ADD_DEFAULT_ETI=OFF \
  -DKokkosKernels_INST_FLOAT=ON -DKokkosKernels_INST_DOUBLE=ON -DKokkosKernels_INST_LAYOUTLEFT=ON \
  -DKokkosKernels_INST_LAYOUTRIGHT=OFF -DKokkosKernels_INST_ORDINAL_INT=ON -DKokkosKernels_INST_OFFSET_SIZE_T=ON \
  -DKokkosKernels_INST_EXECSPACE_SERIAL=ON -DKokkosKernels_INST_EXECSPACE_OPENMP=ON \
  -DKokkosKernels_ENABLE_TESTS=OFF -DKokkosKernels_ENABLE_EXAMPLES=OFF >&2
cmake --build "$build/kk" -j "$jobs" >&2
cmake --install "$build/kk" >&2
echo "$version $recipe" > "$prefix/.kmoe-stamp"
echo "$prefix"
