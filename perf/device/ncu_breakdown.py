#!/usr/bin/env python3
"""Where one step of kmoe's CUDA block spends its GPU time, from Nsight Compute counters (per kernel class).

    ncu --csv --page raw --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed \
        moe_peer_bench --shapes S --paths P --warmup 1 --reps 1 > S.csv
    ncu_breakdown.py S.csv [--steps 2] [--label S] [--copy-tbps 3.0] [--bf16-tflops 790]

moe_peer_bench with --warmup 1 --reps 1 runs the step twice after making its inputs; kernels that fill the inputs
(fill_random) are left out and the rest divided by --steps. Kernels are grouped into classes (expert GEMMs, kmoe
elementwise passes, routing, plan); each row gives the time per step, its share, the DRAM bytes moved, the achieved
bandwidth as a fraction of the device-to-device copy rate, SM and tensor-pipe utilisation (time-weighted means).
ncu serialises kernels and times each alone, so the sum is the GPU busy time without overlap or host gaps; the
difference to the event-timed step is host/launch time (perf/NOTES.md).
"""
import argparse
import csv
import io
import re
import sys

CLASSES = [  # (class, regex on the kernel name) - first match wins
    ("setup (excluded)", r"fill_random"),
    ("kmoe grouped GEMM (router; experts w/ Kernel engine)", r"grouped_gemm"),
    ("routing fwd/bwd", r"rout|softmax|topk|logits"),
    ("expert GEMM: cuBLAS/CUTLASS", r"gemm|xmma|nvjet|cutlass|sm90_|Kernel2"),
    ("SwiGLU fwd/bwd", r"swiglu"),
    ("gather rows", r"gather_rows"),
    ("combine rows", r"combine_rows"),
    ("<dy, out> (pair_dot)", r"pair_dot"),
    ("dispatch plan", r"plan|histogram|scan|place"),
    ("memset/other", r"."),
]


def classify(name):
    for cls, rx in CLASSES:
        if re.search(rx, name, re.I):
            return cls
    return "memset/other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--label", default="")
    ap.add_argument("--copy-tbps", type=float, default=3.0, help="device-to-device copy rate (read+write), TB/s")
    ap.add_argument("--event-ms", type=float, default=None, help="the event-timed step, for the host/launch gap")
    a = ap.parse_args()
    text = open(a.csv, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        sys.exit("ncu_breakdown.py: no ncu CSV in %s" % a.csv)
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    units = rows[0]
    rows = [r for r in rows[1:] if r.get("Kernel Name")]

    def num(r, key):
        v = r.get(key, "").replace(",", "")
        try:
            return float(v)
        except ValueError:
            return 0.0

    scale_t = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(units.get("gpu__time_duration.sum", "nsecond"), 1e-6)
    scale_b = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
    agg = {}
    for r in rows:
        cls = classify(r["Kernel Name"])
        ms = num(r, "gpu__time_duration.sum") * scale_t
        by = (num(r, "dram__bytes_read.sum") * scale_b.get(units.get("dram__bytes_read.sum", "byte"), 1) +
              num(r, "dram__bytes_write.sum") * scale_b.get(units.get("dram__bytes_write.sum", "byte"), 1))
        sm = num(r, "sm__throughput.avg.pct_of_peak_sustained_elapsed")
        tc = num(r, "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed")
        g = agg.setdefault(cls, dict(n=0, ms=0.0, bytes=0.0, sm=0.0, tc=0.0))
        g["n"] += 1
        g["ms"] += ms
        g["bytes"] += by
        g["sm"] += sm * ms
        g["tc"] += tc * ms
    total = sum(g["ms"] for c, g in agg.items() if not c.startswith("setup"))
    print("### ncu breakdown %s (per step, %d steps profiled)" % (a.label, a.steps))
    print()
    print("| class | kernels/step | ms/step | share | GB/step | GB/s | of copy rate | SM % | tensor % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cls, _ in CLASSES:
        g = agg.get(cls)
        if not g or cls.startswith("setup"):
            continue
        ms = g["ms"] / a.steps
        gb = g["bytes"] / a.steps / 1e9
        bw = gb / (ms * 1e-3) if ms > 0 else 0.0
        print("| %s | %.0f | %.3f | %.1f%% | %.2f | %.0f | %.0f%% | %.0f | %.0f |" % (
            cls, g["n"] / a.steps, ms, 100 * g["ms"] / total if total else 0, gb, bw, 100 * bw / (a.copy_tbps * 1e3),
            g["sm"] / g["ms"] if g["ms"] else 0, g["tc"] / g["ms"] if g["ms"] else 0))
    line = "| **sum (GPU busy, kernels alone)** | | **%.3f** | | | | | | |" % (total / a.steps)
    print(line)
    if a.event_ms:
        print("| event-timed step | | %.3f | | | | | | |" % a.event_ms)
    print()


if __name__ == "__main__":
    main()
