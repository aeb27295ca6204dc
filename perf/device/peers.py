#!/usr/bin/env python3
"""Peer half of the device perf script: times Hugging Face transformers' MixtralSparseMoeBlock (experts
implementations `eager` and `grouped_mm`) and a dense bf16 matmul chain of the same expert-GEMM FLOPs (the roofline),
forward + backward, on the MoE shapes the issue names; optionally dumps weights, inputs and the peer's outputs so kmoe
can be checked against the peer in the same run.

  python3 perf/device/peers.py [--shapes mixtral-T8192,mixtral-T2048,finegrained-T8192 | --tiny] [--device cuda|cpu]
                               [--impls eager,grouped_mm,dense] [--warmup 5] [--reps 20] [--seed 0]
                               [--dump DIR [--no-ref-f32] [--no-checkpoint]] [--json FILE]

stdout: one JSON line per measurement (schema in perf/device/README.md); stderr: a human table and notes.
Exit code: 0 when every requested measurement ran and every check passed, 1 otherwise, 2 bad usage.

Definitions (docs/perf.md):
- step = forward + backward w.r.t. the input and all weights (router included) of L = sum(y * dy), i.e. autograd with
  upstream gradient dy (y.backward(dy); no extra multiply/sum kernels). Gradients are reset to None before each step, as
  optimizer.zero_grad(set_to_none=True) does in training.
- ms = CUDA events around each step after warm-up; median and min of --reps steps.
- tflops = 18*T*k*H*F / time (expert GEMM FLOPs: forward 6*T*k*H*F, backward twice that; the router is not counted).
- extra_mem_bytes = peak allocated during one step - allocated before it - bytes of what the step returns and keeps
  (y, dx, the weight gradients): the saved activations and scratch. Weights, x and dy are allocated before the step.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import torch

# (model, H, F, E, k); tokens T per shape id. Weights are seeded by model, so both Mixtral shapes share one checkpoint.
MODELS = {
    "mixtral": dict(H=4096, F=14336, E=8, k=2, model_id=1),  # Mixtral-8x7B layer
    "finegrained": dict(H=2048, F=768, E=64, k=8, model_id=2),  # DeepSeek/Qwen-MoE-like
    "tiny": dict(H=64, F=96, E=8, k=2, model_id=3),  # CPU smoke runs
}
SHAPES = {
    "mixtral-T8192": ("mixtral", 8192),
    "mixtral-T2048": ("mixtral", 2048),
    "finegrained-T8192": ("finegrained", 8192),
    "tiny-T128": ("tiny", 128),
}
DEFAULT_SHAPES = ["mixtral-T8192", "mixtral-T2048", "finegrained-T8192"]
PEER_IMPLS = ["eager", "grouped_mm"]
ALL_IMPLS = PEER_IMPLS + ["dense"]
# grouped_mm vs eager in the same run: both bf16 storage with fp32 accumulation, same routing (identical router code),
# so they differ by bf16 rounding only (measured ~2e-3 on the tiny shape); a wrong dispatch is O(1).
PEER_AGREE_TOL = 3e-2


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def one_line(exc):
    text = "%s: %s" % (type(exc).__name__, exc)
    return " ".join(text.split())[:400]


# ---------------------------------------------------------------------------------------------------------------------
# transformers' experts-implementation API, detected at run time
# ---------------------------------------------------------------------------------------------------------------------
def experts_api():
    """What this transformers offers for selecting the experts implementation of a standalone MixtralSparseMoeBlock.

    transformers 5.x: MixtralExperts is decorated with integrations.moe.use_experts_implementation; its forward looks up
    self.config._experts_implementation in ALL_EXPERTS_FUNCTIONS on every call (None or "eager" = the original loop).
    MixtralConfig(experts_implementation=...) sets it; PreTrainedModel.set_experts_implementation exists only on full
    models, so for a bare block we set config._experts_implementation. transformers 4.x has a ModuleList of experts
    and only the eager loop."""
    import transformers
    info = {"transformers": transformers.__version__, "registry": None, "grouped_mm_kernel": None}
    try:
        from transformers.integrations import moe as hf_moe
        info["registry"] = sorted(hf_moe.ALL_EXPERTS_FUNCTIONS.keys())
        info["module"] = hf_moe
    except Exception as exc:  # older transformers: no experts interface
        info["error"] = one_line(exc)
        info["module"] = None
    return info


def impl_unavailable(api, impl, device):
    """None if `impl` can run as itself here, else a one-line reason."""
    if impl == "eager":
        return None
    hf_moe = api["module"]
    if hf_moe is None:
        return "transformers %s has no experts interface (integrations.moe): only eager exists (%s)" % (
            api["transformers"], api.get("error", ""))
    if impl not in api["registry"]:
        return "experts implementation %r is not registered in transformers %s (registered: %s)" % (
            impl, api["transformers"], ", ".join(api["registry"]))
    if impl == "grouped_mm":
        probe = getattr(hf_moe, "_can_use_grouped_mm", None)
        if probe is not None:
            a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
            w = torch.zeros(2, 16, 16, dtype=torch.bfloat16, device=device)
            offs = torch.tensor([8, 16], dtype=torch.int32, device=device)
            if not probe(a, w, offs):
                # transformers would silently run its per-expert Python fallback: that is not grouped_mm
                return "torch %s cannot run grouped_mm on %s (transformers would use its per-expert fallback loop)" % (
                    torch.__version__, device)
    return None


def set_impl(block, impl):
    """Select the experts implementation of `block` and return the name of the function that will run."""
    experts = block.experts
    cfg = getattr(experts, "config", None)
    if cfg is None:
        if impl != "eager":
            raise RuntimeError("this MixtralExperts has no config (not decorated): cannot select %r" % impl)
        return type(experts).__name__ + ".forward"
    cfg._experts_implementation = impl
    if cfg._experts_implementation != impl:
        raise RuntimeError("config._experts_implementation did not take %r" % impl)
    from transformers.integrations import moe as hf_moe
    fn = hf_moe.ALL_EXPERTS_FUNCTIONS.get_interface(impl, None)
    return "original forward (eager loop)" if fn is None else fn.__name__


# ---------------------------------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------------------------------
def make_block(model, device, seed):
    """MixtralSparseMoeBlock of the model's sizes, bf16, weights ~ N(0, 1/fan_in) (values O(1) at every size)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    m = MODELS[model]
    config = MixtralConfig(hidden_size=m["H"], intermediate_size=m["F"], num_local_experts=m["E"],
                           num_experts_per_tok=m["k"], num_hidden_layers=1, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=128, router_jitter_noise=0.0,
                           experts_implementation="eager")
    with torch.device("meta"):  # no float32 copy of the weights is ever allocated (Mixtral: 5.6 GB)
        block = MixtralSparseMoeBlock(config).to(torch.bfloat16)
    block = block.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + m["model_id"])
    H, F = m["H"], m["F"]
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 1.0 / math.sqrt(H), generator=gen)
        block.experts.gate_up_proj.normal_(0.0, 1.0 / math.sqrt(H), generator=gen)
        block.experts.down_proj.normal_(0.0, 1.0 / math.sqrt(F), generator=gen)
    block.train()
    return config, block


