#!/usr/bin/env python3
"""The peer table: kmoe against the peers and the dense roofline, from the JSON lines of perf/device/peers.py and of
kmoe's GPU benchmark (same schema, impl "kmoe-scatter" / "kmoe-padded"); and the correctness check of a kmoe output
against the peer dump of the same run.

  compare.py [table] FILE... [--checks FILE]... [--markdown] [--strict]
      FILE: JSON lines (peers.py stdout, kmoe's benchmark, '-' = stdin); other lines are ignored.
      --checks: JSON lines written by `compare.py check` (a correctness column).
      --strict: exit 1 when a kmoe row misses its goal or its check (default: exit 0 once the table is printed).
  compare.py check --ref DUMP.safetensors --out KMOE.safetensors --impl kmoe-scatter [--tol 0.02] [--json FILE]
      DUMP: written by peers.py --dump; KMOE: kmoe's layers.0.{y,dx,grad.gate,grad.w1,grad.w3,grad.w2} (any float dtype).
      Prints one JSON line (for --checks) and a human line on stderr; exit 0 pass, 1 fail, 2 bad usage or input.

The table needs only the standard library; `check` needs torch and safetensors.
"""
import argparse
import json
import math
import signal
import sys

# The goals: kmoe forward+backward time (ms) per (shape, T); memory goal: extra <= the best peer's.
GOALS_MS = {("mixtral", 8192): 26.0, ("mixtral", 2048): 7.0, ("finegrained", 8192): 3.6}
SHAPE_ORDER = [("mixtral", 8192), ("mixtral", 2048), ("finegrained", 8192)]
CHECK_NAMES = ["y", "dx", "grad.gate", "grad.w1", "grad.w3", "grad.w2"]
# A kmoe output passes against the float32 reference when each tensor's error is within FACTOR times the peer's own
# bf16 error, or under FLOOR (the bf16 band of METHOD.md: bf16 operands land between 1e-3 and 1e-2).
FACTOR, FLOOR = 2.0, 1e-2


def kind(impl):
    if impl.startswith("kmoe"):
        return "kmoe"
    return "dense" if impl == "dense" else "peer"


def load_records(paths):
    recs = {}
    for path in paths:
        try:
            f = sys.stdin if path == "-" else open(path)
        except OSError as exc:
            print("error: %s: %s" % (path, exc.strerror), file=sys.stderr)
            raise SystemExit(2)
        with f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    r = json.loads(line)
                except ValueError as exc:
                    print("error: %s:%d: not JSON: %s" % (path, n, exc), file=sys.stderr)
                    raise SystemExit(2)
                if not all(key in r for key in ("impl", "shape", "T")):
                    continue  # some other JSON (a log line): not a measurement
                key = (r["shape"], int(r["T"]), r["impl"])
                if key in recs:
                    print("note: %s:%d repeats %s; the later record is used" % (path, n, key), file=sys.stderr)
                recs[key] = r
    return recs


def load_checks(paths):
    checks = {}
    for path in paths or []:
        try:
            f = open(path)
        except OSError as exc:
            print("error: %s: %s" % (path, exc.strerror), file=sys.stderr)
            raise SystemExit(2)
        with f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    c = json.loads(line)
                    checks[(c["shape"], int(c["T"]), c["impl"])] = c
    return checks


def fmt(v, spec, none="-"):
    return none if v is None else spec % v


def gib(b):
    return None if b is None else b / 2 ** 30


def check_text(c):
    if c.get("worst_rel") is None:
        return "FAIL " + c.get("error", "?")[:50]
    return ("pass" if c.get("pass") else "FAIL") + " max %.1e (%s)" % (c["worst_rel"], c.get("worst", "?"))


