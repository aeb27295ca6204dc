#!/usr/bin/env bash
# CPU-machine half of the MPI + NCCL GPU build (the NCCL one-rank tests, bench_alltoall --backend nccl,
# kmoe finetune --backend cuda, the multi-GPU runs). Like pack.sh, but MPI, NCCL and HDF5 on, and the
# Open MPI runtime carried along (the device image has CUDA's libnccl but no MPI we can rely on):
#   .carry/kmoe-gpu-mpi-build.tgz   BUILD/bin + ctest files + carry-lib (the shared libraries the binaries and
#                                   Open MPI's components need, minus glibc/libstdc++/CUDA, which the device has)
#   .carry/ompi-tree.tgz            Debian's Open MPI 4.1.4 tree (components, help files, orterun/orted) and PMIx'
#                                   components, at their absolute paths; perf/device/mpi_env.sh installs it there
#                                   when the device lacks them
#
#   perf/device/pack_mpi.sh [SRC] [BUILD]   SRC defaults to this checkout, BUILD to SRC's build-gpu-mpi
#   KMOE_TARGETS (default: kmoe_cli test_comm_nccl_np1 test_comm_mpi_device_np2 bench_alltoall, + bench_ep_moe when
#                perf/ has it)
# On the device: `source perf/device/mpi_env.sh`, then `mpirun -np N ...` (docs/gpu.md).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
src=${1:-$repo}
build=${2:-$repo/build-gpu-mpi}
export PATH=/usr/local/cuda/bin:$PATH
kokkos=$(bash "$repo/cmake/deps/build_kokkos_cuda.sh" | tail -n 1)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$src" -B "$build" -DCMAKE_PREFIX_PATH="$kokkos" -DCMAKE_CXX_COMPILER="$kokkos/bin/nvcc_wrapper" \
    -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc -DKMOE_ENABLE_CUDA=ON -DKMOE_ENABLE_MPI=ON -DKMOE_ENABLE_NCCL=ON \
    -DKMOE_ENABLE_HDF5=ON -DKMOE_ENABLE_EXAMPLES=OFF -DCMAKE_FIND_PACKAGE_TARGETS_GLOBAL=ON
fi
targets=${KMOE_TARGETS:-kmoe_cli test_comm_nccl_np1 test_comm_mpi_device_np2 bench_alltoall}
if [ -z "${KMOE_TARGETS:-}" ] && [ -f "$src/perf/bench_ep_moe.cpp" ]; then targets="$targets bench_ep_moe"; fi
cmake --build "$build" -j "${KMOE_JOBS:-2}" --target $targets
# Shared libraries: what the binaries, orterun/orted and every Open MPI / PMIx component load, except the ones the
# device image has in newer versions (glibc, libstdc++, libgcc) or its own (CUDA, NCCL).
lib=$build/carry-lib
mkdir -p "$lib"
cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian "$lib/" 2>/dev/null || true
objs=$(find "$build/bin" -type f -perm -u+x; echo /usr/bin/orterun /usr/bin/orted;
       ls /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3/*.so /usr/lib/x86_64-linux-gnu/pmix2/lib/pmix/*.so)
for f in $objs; do ldd "$f" 2>/dev/null | awk '/=> \// {print $3}'; done | sort -u |
  grep -v -E '/(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so|/libcu|/libnccl|/libnv' |
  while read -r l; do cp -L "$l" "$lib/"; done
mkdir -p "$repo/.carry/shared"
rm -rf "$repo/.carry/shared/testdata"
cp -a "$src/../shared/testdata" "$repo/.carry/shared/testdata"
(cd "$(dirname "$build")" && tar czf "$repo/.carry/kmoe-gpu-mpi-build.tgz" \
  "$(basename "$build")/bin" "$(basename "$build")/carry-lib" \
  $(find "$(basename "$build")" -name CTestTestfile.cmake) \
  $(find "$(basename "$build")" -maxdepth 1 -name test-scratch))
tar czf "$repo/.carry/ompi-tree.tgz" -C / usr/lib/x86_64-linux-gnu/openmpi usr/lib/x86_64-linux-gnu/pmix2/lib/pmix \
  usr/lib/x86_64-linux-gnu/pmix2/share usr/share/openmpi etc/openmpi usr/bin/orterun usr/bin/orted
{
  echo "mpi build commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- src comm perf || echo '+local changes')"
  echo "mpi build: $(date -u +%Y-%m-%dT%H:%MZ) src $src build $build targets: $targets"
  echo "mpi: $(ompi_info 2>/dev/null | awk '/Open MPI:/ {print "Open MPI " $3; exit}')"
} > "$repo/.carry/BUILD_INFO_MPI"
du -sh "$repo/.carry"/* >&2