def make_inputs(model, T, device, seed):
    H = MODELS[model]["H"]
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + MODELS[model]["model_id"] * 1009 + T)
    x = torch.randn(1, T, H, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
    dy = torch.randn(1, T, H, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
    return x, dy


def params_of(block):
    """(name, parameter) in kmoe order: router, gate_up (w1;w3), down (w2)."""
    return [("gate", block.gate.weight), ("gate_up", block.experts.gate_up_proj), ("down", block.experts.down_proj)]


# ---------------------------------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn, warmup, reps):
        """Per-step times in ms after `warmup` untimed steps."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for a, b in events:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in events]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    def memory(self, fn):
        """(extra, peak_delta) bytes of one call of fn, which returns the tensors it keeps; None on CPU."""
        if not self.cuda:
            out = fn()
            del out
            return None, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kept = sum(t.untyped_storage().nbytes() for t in out if t is not None)
        del out
        return peak - before - kept, peak - before


def nbytes(t):
    return t.numel() * t.element_size()


class BlockStep:
    """One forward + backward of the block; returns (y, dx, grads...) and leaves them referenced until the next call."""

    def __init__(self, block, x, dy):
        self.block, self.x, self.dy = block, x.detach().clone().requires_grad_(True), dy
        self.params = [p for _, p in params_of(block)]
        self.last = None

    def reset(self):
        """Drop the last step's outputs and gradients, as a training loop does before the next forward."""
        self.last = None
        self.x.grad = None
        for p in self.params:
            p.grad = None

    def __call__(self):
        self.reset()
        y = self.block(self.x)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(self.dy)  # = d/d(.) of L = sum(y * dy)
        self.last = [y] + [self.x.grad] + [p.grad for p in self.params]
        return self.last

    def fresh(self):
        out = self()
        self.last = None
        return out


class DenseStep:
    """The roofline: one bf16 matmul chain with the expert GEMMs' FLOPs on M = T*k rows, no routing and no elementwise
    work (the SwiGLU backward's output dh is a fixed random tensor). forward 6*M*H*F, backward 12*M*H*F:
      h = a @ w13^T [M,2F] (4MHF); o = h[:, :F] @ w2^T [M,H] (2MHF);
      dg = do @ w2 [M,F] (2MHF); dw2 = do^T @ h[:, :F] [H,F] (2MHF); da = dh @ w13 [M,H] (4MHF); dw13 = dh^T @ a (4MHF).
    Kept outputs (o, da, dw13, dw2, dg) are excluded from extra memory like a block's y/dx/grads."""

    def __init__(self, model, T, device, seed):
        m = MODELS[model]
        M, H, F = T * m["k"], m["H"], m["F"]
        gen = torch.Generator(device=device).manual_seed(seed * 1000003 + m["model_id"] * 7 + T)
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=device) * scale).to(torch.bfloat16)
        self.a, self.do, self.dh = rnd(M, H), rnd(M, H), rnd(M, 2 * F)
        self.w13, self.w2 = rnd(2 * F, H, scale=H ** -0.5), rnd(H, F, scale=F ** -0.5)
        self.F = F
        self.last = None

    def reset(self):
        self.last = None

    def __call__(self):
        self.reset()
        h = self.a @ self.w13.t()
        g = h[:, : self.F]
        o = g @ self.w2.t()
        dg = self.do @ self.w2
        dw2 = self.do.t() @ g
        da = self.dh @ self.w13
        dw13 = self.dh.t() @ self.a
        self.last = [o, dg, da, dw13, dw2]
        return self.last

    def fresh(self):
        out = self()
        self.last = None
        return out