def table(args):
    recs = load_records(args.files)
    checks = load_checks(args.checks)
    if not recs:
        print("error: no measurements in %s" % ", ".join(args.files), file=sys.stderr)
        return 2
    for key, c in checks.items():  # a check without a timing row still gets a row
        if key not in recs:
            recs[key] = {"impl": key[2], "shape": key[0], "T": key[1], "ok": False, "error": "no timing record"}
    shapes = sorted({(s, t) for s, t, _ in recs}, key=lambda st: (SHAPE_ORDER.index(st) if st in SHAPE_ORDER else 99, st))
    order = {"peer": 0, "dense": 1, "kmoe": 2}
    lines, misses = [], 0
    head = ["shape", "T", "impl", "ms", "TFLOP/s", "extra GiB", "time/best peer", "time/dense", "goal", "correct"]
    for shape, T in shapes:
        rows = sorted([r for (s, t, _), r in recs.items() if (s, t) == (shape, T)],
                      key=lambda r: (order[kind(r["impl"])], r["impl"]))
        ok = lambda r: r.get("ok") and r.get("ms_median") is not None
        peers = [r for r in rows if kind(r["impl"]) == "peer" and ok(r)]
        best = min(peers, key=lambda r: r["ms_median"]) if peers else None
        dense = next((r for r in rows if kind(r["impl"]) == "dense" and ok(r)), None)
        goal_ms = GOALS_MS.get((shape, T))
        sizes = {(r.get("H"), r.get("F"), r.get("E"), r.get("k")) for r in rows if r.get("H") is not None}
        if len(sizes) > 1:
            print("warning: %s T=%d: rows disagree on (H, F, E, k): %s" % (shape, T, sorted(sizes)), file=sys.stderr)
        for r in rows:
            impl, ms = r["impl"], r.get("ms_median")
            c = checks.get((shape, T, impl))
            if not ok(r):
                corr = check_text(c) if c is not None else r.get("error", "not ok")[:60]
                lines.append([shape, str(T), impl, "-" if c is not None else "FAIL", "-", "-", "-", "-",
                              r.get("error", "")[:40] if c is not None else "", corr])
                if kind(impl) == "kmoe":
                    misses += 1
                continue
            extra = r.get("extra_mem_bytes")
            goal = ""
            if kind(impl) == "kmoe":
                reasons = []
                if goal_ms is None:
                    goal = "no goal"
                else:
                    if ms > goal_ms:
                        reasons.append("%.2f > %g ms" % (ms, goal_ms))
                    best_mem = best.get("extra_mem_bytes") if best else None
                    if best_mem is not None and (extra is None or extra > best_mem):
                        reasons.append("mem %s > %.3f GiB" % (fmt(gib(extra), "%.3f", "?"), gib(best_mem)))
                    goal = ("PASS <= %g ms" % goal_ms) if not reasons else "FAIL " + "; ".join(reasons)
                    if best_mem is None:
                        goal += " (mem n/a)"
                    misses += 1 if reasons else 0
            corr = ""
            if c is not None:
                corr = check_text(c)
                if not c.get("pass") and kind(impl) == "kmoe":
                    misses += 1
            elif kind(impl) == "kmoe" and args.checks:
                corr = "no check"
                misses += 1
            elif r.get("check"):
                corr = "vs %s max %.1e" % (r["check"].get("vs", "?"), max(r["check"]["rel"].values()))
            lines.append([shape, str(T), impl, "%.3f" % ms, fmt(r.get("tflops"), "%.1f"), fmt(gib(extra), "%.3f"),
                          fmt(ms / best["ms_median"] if best else None, "%.2fx"),
                          fmt(ms / dense["ms_median"] if dense else None, "%.2fx"), goal, corr])
    devices = sorted({r["device"] for r in recs.values() if r.get("device")}) or ["?"]
    title = "MoE block forward+backward (bf16), ms = median; device: %s" % ", ".join(devices)
    if args.markdown:
        print(title + "\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for l in lines:
            print("| " + " | ".join(l) + " |")
    else:
        widths = [max(len(head[i]), *(len(l[i]) for l in lines)) for i in range(len(head))]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        for l in lines:
            print("  ".join(v.ljust(w) for v, w in zip(l, widths)).rstrip())
    print("time/best peer = ms / fastest peer's ms (< 1: faster); time/dense = ms / dense roofline's ms; "
          "goal: ms <= goal and extra memory <= the fastest peer's.")
    return 1 if (args.strict and misses) else 0


def check(args):
    try:
        import torch  # noqa: F401 (safe_open(..., "pt") needs it; fail here with a clear message)
        from safetensors import safe_open
    except ImportError as exc:
        print("error: compare.py check needs torch and safetensors: %s" % exc, file=sys.stderr)
        return 2

    def load(path):
        try:
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
        except Exception as exc:
            print("error: %s: cannot read safetensors: %s" % (path, " ".join(str(exc).split())), file=sys.stderr)
            raise SystemExit(2)

    def rel(a, b):
        a, b = a.double().reshape(-1), b.double().reshape(-1)
        den = float(b.norm())
        v = float((a - b).norm()) / (den if den > 0 else 1.0)
        return v if math.isfinite(v) else float("nan")

    ref, meta = load(args.ref)
    out, _ = load(args.out)
    pre = "layers.0."
    for n in CHECK_NAMES:
        if pre + n not in ref:
            print("error: %s: tensor '%s' missing (not a peers.py dump?)" % (args.ref, pre + n), file=sys.stderr)
            return 2
    missing = [pre + n for n in CHECK_NAMES if pre + n not in out]
    shape, T = meta.get("shape", "?"), int(meta.get("T", -1))
    res = {"impl": args.impl, "shape": shape, "T": T, "peer_impl": meta.get("peer_impl"), "ref": None,
           "pass": False, "rel": {}, "rel_peer": {}, "missing": missing}
    if missing:
        res["error"] = "missing in %s: %s" % (args.out, ", ".join(missing))
    bad_shape = [n for n in CHECK_NAMES if pre + n in out and out[pre + n].numel() != ref[pre + n].numel()]
    if bad_shape:
        res["error"] = "shape mismatch: " + ", ".join("%s %s vs %s" % (n, list(out[pre + n].shape),
                                                                       list(ref[pre + n].shape)) for n in bad_shape)
    has_f32 = all(pre + n + "_f32" in ref for n in CHECK_NAMES)
    passes = []
    if not missing and not bad_shape:
        if has_f32 and not args.vs_peer:
            # kmoe and the peer against the float32 reference: kmoe may be no worse than FACTOR x the peer (or < FLOOR)
            res["ref"] = "f32 (criterion: rel <= max(%g x peer's, %g))" % (FACTOR, FLOOR)
            for n in CHECK_NAMES:
                r = ref[pre + n + "_f32"]
                res["rel"][n] = rel(out[pre + n], r)
                res["rel_peer"][n] = rel(ref[pre + n], r)
                passes.append(res["rel"][n] <= max(FACTOR * res["rel_peer"][n], FLOOR))
        else:
            res["ref"] = "peer %s bf16 (criterion: rel <= %g)" % (meta.get("peer_impl"), args.tol)
            for n in CHECK_NAMES:
                res["rel"][n] = rel(out[pre + n], ref[pre + n])
                passes.append(res["rel"][n] <= args.tol)  # NaN fails
        res["pass"] = all(passes)
        worst = max(CHECK_NAMES, key=lambda n: res["rel"][n] if math.isfinite(res["rel"][n]) else float("inf"))
        res["worst"], res["worst_rel"] = worst, res["rel"][worst]
    if pre + "topk_idx" in out and pre + "topk_idx" in ref:
        a, b = out[pre + "topk_idx"].reshape(-1, ref[pre + "topk_idx"].shape[-1]), ref[pre + "topk_idx"]
        if a.shape == b.shape:
            differ = lambda u, v: int((u.sort(-1).values != v.sort(-1).values).any(-1).sum())
            res["topk_tokens_differing_vs_peer"] = differ(a, b)
            if pre + "topk_idx_f32" in ref:
                res["topk_tokens_differing_vs_f32"] = differ(a, ref[pre + "topk_idx_f32"])
    line = json.dumps(res)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    rels = " ".join("%s %.1e" % (n, v) for n, v in res["rel"].items())
    print("check %s %s T=%d vs %s: %s  %s%s" % (args.impl, shape, T, res["ref"], "PASS" if res["pass"] else "FAIL",
                                                rels, ("  " + res["error"]) if "error" in res else ""), file=sys.stderr)
    return 0 if res["pass"] else 1


def main(argv=None):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `compare.py ... | head` ends quietly
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("table", "check", "-h", "--help"):
        argv = ["table"] + argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="the issue's table from JSON lines")
    t.add_argument("files", nargs="+")
    t.add_argument("--checks", action="append", help="JSON lines of `compare.py check` (repeatable)")
    t.add_argument("--markdown", action="store_true", help="a Markdown table (for perf/RESULTS.md)")
    t.add_argument("--strict", action="store_true", help="exit 1 if a kmoe row misses its goal or check")
    c = sub.add_parser("check", help="check a kmoe output against a peers.py dump")
    c.add_argument("--ref", required=True, help="DIR/SHAPE.safetensors written by peers.py --dump")
    c.add_argument("--out", required=True, help="kmoe's output tensors (layers.0.y, dx, grad.*)")
    c.add_argument("--impl", required=True, help="row name, e.g. kmoe-scatter")
    c.add_argument("--tol", type=float, default=2e-2, help="rel L2 tolerance vs the peer's bf16 (no f32 ref)")
    c.add_argument("--vs-peer", action="store_true", help="compare with the peer's bf16 even if *_f32 exist")
    c.add_argument("--json", help="also append the JSON line to this file")
    args = p.parse_args(argv)
    return table(args) if args.cmd == "table" else check(args)


if __name__ == "__main__":
    sys.exit(main())
