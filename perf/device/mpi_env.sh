# Source on the device machine (bash): unpacks the MPI + NCCL build made by perf/device/pack_mpi.sh and sets up its
# runtime: Debian's Open MPI tree at its absolute paths (only where the image has none), the carried libraries, the
# image's own libnccl (CUDA's, or the one PyTorch ships), NVLink multicast off (KINDS.md: never turn it on).
#
#   source perf/device/mpi_env.sh && mpirun -np 2 build-gpu-mpi/bin/...
# Defines MPIRUN (mpirun with the options a root container needs) and KMOE_MPI_BUILD (= build-gpu-mpi).
_kmoe_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -x "$_kmoe_repo/build-gpu-mpi/bin/kmoe" ]; then tar xzf "$_kmoe_repo/.carry/kmoe-gpu-mpi-build.tgz" -C "$_kmoe_repo"; fi
# An image with its own Open MPI (libmpi.so.40 known to the loader) keeps it whole: its mpirun, components and PMIx
# belong together, and mixing in Debian's libraries breaks them (seen: orterun's PMIx component missing a symbol).
# Without one, Debian's tree goes to its absolute paths and every carried library is used.
_kmoe_carry=$_kmoe_repo/build-gpu-mpi/carry-lib
_kmoe_libs=$_kmoe_repo/build-gpu-mpi/carry-lib-used
rm -rf "$_kmoe_libs"; mkdir -p "$_kmoe_libs"
if ldconfig -p | grep -q 'libmpi\.so\.40 '; then
  _kmoe_own_mpi=1
  echo "mpi_env: the image's own MPI: $(ldconfig -p | grep 'libmpi\.so\.40 ' | head -n 1 | sed 's/.*=> //'), mpirun $(readlink -f "$(command -v mpirun)" 2>/dev/null)"
else
  _kmoe_own_mpi=0
  if [ ! -e /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3 ] && [ ! -e /usr/bin/orted ]; then
    tar xzf "$_kmoe_repo/.carry/ompi-tree.tgz" -C / && echo "mpi_env: installed Debian's Open MPI 4.1.4 tree under /usr"
  fi
fi
_kmoe_mpi_family='^lib(mpi|open-rte|open-pal|pmix|hwloc|event|mca_common|oshmem|uc[mpst]|fabric|psm|infinipath|ibverbs|rdmacm|efa|nl-)'
for _f in "$_kmoe_carry"/*; do
  _n=$(basename "$_f")
  if [ $_kmoe_own_mpi = 1 ]; then
    # the image's MPI family stays whole; other libraries only where the image lacks them
    echo "$_n" | grep -q -E "$_kmoe_mpi_family" && continue
    ldconfig -p | grep -q "^[[:space:]]*$_n " && continue
  fi
  ln -s "$_f" "$_kmoe_libs/$_n"
done
_kmoe_nccl=$(ls /usr/local/cuda/lib/libnccl.so.2 /usr/local/cuda/lib64/libnccl.so.2 /usr/lib/x86_64-linux-gnu/libnccl.so.2 \
  2>/dev/null | head -n 1)
if [ -z "$_kmoe_nccl" ]; then
  _kmoe_nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
fi
echo "mpi_env: libnccl: ${_kmoe_nccl:-NOT FOUND}"
export LD_LIBRARY_PATH=$_kmoe_libs:${_kmoe_nccl:+$(dirname "$_kmoe_nccl"):}/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mca_base_component_show_load_errors=0
export KMOE_MPI_BUILD=$_kmoe_repo/build-gpu-mpi
# -x passes the environment to the ranks; shared memory + self only (one host); no binding (few cores per GPU rank is fine).
# The image's own mpirun takes its own defaults (component names differ between Open MPI 4 and 5).
if [ $_kmoe_own_mpi = 1 ] && command -v mpirun > /dev/null; then
  MPIRUN="$(command -v mpirun) --oversubscribe --bind-to none"
else
  MPIRUN="/usr/bin/orterun --oversubscribe --bind-to none --mca btl self,vader --mca pml ob1"
fi
MPIRUN="$MPIRUN -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x PATH"
echo "mpi_env: $($MPIRUN --version 2>&1 | head -n 1)"
export MPIRUN
# mpi1 CMD...: CMD on one rank under mpirun, or as an MPI singleton when mpirun itself cannot start
mpi1() { $MPIRUN -np 1 "$@" || { local rc=$?; [ $rc -eq 127 ] || [ $rc -ge 200 ] || return $rc;
  echo "mpi_env: mpirun failed (rc $rc); running the command as an MPI singleton"; OMPI_MCA_ess_singleton_isolated=1 "$@"; }; }
export -f mpi1
