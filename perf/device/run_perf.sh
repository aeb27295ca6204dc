#!/usr/bin/env bash
# The peer comparison's device run in one call (device tool, one GPU), plus the one-rank NCCL checks and a CUDA finetune:
#   1. peers.py: transformers' MixtralSparseMoeBlock (eager, grouped_mm) + the dense roofline on the three shapes;
#      dumps mixtral-T2048 and finegrained-T8192 (weights, inputs, the peer's outputs, the f32 reference) to a
#      scratch dir outside $OUT
#   2. moe_peer_bench: kmoe's CUDA block on the same shapes, same JSON schema (kmoe-scatter, kmoe-padded), and
#      variants for the notes (--engine kernel|cublas|cutlass, cutlass --graph, KMOE_CUBLAS_STREAMS when the
#      build knows it)
#   3. compare.py: the table (timings)
#   4. (with .carry/kmoe-gpu-mpi-build.tgz from pack_mpi.sh) test_comm_nccl_np1 and bench_alltoall --backend nccl on
#      one rank; kmoe finetune --backend cuda vs --backend serial on tests/data/granitemoe-tiny (losses side by side)
#   5. kmoe block --backend cuda on the dumps + compare.py check (kmoe vs the f32 reference, next to the peer's own
#      error), and the table again with the checks (Markdown, $OUT/table.md)
#   6. (stage ncu) Nsight Compute counters of two steps per shape, grouped per kernel class ($OUT/ncu_breakdown.md)
#
#   device run, carry [".carry"]:  bash perf/device/run_perf.sh [STAGES]   (STAGES: comma list of
#   peers,kmoe,checks,nccl,finetune,ncu; default all but ncu). JSON lines and logs under $OUT; a summary last.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/kmoe-out}
scratch=${KMOE_SCRATCH:-/tmp/kmoe-perf-scratch}   # GBs: never under $OUT (everything there is sent back)
stages=,${1:-peers,kmoe,checks,nccl,finetune},
logs=$out/logs   # stage logs; packed into $out/logs.tgz at the end (the device tool returns at most 8 files)
mkdir -p "$out" "$logs" "$scratch"
cd "$repo"
pack_logs() { [ -d "$logs" ] && tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$logs"; }
trap pack_logs EXIT
trap 'exit 143' TERM INT
export PYTHONUNBUFFERED=1
declare -a rows
stage() {  # stage NAME LIMIT_S COMMAND...: runs with a time limit, logs to $out/NAME.log, records ok/FAIL and seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  local dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  rows+=("$name|$([ $rc -eq 0 ] && echo ok || echo "FAIL rc=$rc")|${dt}s")
  tail -n "${TAIL:-15}" "$logs/$name.log"
  return $rc
}
want() { [[ $stages == *",$1,"* ]]; }

echo "== device $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$logs/device.txt"
cat .carry/BUILD_INFO .carry/BUILD_INFO_MPI 2>/dev/null | tee -a "$logs/device.txt"
df -h /tmp | tail -n 1
source perf/device/unpack.sh
bin=build-gpu/bin
if want peers; then
  echo "== peers.py"
  rm -rf "$scratch/dump"
  # stdout = JSON lines; the log has the table and the dump's own errors
  timeout 420 python3 perf/device/peers.py --dump "$scratch/dump" --dump-shapes mixtral-T2048,finegrained-T8192 \
    > "$out/peers.jsonl" 2> "$logs/peers.log"
  rc=$?; rows+=("peers.py|$([ $rc -eq 0 ] && echo ok || echo "FAIL rc=$rc")|-")
  tail -n 14 "$logs/peers.log"; ls -la "$scratch/dump" 2>/dev/null
fi

if want kmoe; then
  echo "== kmoe (moe_peer_bench)"
  stage kmoe_bench 240 $bin/moe_peer_bench --warmup 5 --reps 30
  grep '^{' "$logs/kmoe_bench.log" > "$out/kmoe.jsonl"
  # variants for perf/NOTES.md (not goal rows): the device-offset kernel engine on every shape
  TAIL=8 stage kmoe_bench_kernel 240 $bin/moe_peer_bench --engine kernel --warmup 3 --reps 20
  grep '^{' "$logs/kmoe_bench_kernel.log" > "$out/kmoe_variants.jsonl"
  # bf16 weight gradients (what the peers' .grad holds; cuBLAS engine): the fp32 gradient bytes the notes account for
  TAIL=8 stage kmoe_bench_bf16grads 240 $bin/moe_peer_bench --engine cublas --grads bf16 --warmup 5 --reps 30
  grep '^{' "$logs/kmoe_bench_bf16grads.log" >> "$out/kmoe_variants.jsonl"
  # each library engine forced (Auto picks one per shape), and the CUTLASS engine's block replayed as a CUDA graph
  if $bin/moe_peer_bench --engine cutlass --shapes finegrained-T8192 --paths scatter --warmup 0 --reps 1 >/dev/null 2>&1; then
    for v in cublas cutlass "cutlass --graph" "cutlass --grads bf16"; do
      TAIL=8 stage "kmoe_bench_${v// /_}" 240 $bin/moe_peer_bench --engine $v --warmup 5 --reps 30
      grep '^{' "$logs/kmoe_bench_${v// /_}.log" >> "$out/kmoe_variants.jsonl"
    done
  fi
  echo "== table (timings only)"
  # without the peers stage: the peers' JSON lines of an earlier run of the same device (KMOE_PEERS_JSONL)
  [ -s "$out/peers.jsonl" ] || cp "${KMOE_PEERS_JSONL:-/nonexistent}" "$out/peers.jsonl" 2>/dev/null
  python3 perf/device/compare.py "$out/peers.jsonl" "$out/kmoe.jsonl" | tee "$logs/table_timing.txt"
fi

if [ -f .carry/kmoe-gpu-mpi-build.tgz ] && { want nccl || want finetune; }; then
  echo "== MPI + NCCL build"
  ls -la /usr/bin/mpirun /usr/bin/orterun 2>&1; ldconfig -p | grep -E 'libmpi\.so|libpmix' | head -n 4
  source perf/device/mpi_env.sh
  mb=build-gpu-mpi/bin
  if want nccl; then
    TAIL=25 stage nccl_np1_test 180 bash -c 'mpi1 "$@"' _ $mb/tests/test_comm_nccl_np1
    TAIL=20 stage nccl_np1_alltoall 240 bash -c 'mpi1 "$@"' _ $mb/bench_alltoall --backend nccl --hidden 4096 \
      --min-tokens 256 --max-tokens 16384
  fi
  if want finetune; then
    rm -rf "$scratch/ft-cuda" "$scratch/ft-serial"
    TAIL=12 stage finetune_cuda 240 bash -c 'mpi1 "$@"' _ $mb/kmoe finetune --checkpoint tests/data/granitemoe-tiny --steps 8 \
      --out "$scratch/ft-cuda" --backend cuda --no-convert
    TAIL=12 stage finetune_serial 240 bash -c 'mpi1 "$@"' _ $mb/kmoe finetune --checkpoint tests/data/granitemoe-tiny --steps 8 \
      --out "$scratch/ft-serial" --backend serial --no-convert
    echo "step | loss cuda | loss serial (same command, CPU)"
    paste -d'|' <(grep -o 'step [0-9]*/[0-9]* loss [^ ]*' "$logs/finetune_cuda.log") \
                <(grep -o 'loss [^ ]*' "$logs/finetune_serial.log") | tee "$logs/finetune_losses.txt"
  fi
fi

if want checks && [ -d "$scratch/dump" ]; then
  echo "== checks: kmoe block --backend cuda on the peer's dump"
  rm -f "$out/checks.jsonl" "$out/checks_variants.jsonl"
  for job in mixtral-T2048:mixtral:scatter finegrained-T8192:finegrained:scatter finegrained-T8192:finegrained:padded \
             finegrained-T8192:finegrained:scatter:4 mixtral-T2048:mixtral:padded; do
    IFS=: read -r sid model impl nstreams <<< "$job"
    export KMOE_CUBLAS_STREAMS=${nstreams:-1}
    name=kmoe-$impl${nstreams:+-streams$nstreams}
    # the Mixtral padded check (~1.5 min: 11 GB of float64 written and read back) only while the call has time left
    if { [ "$sid:$impl" = mixtral-T2048:padded ] && [ $SECONDS -gt ${KMOE_CHECK_DEADLINE_S:-400} ]; } ||
       [ $SECONDS -gt 480 ]; then
      rows+=("check_${sid}_$name|skipped (time)|-"); continue
    fi
    [ -f "$scratch/dump/$sid.safetensors" ] || { rows+=("check_${sid}_$name|FAIL no dump|-"); continue; }
    TAIL=3 stage "block_${sid}_$name" 200 $bin/kmoe block --checkpoint "$scratch/dump/$model-ckpt" --layer 0 \
      --inputs "$scratch/dump/$sid.safetensors" --out "$scratch/k.safetensors" --backend cuda --precision bf16 \
      --impl "$impl" &&
      TAIL=3 stage "check_${sid}_$name" 200 python3 perf/device/compare.py check --ref "$scratch/dump/$sid.safetensors" \
        --out "$scratch/k.safetensors" --impl "$name" \
        --json "$out/checks${nstreams:+_variants}.jsonl"
    rm -f "$scratch/k.safetensors"
  done
  unset KMOE_CUBLAS_STREAMS
  echo "== table (with checks)"
  python3 perf/device/compare.py "$out/peers.jsonl" "$out/kmoe.jsonl" --checks "$out/checks.jsonl" --markdown \
    | tee "$out/table.md"
  if [ -s "$out/kmoe_variants.jsonl" ]; then
    echo "== variants (for perf/NOTES.md; not the issue's rows)"
    python3 perf/device/compare.py "$out/peers.jsonl" "$out/kmoe_variants.jsonl" --markdown \
      $([ -s "$out/checks_variants.jsonl" ] && echo --checks "$out/checks_variants.jsonl") | tee "$out/table_variants.md"
  fi
fi
rm -rf "$scratch/dump" "$scratch/k.safetensors"

if want ncu; then
  # Where the time goes (per kernel class): Nsight Compute counters of every kernel of two steps per shape
  # (scatter path, default engine), grouped by perf/device/ncu_breakdown.py.
  echo "== ncu breakdown"
  metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
  metrics+=,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed
  for shape in ${KMOE_NCU_SHAPES:-mixtral-T8192 mixtral-T2048 finegrained-T8192}; do
    TAIL=2 stage "ncu_$shape" 300 ncu --csv --page raw --clock-control none --metrics "$metrics" \
      $bin/moe_peer_bench --shapes "$shape" --paths scatter --warmup 1 --reps 1 ${KMOE_NCU_BENCH_ARGS:-}
    ev=$(python3 -c '
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r["impl"] == "kmoe-scatter" and "%s-T%d" % (r["shape"], r["T"]) == sys.argv[2] and r.get("ms_median"):
        print(r["ms_median"]); break' "$out/kmoe.jsonl" "$shape" 2>/dev/null)
    python3 perf/device/ncu_breakdown.py "$logs/ncu_$shape.log" --label "$shape" ${ev:+--event-ms $ev} \
      | tee -a "$out/ncu_breakdown.md"
  done
fi

echo "== summary"
cat "$out/table.md" 2>/dev/null || cat "$logs/table_timing.txt" 2>/dev/null
grep -h '' "$out/kmoe_variants.jsonl" 2>/dev/null | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print("variant %-26s %-12s T=%-5s %8s ms  %6s TFLOP/s" % (r["impl"], r["shape"], r["T"], r.get("ms_median"), "%.0f" % r["tflops"] if r.get("tflops") else "-"))'
cat "$out/checks.jsonl" "$out/checks_variants.jsonl" 2>/dev/null | grep -h -E '"pass"'  | python3 -c '
import json, sys
for l in sys.stdin:
    c = json.loads(l)
    print("check %-13s %-12s T=%d %s worst %s %.2e  rel %s  topk differing vs peer %s vs f32 %s" % (c["impl"], c["shape"], c["T"], "PASS" if c["pass"] else "FAIL", c.get("worst"), c.get("worst_rel") or float("nan"), {k: float("%.2e" % v) for k, v in c["rel"].items()}, c.get("topk_tokens_differing_vs_peer"), c.get("topk_tokens_differing_vs_f32")))'
cat "$logs/finetune_losses.txt" 2>/dev/null
cat "$out/ncu_breakdown.md" 2>/dev/null
printf '%-34s %-14s %s\n' stage result time
for r in "${rows[@]}"; do IFS='|' read -r a b c <<< "$r"; printf '%-34s %-14s %s\n' "$a" "$b" "$c"; done
