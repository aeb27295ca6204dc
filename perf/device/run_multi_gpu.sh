#!/usr/bin/env bash
# The multi-GPU device run: expert parallelism over NCCL, one process per GPU, on a multi-GPU kind (nvidia-h200-x2; the
# rank count follows the GPUs, so -x4/-x8 work too). NVLink multicast stays off (NCCL_NVLS_ENABLE=0: KINDS.md says why).
#
#   here:    perf/device/pack_mpi.sh       # MPI + NCCL + CUDA build with bench_ep_moe, bench_alltoall,
#                                          # test_comm_nccl_np1 -> .carry/kmoe-gpu-mpi-build.tgz + .carry/ompi-tree.tgz
#   device:  run(kind="nvidia-h200-x2", carry=[".carry"], command="bash perf/device/run_multi_gpu.sh")
#
# perf/device/mpi_env.sh unpacks the build, installs the carried Open MPI where the image has none, finds libnccl and
# defines $MPIRUN. Stages, each with a time limit:
#   nccl_test      test_comm_nccl_np1 on N ranks: NCCL collectives on device pointers, dispatch/combine round trip
#   ep_mixtral     bench_ep_moe --shape mixtral     (H=4096 F=14336 E=8 k=2, 4096 tokens per rank)
#   ep_finegrained bench_ep_moe --shape finegrained (H=2048 F=768 E=64 k=8, 8192 tokens per rank)
#                  each: DistributedMoe (ep N) vs the single-process MoeLayer (PASS/FAIL), time per layer vs one GPU,
#                  dispatch/combine table next to a plain NCCL all-to-all of the same bytes (docs/comm.md)
#   a2a_sweep      bench_alltoall --backend nccl, H=4096 k=2 E=8, 256..16384 tokens per rank (bandwidth curve)
# Everything goes to ONE file, $OUT/multi_gpu.log (the device tool returns at most 8 files: this run may share a call
# with others); stdout gets the tail of a failed stage and the summary (stage results, the bench's key lines and
# Markdown rows) last. Exit status: the number of failed stages.
# Env: KMOE_NP (ranks; default: the GPUs nvidia-smi lists), KMOE_EP_ARGS (extra bench_ep_moe options).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/kmoe-out}
mkdir -p "$out"
log=$out/multi_gpu.log
work=$(mktemp -d)  # per-stage logs (not sent back)
cd "$repo"
declare -a rows
fails=0
stage() {  # stage NAME LIMIT_S COMMAND...: runs with a time limit, appends its output to $log, records ok/FAIL + seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  echo "==== $name: $*" >> "$log"
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  local dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  cat "$work/$name.log" >> "$log"
  if [ $rc -eq 0 ]; then
    rows+=("$name|ok|${dt}s")
  else
    rows+=("$name|FAIL rc=$rc|${dt}s"); fails=$((fails + 1))
    echo "---- $name failed (rc=$rc), last lines:"; tail -n 30 "$work/$name.log"
  fi
  return 0
}

echo "== device $(date -u +%Y-%m-%dT%H:%M:%SZ)"
{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id --format=csv 2>&1
  nvidia-smi topo -m 2>&1
  cat .carry/BUILD_INFO_MPI 2>/dev/null
  echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
} | tee "$log"
np=${KMOE_NP:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
if [ "$np" -lt 1 ]; then echo "run_multi_gpu: no GPU listed by nvidia-smi"; exit 1; fi
[ "$np" -lt 2 ] && echo "run_multi_gpu: only $np GPU: every stage runs on one rank (not the multi-GPU run)"

echo "== MPI + NCCL build"
if [ ! -f .carry/kmoe-gpu-mpi-build.tgz ] || [ ! -f perf/device/mpi_env.sh ]; then
  echo "run_multi_gpu: needs .carry/kmoe-gpu-mpi-build.tgz and perf/device/mpi_env.sh (run perf/device/pack_mpi.sh here first)"
  exit 2
fi
source perf/device/mpi_env.sh
export NCCL_NVLS_ENABLE=0  # again, in case the environment script changes
mb=$KMOE_MPI_BUILD/bin
{
  command -v "${MPIRUN%% *}" >/dev/null || echo "run_multi_gpu: ${MPIRUN%% *} not found"
  "${MPIRUN%% *}" --version 2>&1 | head -n 1
  for b in "$mb/bench_ep_moe" "$mb/tests/test_comm_nccl_np1" "$mb/bench_alltoall"; do
    if [ -x "$b" ]; then
      echo "$(basename "$b"): $(ldd "$b" | grep -E 'libmpi|libnccl|libcudart|not found' | awk '{print $1 " -> " $3}' | tr '\n' ' ')"
    else
      echo "$(basename "$b"): MISSING from the build"
    fi
  done
} 2>&1 | tee -a "$log"

echo "== stages ($np ranks, one per GPU)"
# Kokkos in the test and bench_alltoall takes its GPU from KOKKOS_NUM_DEVICES (node-local rank % N), the same one the
# NCCL communicator picks; bench_ep_moe sets --kokkos-device-id itself.
stage nccl_test 180 $MPIRUN -np "$np" -x KOKKOS_NUM_DEVICES="$np" "$mb/tests/test_comm_nccl_np1"
for shape in mixtral finegrained; do
  stage "ep_$shape" 300 $MPIRUN -np "$np" "$mb/bench_ep_moe" --backend nccl --shape "$shape" ${KMOE_EP_ARGS:-}
done
stage a2a_sweep 180 $MPIRUN -np "$np" -x KOKKOS_NUM_DEVICES="$np" "$mb/bench_alltoall" --backend nccl \
  --hidden 4096 --experts 8 --top-k 2 --min-tokens 256 --max-tokens 16384 --iters 20

{
  echo "== summary ($np ranks; full output: $log)"
  grep -h -E "^#   rank [0-9]+:|^# float32" "$work/ep_mixtral.log" 2>/dev/null
  for shape in mixtral finegrained; do
    grep -h -E "^## shape|^#   (y|dx|d router|d w1)|^#   routing|^#   device memory|^#   (run|DistributedMoe|MoeLayer)|^#  op|^   (dispatch|combine|plain)|^# shape" \
      "$work/ep_$shape.log" 2>/dev/null
  done
  echo "bench_alltoall --backend nccl (H=4096 k=2 E=8; size, tokens/rank, dispatch us/algbw/busbw/#wrong, combine ...):"
  grep -h -E "^ +[0-9]+ +[0-9]+ +f32|Out of bounds" "$work/a2a_sweep.log" 2>/dev/null
  grep -h -E "^\[  (PASSED|FAILED) " "$work/nccl_test.log" 2>/dev/null | sed 's/^/test_comm_nccl_np1 x'"$np"': /'
  grep -h -E "^\|( shape|---)" "$work/ep_mixtral.log" "$work/ep_finegrained.log" 2>/dev/null | head -n 2
  grep -h -E "^\| (mixtral|finegrained)" "$work/ep_mixtral.log" "$work/ep_finegrained.log" 2>/dev/null
  printf '%-20s %-14s %s\n' stage result time
  for r in "${rows[@]}"; do IFS='|' read -r a b c <<< "$r"; printf '%-20s %-14s %s\n' "$a" "$b" "$c"; done
} 2>&1 | tee -a "$log"
rm -rf "$work"
exit $fails
