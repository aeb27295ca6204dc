#!/usr/bin/env bash
# Device half of the one-block run (one call per stage list): the bf16 block composed in moe/, on one GPU and under
# expert parallelism. Here: perf/device/pack_mpi.sh (with KMOE_TARGETS covering the binaries below) and, for the
# before/after comparison, a moe_peer_bench built from the previous commit copied to .carry/before/.
#   there:  bash perf/device/run_ep.sh [tests,ep,perf,bench,block,finetune,multi]   (multi: several GPUs)
# Stages run in the order given. Output: logs and JSON lines under $OUT; a summary last.
set -uo pipefail
cd "$(dirname "$0")/../.."
stages=${1:-tests,ep,perf,bench,block,finetune}
OUT=${OUT:-/tmp/kmoe-out}
mkdir -p "$OUT"
source perf/device/mpi_env.sh > "$OUT/mpi_env.log" 2>&1
# The binaries carry the absolute source path they were built from (BUILD_INFO_MPI) and read the testdata beside it.
built_src=$(sed -n 's/^mpi build: .* src \([^ ]*\) .*/\1/p' .carry/BUILD_INFO_MPI 2>/dev/null)
if [ -n "$built_src" ]; then
  mkdir -p "$(dirname "$built_src")"
  [ -e "$built_src" ] || ln -s "$PWD" "$built_src"
  [ -e "$(dirname "$built_src")/shared" ] || ln -s "$PWD/.carry/shared" "$(dirname "$built_src")/shared"
fi
B=$KMOE_MPI_BUILD/bin
echo "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
cat .carry/BUILD_INFO 2>/dev/null | head -n 3
summary=()
note() { summary+=("$1"); echo "== $1"; }

stage_tests() {
  for t in test_cuda_smoke test_cuda_routing test_cuda_moe test_cuda_moe_layer test_cuda_cutlass test_cuda_router_losses; do
    timeout 300 "$B/tests/$t" --gtest_brief=1 > "$OUT/$t.log" 2>&1
    note "$t: rc $? ($(grep -E '^\[  (PASSED|FAILED)' "$OUT/$t.log" | tr '\n' ' '))"
  done
  for np in 1 2; do
    timeout 120 $MPIRUN -np $np "$B/tests/test_comm_nccl_np1" --gtest_brief=1 > "$OUT/nccl_np$np.log" 2>&1
    note "test_comm_nccl np$np: rc $?"
    [ $np = 1 ] && break
  done
  for np in 2 3; do
    timeout 120 $MPIRUN -np $np "$B/tests/test_comm_mpi_device_np2" --gtest_brief=1 > "$OUT/mpi_device_np$np.log" 2>&1
    note "test_comm_mpi_device np$np: rc $?"
  done
}

stage_ep() {
  for np in 1 2 3 4; do
    timeout 300 $MPIRUN -np $np "$B/tests/test_comm_distributed_moe_cuda_np1" --gtest_brief=1 > "$OUT/ep_np$np.log" 2>&1
    note "test_comm_distributed_moe_cuda np$np: rc $? ($(grep -c 'Failure' "$OUT/ep_np$np.log") failure lines)"
  done
}

stage_perf() {
  # The bf16 block before (the previous commit's binary) and after, alternated, same shapes, bf16 weight gradients.
  # PERF_SHAPES and PERF_ROUNDS (alternations) adjust it; the table compares medians of the per-run medians and the
  # minima over all steps.
  local args="--shapes ${PERF_SHAPES:-mixtral-T8192,mixtral-T2048,finegrained-T8192} --paths scatter --grads bf16"
  args="$args --warmup 5 --reps ${PERF_REPS:-20} ${PERF_EXTRA:-}"
  for rep in $(seq 1 "${PERF_ROUNDS:-2}"); do
    .carry/before/moe_peer_bench $args > "$OUT/before$rep.jsonl" 2> "$OUT/before$rep.log"
    "$B/moe_peer_bench" $args > "$OUT/after$rep.jsonl" 2> "$OUT/after$rep.log"
  done
  cat "$OUT"/before*.jsonl > "$OUT/before.jsonl"; cat "$OUT"/after*.jsonl > "$OUT/after.jsonl"
  rm -f "$OUT"/before[0-9]*.jsonl "$OUT"/after[0-9]*.jsonl "$OUT"/before[0-9]*.log "$OUT"/after[0-9]*.log
  python3 - "$OUT" <<'PY'
import json, sys, statistics, os
out = sys.argv[1]
rows = {}
for tag in ("before", "after"):
    for line in open(os.path.join(out, f"{tag}.jsonl")):
        r = json.loads(line)
        d = rows.setdefault((r["shape"], r["T"]), {}).setdefault(tag, {"med": [], "min": []})
        d["med"].append(r["ms_median"]); d["min"].append(r["ms_min"])
print("shape          T   runs  before: median of medians / min   after: median of medians / min   ratio med / min")
for (shape, T), d in sorted(rows.items()):
    b, a = d["before"], d["after"]
    bm, am = statistics.median(b["med"]), statistics.median(a["med"])
    print(f"{shape:12s} {T:6d} {len(b['med']):4d}   {bm:9.3f} / {min(b['min']):9.3f}            "
          f"{am:9.3f} / {min(a['min']):9.3f}            {am / bm:.4f} / {min(a['min']) / min(b['min']):.4f}")
PY
}

stage_bench() {
  timeout 240 $MPIRUN -np 1 "$B/bench_ep_bf16" --shapes mixtral,finegrained --tokens 8192 > "$OUT/ep_bench_np1.txt" 2>&1
  note "bench_ep_bf16 np1: rc $?"
  cat "$OUT/ep_bench_np1.txt"
  timeout 240 $MPIRUN -np 2 "$B/bench_ep_bf16" --shapes finegrained --tokens 2048 --comm mpi --reps 5 > "$OUT/ep_bench_np2.txt" 2>&1
  note "bench_ep_bf16 np2 (one GPU, MPI device): rc $?"
  cat "$OUT/ep_bench_np2.txt"
}