# ---------------------------------------------------------------------------------------------------------------------
# checks and dumps
# ---------------------------------------------------------------------------------------------------------------------
def rel_l2(a, b):
    """||a - b|| / ||b|| in float64 accumulation, chunked over the first dim so big gradients need no big temporaries."""
    num = den = 0.0
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    step = max(1, (1 << 26) // max(1, a2.shape[1]))
    for i in range(0, a2.shape[0], step):
        d = a2[i:i + step].double() - b2[i:i + step].double()
        num += float((d * d).sum())
        bb = b2[i:i + step].double()
        den += float((bb * bb).sum())
    if not (math.isfinite(num) and math.isfinite(den)):
        return float("nan")
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


OUT_NAMES = ["y", "dx", "grad.gate", "grad.gate_up", "grad.down"]


def topk_mismatch(a, b):
    """Number of tokens whose chosen expert sets differ (order within the top-k ignored)."""
    return int((a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1).sum())


def compare_outputs(a, b):
    return {n: rel_l2(x, y) for n, x, y in zip(OUT_NAMES, a, b)}


def kmoe_layout(block):
    """Weights as kmoe stores them: router [E,H], w1/w3 [E,F,H] (rows 0..F-1 / F..2F-1 of gate_up_proj), w2 [E,H,F]."""
    F = block.experts.gate_up_proj.shape[1] // 2
    gu = block.experts.gate_up_proj.detach()
    return {"gate": block.gate.weight.detach(), "w1": gu[:, :F, :], "w3": gu[:, F:, :],
            "w2": block.experts.down_proj.detach()}


def split_grads(outs, F):
    y, dx, g_gate, g_gu, g_down = outs
    return {"y": y, "dx": dx, "grad.gate": g_gate, "grad.w1": g_gu[:, :F, :], "grad.w3": g_gu[:, F:, :],
            "grad.w2": g_down}


def save_atomic(tensors, path, metadata):
    from safetensors.torch import save_file
    host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(host, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_checkpoint(ckpt_dir, config, block):
    """A one-layer Hugging Face style Mixtral checkpoint with the legacy per-expert names that `kmoe block --checkpoint`
    reads: config.json + model.safetensors (bf16). Attention/embedding tensors are not written: a MoE block needs none."""
    os.makedirs(ckpt_dir, exist_ok=True)
    w = kmoe_layout(block)
    pre = "model.layers.0.block_sparse_moe."
    tensors = {pre + "gate.weight": w["gate"]}
    for j in range(w["w1"].shape[0]):
        for n in ("w1", "w2", "w3"):
            tensors[pre + "experts.%d.%s.weight" % (j, n)] = w[n][j]
    cfg = config.to_dict()
    for key in list(cfg):  # run-time choices, not model facts
        if "implementation" in key:
            del cfg[key]
    cfg["architectures"] = ["MixtralForCausalLM"]
    cfg["dtype"] = "bfloat16"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=ckpt_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(ckpt_dir, "config.json"))
    save_atomic(tensors, os.path.join(ckpt_dir, "model.safetensors"), {"format": "pt"})


def routing_of(block, x):
    """The peer router's own logits, weights and indices for x (the router is a module: call it directly)."""
    with torch.no_grad():
        logits, weights, idx = block.gate(x.reshape(-1, x.shape[-1]))
    return logits.float(), weights.float(), idx.to(torch.int64)


def reference_f32(block, x, dy):
    """The same block, weights, x and dy upcast exactly to float32, eager loop, full fp32 matmuls (no TF32): the
    yardstick for both kmoe and the peer (their bf16 errors, routing flips near ties included, are measured against it).
    Returns (outputs, topk_idx)."""
    import copy
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = copy.deepcopy(block).float()
        set_impl(ref, "eager")
        xf = x.float()
        outs = BlockStep(ref, xf, dy.float()).fresh()
        idx = routing_of(ref, xf)[2]
        del ref
        return [t.detach() for t in outs], idx
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def emit(rec, json_file):
    line = json.dumps(rec, sort_keys=False)
    print(line, flush=True)
    if json_file:
        json_file.write(line + "\n")
        json_file.flush()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None,
                   help="comma list of shape ids (default %s; known: %s)" % (",".join(DEFAULT_SHAPES), ",".join(SHAPES)))
    p.add_argument("--tiny", action="store_true", help="run only the tiny shape (CPU smoke runs)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--impls", default=",".join(ALL_IMPLS),
                   help="comma list (default eager,grouped_mm,dense); any other name is looked up in transformers' "
                        "experts registry (e.g. batched_mm: it copies the weights per token, so only for small shapes)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (default 5)")
    p.add_argument("--reps", type=int, default=20, help="timed steps; median and min reported (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dump", metavar="DIR", help="write per shape DIR/SHAPE.safetensors and per model DIR/MODEL-ckpt/")
    p.add_argument("--dump-shapes", metavar="IDS", help="with --dump: dump only these of the timed shapes")
    p.add_argument("--dump-impl", default="grouped_mm", help="whose outputs to dump (default grouped_mm, else eager)")
    p.add_argument("--no-ref-f32", dest="ref_f32", action="store_false",
                   help="with --dump: skip the float32 reference (*_f32 tensors; Mixtral: 5.6 GB more per shape)")
    p.add_argument("--no-checkpoint", action="store_true", help="with --dump: skip the HF-style checkpoint dirs")
    p.add_argument("--json", metavar="FILE", help="also append the JSON lines to FILE")
    a = p.parse_args(argv)
    if a.tiny and a.shapes:
        p.error("--tiny and --shapes are exclusive")
    a.shapes = ["tiny-T128"] if a.tiny else (a.shapes.split(",") if a.shapes else DEFAULT_SHAPES)
    for s in a.shapes:
        if s not in SHAPES:
            p.error("unknown shape %r (known: %s)" % (s, ", ".join(SHAPES)))
    a.impls = a.impls.split(",")
    if not all(a.impls):
        p.error("--impls has an empty name")
    if a.warmup < 0 or a.reps < 1:
        p.error("--warmup must be >= 0 and --reps >= 1")
    if (not a.ref_f32 or a.no_checkpoint or a.dump_shapes) and not a.dump:
        p.error("--no-ref-f32, --no-checkpoint and --dump-shapes need --dump")
    a.dump_shapes = a.dump_shapes.split(",") if a.dump_shapes else list(a.shapes)
    for s in a.dump_shapes:
        if s not in a.shapes:
            p.error("--dump-shapes: %r is not among the timed shapes (%s)" % (s, ",".join(a.shapes)))
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but torch.cuda.is_available() is False (torch %s); use --device cpu" % torch.__version__)
        return 2
    api = experts_api()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    common = {"device": dev_name, "torch": torch.__version__, "transformers": api["transformers"]}
    log("peers.py: device %s, torch %s, transformers %s, experts implementations registered: %s" % (
        dev_name, torch.__version__, api["transformers"], api["registry"]))
    unavailable = {i: impl_unavailable(api, i, device) for i in args.impls if i != "dense"}
    for i, why in unavailable.items():
        if why:
            log("note: %s unavailable: %s" % (i, why))
    json_file = open(args.json, "a") if args.json else None
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    timer = Timer(device)
    rows, failures = [], 0
    ckpt_written = set()

    for shape_id in args.shapes:
        model, T = SHAPES[shape_id]
        m = MODELS[model]
        H, F, E, k = m["H"], m["F"], m["E"], m["k"]
        flops = 18.0 * T * k * H * F
        base = dict(shape=model, T=T, H=H, F=F, E=E, k=k, flops=flops)
        log("== %s: T=%d H=%d F=%d E=%d k=%d, fwd+bwd expert GEMM FLOPs %.3g" % (shape_id, T, H, F, E, k, flops))
        config = block = x = dy = None
        outputs = {}  # impl -> bf16 outputs of the first step (for the cross-check and the dump)
        dump_this = bool(args.dump) and shape_id in args.dump_shapes
        if any(i != "dense" for i in args.impls) or dump_this:
            config, block = make_block(model, device, args.seed)
            x, dy = make_inputs(model, T, device, args.seed)
        for impl in args.impls:
            rec = dict(impl=impl, **base, ms_median=None, ms_min=None, tflops=None, extra_mem_bytes=None,
                       peak_delta_bytes=None, reps=args.reps, warmup=args.warmup, ok=False, **common)
            step = None
            try:
                if impl == "dense":
                    step = DenseStep(model, T, device, args.seed)
                    rec["dispatch"] = "torch.matmul bf16 chain, M=T*k rows"
                else:
                    if unavailable.get(impl):
                        raise RuntimeError("unavailable: " + unavailable[impl])
                    rec["dispatch"] = set_impl(block, impl)
                    step = BlockStep(block, x, dy)
                    first = step.fresh()
                    outputs[impl] = [t.detach().clone() for t in first]
                    del first
                    bad = [n for n, t in zip(OUT_NAMES, outputs[impl]) if not bool(torch.isfinite(t).all())]
                    if bad:
                        raise RuntimeError("non-finite outputs: " + ", ".join(bad))
                times = timer.run(step, args.warmup, args.reps)
                rec["ms_median"] = statistics.median(times)
                rec["ms_min"] = min(times)
                rec["tflops"] = flops / (rec["ms_median"] * 1e-3) / 1e12
                step.reset()  # before-step memory must not hold the last step's outputs and gradients
                rec["extra_mem_bytes"], rec["peak_delta_bytes"] = timer.memory(step.fresh)
                rec["ok"] = True
                if impl != "eager" and impl != "dense" and "eager" in outputs:
                    rels = compare_outputs(outputs[impl], outputs["eager"])
                    rec["check"] = {"vs": "eager", "tol": PEER_AGREE_TOL, "rel": rels}
                    if not all(v <= PEER_AGREE_TOL for v in rels.values()):  # NaN fails too
                        rec["ok"] = False
                        rec["error"] = "disagrees with eager beyond %g: %s" % (PEER_AGREE_TOL, rels)
            except Exception as exc:  # report and go on: one missing peer must not hide the others
                rec["error"] = one_line(exc)
                if not isinstance(exc, RuntimeError) or "unavailable" not in str(exc):
                    log(traceback.format_exc().rstrip())
            finally:
                if step is not None:
                    step.reset()
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            failures += 0 if rec["ok"] else 1
            emit(rec, json_file)
            rows.append(rec)

        if dump_this:
            try:
                dump_shape(args, shape_id, model, T, config, block, x, dy, outputs, ckpt_written, common)
            except Exception as exc:
                failures += 1
                log("error: dump of %s failed: %s" % (shape_id, one_line(exc)))
                log(traceback.format_exc().rstrip())
        del config, block, x, dy, outputs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(rows)
    if json_file:
        json_file.close()
    return 0 if failures == 0 else 1


