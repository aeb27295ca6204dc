#!/usr/bin/env bash
# SwiGLU fused into the kernel engine's GEMM epilogues vs the separate passes, in one device call (perf/NOTES.md,
# "SwiGLU fused into kmoe's grouped GEMM"): the GPU tests, then fused vs unfused block times on the peer-table shapes
# (kernel engine forced) and on a small-expert shape where Auto picks the kernel engine, then the DRAM bytes of the
# GEMMs and SwiGLU passes from ncu.
#
#   device run, carry [".carry-NAME"] (perf/device/stage_carry.sh NAME):
#     cd .carry-NAME && bash perf/device/run_fusion.sh [tests|bench|ncu ...]   (default: all three)
# Build first: KMOE_TARGETS="test_cuda_moe bench_cuda_moe moe_peer_bench" perf/device/pack.sh
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/kmoe-out}
mkdir -p "$out"
cd "$repo"
source perf/device/unpack.sh > /dev/null
# Staged by stage_carry.sh, this checkout sits at MAIN/.carry-NAME and the source path the build recorded links here;
# the tests' ../shared/testdata then resolves (physically) to MAIN/shared: point that at the carried testdata.
[ -e ../shared ] || ln -s "$PWD/.carry/shared" ../shared
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
cat .carry/BUILD_INFO
date -u +%Y-%m-%dT%H:%MZ
stages=${*:-tests bench ncu}
bench=build-gpu/bin/moe_peer_bench
fails=0

if [[ $stages == *tests* ]]; then
  echo "== tests"
  ctest --test-dir build-gpu -R test_cuda_moe -V --timeout 400 > "$out/ctest.log" 2>&1 || fails=$((fails + 1))
  grep -E "fused vs unfused|epilogue:|tests passed|tests failed|FAILED|Failure|  Passed|\*\*\*" "$out/ctest.log" |
    sed 's/^[0-9]*: //' | cut -c1-260
  # The epilogues' corner cases (indexed rows, in place, ragged tiles) under memcheck: out-of-bounds reads/writes.
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null)
  timeout 240 "$sanitizer" --tool memcheck --error-exitcode 3 build-gpu/bin/tests/test_cuda_moe \
    --gtest_filter='CudaMoe.FusedSwigluEpilogues*' > "$out/memcheck.log" 2>&1 || fails=$((fails + 1))
  grep -E "ERROR SUMMARY|PASSED|FAILED|epilogue:" "$out/memcheck.log" | cut -c1-200
fi

if [[ $stages == *bench* ]]; then
  echo "== block times, fused vs unfused (median of 20 after 3 warm-ups; each pair in one process)"
  for pass in 1 2; do
    $bench --engine kernel --swiglu both --warmup 3 --reps 20 --shapes mixtral-T8192,mixtral-T2048,finegrained-T8192 \
      >> "$out/bench.jsonl" 2>> "$out/bench.log" || fails=$((fails + 1))
    $bench --engine auto --swiglu both --warmup 3 --reps 20 --shapes finegrained-T2048 \
      >> "$out/bench.jsonl" 2>> "$out/bench.log" || fails=$((fails + 1))
  done
  grep -v "^moe_peer_bench" "$out/bench.log"
fi

if [[ $stages == *ncu* ]]; then
  echo "== ncu: DRAM bytes of the grouped GEMMs and SwiGLU passes of the first step (scattered path)"
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -n 1)
  for shape in mixtral-T2048:kernel finegrained-T2048:auto mixtral-T8192:kernel; do
    # The first 7 / 5 matching launches: the router's logits GEMM, up (+ SwiGLU), down, d_act (+ SwiGLU), dx.
    for mode in unfused:7 fused:5; do
      log=$out/ncu.csv  # all runs in one file (the device tool returns at most 8 files)
      echo "### ${shape%%:*} ${mode%%:*}" >> "$log"
      timeout 300 "$ncu" --csv --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        -k regex:"grouped_gemm_kernel|swiglu" --launch-count "${mode##*:}" \
        $bench --shapes "${shape%%:*}" --paths scatter --engine "${shape##*:}" --swiglu "${mode%%:*}" --warmup 0 \
        --reps 1 > "$out/ncu-one.csv" 2>> "$out/ncu.err" || { fails=$((fails + 1)); tail -n 5 "$out/ncu.err"; }
      cat "$out/ncu-one.csv" >> "$log"
      python3 - "$out/ncu-one.csv" "${shape%%:*} ${mode%%:*}" << 'EOF'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
if start is None:
    print(sys.argv[2], ": no ncu rows"); sys.exit(0)
head, body = rows[start], rows[start + 1:]
col = {k: i for i, k in enumerate(head)}
kern = {}
for r in body:
    if len(r) != len(head) or not r[col["ID"]].isdigit():
        continue
    k = kern.setdefault(int(r[col["ID"]]), {"name": r[col["Kernel Name"]]})
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "ns": 1e-9, "nsecond": 1e-9, "us": 1e-6,
             "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3, "s": 1, "second": 1}.get(r[col["Metric Unit"]], 1)
    k[r[col["Metric Name"]]] = float(r[col["Metric Value"]].replace(",", "")) * scale
tr = tw = tt = 0
print(sys.argv[2])
for i, k in sorted(kern.items()):
    rd, wr, t = k.get("dram__bytes_read.sum", 0), k.get("dram__bytes_write.sum", 0), k.get("gpu__time_duration.sum", 0)
    tr, tw, tt = tr + rd, tw + wr, tt + t
    print(f"  {k['name'][:60]:60s} read {rd / 1e9:7.3f} GB  write {wr / 1e9:7.3f} GB  {t * 1e3:8.3f} ms")
print(f"  {'total':60s} read {tr / 1e9:7.3f} GB  write {tw / 1e9:7.3f} GB  {tt * 1e3:8.3f} ms  (read+write {(tr + tw) / 1e9:.3f} GB)")
EOF
    done
  done
  rm -f "$out/ncu-one.csv"
fi
echo "failed stages: $fails"
exit $fails