stage_block() {
  ck=.carry/shared/testdata/mixtral-tiny
  in=$ck/mixtral-tiny-ref.safetensors
  for impl in scatter padded; do
    mpi1 "$B/kmoe" block --checkpoint $ck/hf_save_pretrained --layer 1 --inputs $in --out "$OUT/b1_$impl.st" \
      --backend cuda --precision bf16 --impl $impl > "$OUT/block1_$impl.log" 2>&1
    note "kmoe block np1 $impl: rc $?"
    $MPIRUN -np 2 "$B/kmoe" block --checkpoint $ck/hf_save_pretrained --layer 1 --inputs $in --out "$OUT/b2_$impl.st" \
      --backend cuda --precision bf16 --impl $impl --ep 2 --comm mpi > "$OUT/block2_$impl.log" 2>&1
    note "kmoe block np2 --ep 2 $impl: rc $?"
  done
  python3 - "$OUT" "$in" <<'PY'
import sys, os
from safetensors.numpy import load_file
out, ref_path = sys.argv[1], sys.argv[2]
ref = load_file(ref_path)
import numpy as np
def rel(a, b): return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
for impl in ("scatter", "padded"):
    try:
        one, two = load_file(f"{out}/b1_{impl}.st"), load_file(f"{out}/b2_{impl}.st")
    except Exception as e:
        print(impl, "missing output:", e); continue
    p = "layers.1."
    line = [impl]
    for n in ("y", "dx", "grad.gate", "grad.w1", "grad.w3", "grad.w2"):
        want = ref[p + n + "_f64"] if p + n + "_f64" in ref else ref[p + n]
        line.append(f"{n}: np1 vs ref {rel(one[p+n], want):.2e} np2 vs np1 {rel(two[p+n], one[p+n]):.2e}")
    line.append("topk np2==np1 " + str(bool((two[p + "topk_idx"] == one[p + "topk_idx"]).all())))
    print(" | ".join(line))
PY
  for f in "$OUT"/*.st; do rm -f "$f"; done
}

stage_finetune() {
  rm -rf /tmp/ft1 /tmp/ft2
  ck=tests/data/granitemoe-tiny
  mpi1 "$B/kmoe" finetune --checkpoint $ck --steps 10 --out /tmp/ft1 --backend cuda --tokens 512 --no-convert > "$OUT/ft_np1.log" 2>&1
  note "finetune np1 cuda bf16: rc $?"
  $MPIRUN -np 2 "$B/kmoe" finetune --checkpoint $ck --steps 10 --out /tmp/ft2 --backend cuda --tokens 512 --comm mpi \
    --no-convert > "$OUT/ft_np2.log" 2>&1
  note "finetune np2 cuda bf16 (MPI device, one GPU): rc $?"
  paste <(grep '^step' "$OUT/ft_np1.log" | awk '{print $2, $4, $8}') <(grep '^step' "$OUT/ft_np2.log" | awk '{print $4, $8}') |
    awk 'BEGIN{print "step      loss np1         loss np2      rel diff   ms np1  ms np2"} {d=($2-$4)/$2; if(d<0)d=-d; printf "%-6s %.9e %.9e %.2e %7.2f %7.2f\n", $1, $2, $4, d, $3, $5}'
}

stage_auxloss() {
  # finetune on the bf16 block with router losses (their gradient through the block's router backward), np 1 vs 2.
  rm -rf /tmp/fa1 /tmp/fa2
  local ck=tests/data/granitemoe-tiny args="--steps 6 --backend cuda --tokens 512 --no-convert --aux-loss-coef 0.01 --z-loss-coef 0.001"
  mpi1 "$B/kmoe" finetune --checkpoint $ck --out /tmp/fa1 $args > "$OUT/fa_np1.log" 2>&1
  note "finetune np1 bf16 + router losses: rc $?"
  $MPIRUN -np 2 "$B/kmoe" finetune --checkpoint $ck --out /tmp/fa2 $args --comm mpi > "$OUT/fa_np2.log" 2>&1
  note "finetune np2 bf16 + router losses: rc $?"
  paste <(grep '^step' "$OUT/fa_np1.log") <(grep '^step' "$OUT/fa_np2.log" | awk '{print $4}')
}

stage_multi() {
  # One rank per GPU over NCCL (nvidia-h200-x2/-x4/-x8): the EP test against one GPU, the weak-scaling table (8192
  # tokens per rank, ep = n), and the main job at scale; NCCL_NVLS_ENABLE=0 comes from mpi_env.sh.
  n=$(nvidia-smi -L | wc -l)
  export KOKKOS_NUM_DEVICES=$n
  timeout 300 $MPIRUN -np $n -x KOKKOS_NUM_DEVICES "$B/tests/test_comm_distributed_moe_cuda_np1" --gtest_brief=1 \
    > "$OUT/ep_nccl_np$n.log" 2>&1
  note "EP test, $n GPUs (NCCL): rc $?"
  timeout 300 $MPIRUN -np $n -x KOKKOS_NUM_DEVICES "$B/bench_ep_bf16" --comm nccl --tokens 8192 > "$OUT/ep_bench_np$n.txt" 2>&1
  note "bench_ep_bf16 $n GPUs: rc $?"
  cat "$OUT/ep_bench_np$n.txt"
}

for st in ${stages//,/ }; do "stage_$st"; done
echo "==== summary"
printf '%s\n' "${summary[@]}"
