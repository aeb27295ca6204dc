#!/usr/bin/env bash
# The CUTLASS engine's device check in one call (device tool, one Hopper GPU), from pack.sh's build:
#   1. test_cuda_cutlass: every grouped op vs a float64 host reference and vs kmoe's kernel (correctness first:
#      DEPENDENCIES.md's CUTLASS 3.4.1 returned wrong results silently with nvcc 13)
#   2. test_cuda_moe: every block case (random shapes, the oracle, both paths) with each engine, CUTLASS included
#   3. bench_cutlass_grouped: each GEMM of the block on the peer-table shapes, CUTLASS vs the cuBLAS engine vs the kernel
#   4. moe_peer_bench: the whole block (forward + backward) with --engine cutlass, its CUDA graph, and auto
#
#   device run, carry [".carry-NAME"]:  cd .carry-NAME && bash perf/device/run_cutlass.sh [STAGES]
#   STAGES: comma list of tests,ops,block (default all). Logs and JSON lines packed into $OUT/cutlass-logs.tgz
#   (the device tool returns at most 8 files); a summary last.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/kmoe-out}/logs
stages=,${1:-tests,ops,block},
mkdir -p "$out"
trap 'tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"' EXIT
cd "$repo"
want() { [[ $stages == *",$1,"* ]]; }
declare -a rows
stage() {  # stage NAME LIMIT_S COMMAND...: log to $out/NAME.log, record ok/FAIL and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  rows+=("$name|$([ $rc -eq 0 ] && echo ok || echo "FAIL rc=$rc")|$((SECONDS - t0))s")
  return $rc
}
echo "== device $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
cat .carry/BUILD_INFO
source perf/device/unpack.sh
# The tests read SRC/../shared/testdata; SRC (a staged worktree) links to this folder, whose parent has no shared/.
[ -e ../shared ] || ln -s "$PWD/.carry/shared" ../shared
bin=build-gpu/bin
if want tests; then
  stage test_cuda_cutlass 300 $bin/tests/test_cuda_cutlass
  grep -E "cutlass vs|rows|OK|FAILED|PASSED|Failure|error" "$out/test_cuda_cutlass.log" | head -n 60
  stage test_cuda_moe 400 $bin/tests/test_cuda_moe
  grep -E "cutlass|FAILED|PASSED|Failure" "$out/test_cuda_moe.log" | head -n 40
fi
if want ops; then
  stage ops_bench 300 $bin/bench_cutlass_grouped --warmup 3 --reps 10
  grep -v '^{' "$out/ops_bench.log"
fi
if want block; then
  for v in ${BLOCK_VARIANTS:-"cutlass:" "cutlass:--graph" "kernel:--graph" "auto:"}; do
    IFS=: read -r eng extra <<< "$v"
    name=block_${eng}${extra:+_graph}
    stage "$name" 300 $bin/moe_peer_bench --engine "$eng" $extra --warmup 3 --reps 20
    grep -v '^{' "$out/$name.log"
    grep '^{' "$out/$name.log" >> "$out/block.jsonl"
  done
fi
echo "== summary"
printf '%-26s %-12s %s\n' stage result time
for r in "${rows[@]}"; do IFS='|' read -r a b c <<< "$r"; printf '%-26s %-12s %s\n' "$a" "$b" "$c"; done
