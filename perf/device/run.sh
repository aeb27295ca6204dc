#!/usr/bin/env bash
# The device script: one call on the GPU machine (device tool) that unpacks the sm_90 build made by
# perf/device/pack.sh, shows the device, runs kmoe's GPU tests and benchmarks, and prints a short table last.
#
#   device run, carry [".carry"]:  bash perf/device/run.sh [quick]
#
# Writes full logs under $OUT (the device tool returns them). Exit code: number of failed stages.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/kmoe-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$repo/build-gpu/carry-lib:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
cd "$repo"
declare -a rows
fails=0
stage() {  # stage NAME COMMAND...: runs, logs to $out/NAME.log, records ok/FAIL and seconds
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" "BEGIN{printf \"%.1f\", b-a}")
  if [ $rc -eq 0 ]; then rows+=("$name|ok|${dt}s"); else rows+=("$name|FAIL rc=$rc|${dt}s"); fails=$((fails + 1)); fi
  tail -n 25 "$out/$name.log"
  return 0
}

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$out/device.txt"
nvcc --version | tail -n 2 | head -n 1
cat .carry/BUILD_INFO 2>/dev/null
date -u +%Y-%m-%dT%H:%MZ

echo "== unpack"
# The binaries hold the absolute paths they were built with (/work/gpu-src or /work/main sources, /work/main/build-gpu,
# /work/shared/testdata): recreate them here as links when free.
source perf/device/unpack.sh
ls -la /work

echo "== tests"
stage ctest_cuda ctest --test-dir build-gpu -L cuda -V --timeout 300
# Everyone else's tests on this build (the portable kernels on Kokkos::Cuda, the default space here); binaries that
# pack.sh was not asked to build show as "Not Run".
stage ctest_other ctest --test-dir build-gpu -LE cuda --output-on-failure --timeout 300

if [ "${1:-}" != quick ]; then
  echo "== benchmarks"
  for b in build-gpu/bin/bench_cuda_*; do
    [ -x "$b" ] || continue
    stage "$(basename "$b")" "$b" --benchmark_counters_tabular=true \
      --benchmark_out="$out/$(basename "$b").json" --benchmark_out_format=json
  done
  if [ -x build-gpu/bin/kmoe ]; then
    t=.carry/shared/testdata/mixtral-tiny
    stage kmoe_block_cuda build-gpu/bin/kmoe block --checkpoint $t/hf_save_pretrained --layer 0 --inputs $t/mixtral-tiny-ref.safetensors --out $out/block_cuda.safetensors --backend cuda --precision bf16
  fi
fi

echo "== summary"
grep -h -E "^[0-9]+: (T=|mixtral|granite)" "$out"/ctest_cuda.log | sed 's/^[0-9]*: //' | cut -c1-200
grep -h -E "^(moe_|up_proj)" "$out"/bench_cuda_*.log 2>/dev/null | awk '{printf "%-52s %10s %s  %s\n", $1, $2, $3, $NF}'
grep -h -E "tests passed|tests failed|^device:|\*\*\*|Not Run|Failed  " "$out"/ctest_*.log | sort -u
printf '%-28s %-14s %s\n' stage result time
for r in "${rows[@]}"; do IFS='|' read -r a b c <<< "$r"; printf '%-28s %-14s %s\n' "$a" "$b" "$c"; done
exit $fails