def dump_shape(args, shape_id, model, T, config, block, x, dy, outputs, ckpt_written, common):
    m = MODELS[model]
    F = m["F"]
    impl = args.dump_impl if args.dump_impl in outputs else ("eager" if "eager" in outputs else None)
    if impl is None:  # no peer ran in the timing loop: run the dump impl once now
        impl = args.dump_impl
        set_impl(block, impl)
        outputs[impl] = [t.detach().clone() for t in BlockStep(block, x, dy).fresh()]
    pre = "layers.0."
    tensors = {pre + n: t for n, t in kmoe_layout(block).items()}
    tensors[pre + "x"], tensors[pre + "dy"] = x, dy
    for n, t in split_grads(outputs[impl], F).items():
        tensors[pre + n] = t.to("cpu").float()  # widen on the host: no float32 copies on the GPU
    logits, weights, idx = routing_of(block, x)
    tensors[pre + "router_logits"], tensors[pre + "topk_weight"], tensors[pre + "topk_idx"] = logits, weights, idx
    checks = {}
    if args.ref_f32:
        ref, ref_idx = reference_f32(block, x, dy)
        for n, t in split_grads(ref, F).items():
            tensors[pre + n + "_f32"] = t.to("cpu")
        tensors[pre + "topk_idx_f32"] = ref_idx
        checks["topk_tokens_differing_peer_vs_f32"] = topk_mismatch(idx, ref_idx)
        checks.update({"rel_%s_vs_f32" % n: v for n, v in compare_outputs([t.float() for t in outputs[impl]], ref).items()})
        del ref
    ckpt = "%s-ckpt" % model
    meta = {"shape": model, "shape_id": shape_id, "T": str(T), "H": str(m["H"]), "F": str(F), "E": str(m["E"]),
            "k": str(m["k"]), "peer_impl": impl, "seed": str(args.seed), "checkpoint": ckpt if not args.no_checkpoint
            else "", "checks": json.dumps(checks), "made_by": "perf/device/peers.py", **common}
    path = os.path.join(args.dump, shape_id + ".safetensors")
    save_atomic(tensors, path, meta)
    log("dumped %s (%s outputs%s)%s" % (path, impl, ", f32 reference" if args.ref_f32 else "",
                                         ": " + json.dumps(checks) if checks else ""))
    if not args.no_checkpoint and model not in ckpt_written:
        write_checkpoint(os.path.join(args.dump, ckpt), config, block)
        ckpt_written.add(model)
        log("dumped %s/ (config.json + model.safetensors, per-expert names)" % os.path.join(args.dump, ckpt))


def print_table(rows):
    log("")
    log("%-12s %6s %-11s %10s %10s %9s %11s  %s" % ("shape", "T", "impl", "ms median", "ms min", "TFLOP/s",
                                                   "extra GiB", "status"))
    for r in rows:
        f = lambda v, fmt: (fmt % v) if v is not None else "-"
        status = "ok" if r["ok"] else "FAIL " + r.get("error", "")
        if r.get("check"):
            status += " (vs eager max rel %.1e)" % max(r["check"]["rel"].values())
        extra = r["extra_mem_bytes"] / 2 ** 30 if r["extra_mem_bytes"] is not None else None
        log("%-12s %6d %-11s %10s %10s %9s %11s  %s" % (r["shape"], r["T"], r["impl"], f(r["ms_median"], "%.3f"),
                                                     f(r["ms_min"], "%.3f"), f(r["tflops"], "%.1f"),
                                                     f(extra, "%.3f"), status[:160]))


if __name__ == "__main__":
    sys.exit(main())
