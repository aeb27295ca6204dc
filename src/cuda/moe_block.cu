// The MoE block on the GPU, forward and backward, in two layouts (ScatterMoE scattered rows, MegaBlocks padded
// blocks), composed from the kernels of this folder. Everything is enqueued on one stream; with the kernel engine no
// step waits for the host, the cuBLAS engine waits once per forward for the group offsets (kernels.hpp, GemmEngine).
#include "common.cuh"

#include <kmoe/core/cuda/cutlass_grouped.hpp>

#include <nvtx3/nvToolsExt.h>

#include <string>

namespace kmoe::core::cuda {

namespace {

/// A profiling range named after the API and the path taken (STYLE habit 7), e.g. kmoe::moe_forward[cuda,padded,cublas].
class Range {
 public:
  Range(const char* api, const MoeSaved& m) {
    const std::string name = std::string(api) + "[cuda," + (m.path == MoePath::Padded ? "padded," : "scattered,") +
                             (m.cublas ? "cublas]" : m.cutlass ? "cutlass]" : "kernel]");
    nvtxRangePushA(name.c_str());
  }
  ~Range() { nvtxRangePop(); }
  Range(const Range&) = delete;
  Range& operator=(const Range&) = delete;
};

std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }

struct Sizes {
  std::int64_t pairs, rows;  // rows = P (scattered) or the padded capacity
};

Sizes sizes_of(const MoeShape& s, MoePath path) {
  const std::int64_t pairs = s.tokens * s.k;
  const std::int64_t rows =
      path == MoePath::Padded ? pairs + std::int64_t(s.experts) * (kGemmTileRows - 1) : pairs;
  return {pairs, rows};
}

/// Backward scratch beyond the forward's saved buffers: d_w [P] and d_logits [T,E] fp32, the routing workspace.
/// Everything of [R,·] size reuses a saved forward buffer once it is dead (moe_backward's comment says which), so the
/// workspace is what the forward keeps and no more (perf/NOTES.md: 6F+4H -> 3F+2H bf16 per row).
std::size_t scratch_bytes(const MoeShape& s, MoePath path) {
  const Sizes z = sizes_of(s, path);
  return align256(sizeof(float) * z.pairs) + align256(sizeof(float) * s.tokens * s.experts) +
         align256(routing_backward_workspace_bytes(s.tokens, s.experts));
}

void check_shape(const MoeShape& s) {
  constexpr const char* fn = "kmoe::core::cuda::moe";
  KMOE_CHECK_INPUT(s.tokens >= 0 && s.hidden > 0 && s.ffn > 0 && s.experts > 0, fn, ": shape T=", s.tokens,
                   " H=", s.hidden, " F=", s.ffn, " E=", s.experts);
  KMOE_CHECK_INPUT(s.hidden % 8 == 0 && s.ffn % 8 == 0 && s.shared_ffn % 8 == 0 && s.shared_ffn >= 0, fn,
                   ": hidden ", s.hidden, ", ffn ", s.ffn, " and shared ffn ", s.shared_ffn,
                   " must be multiples of 8 (16-byte rows)");
  KMOE_CHECK_INPUT(s.k >= 1 && s.k <= s.experts && s.k <= 32, fn, ": top_k = ", s.k, " outside [1, min(",
                   s.experts, ", 32)]");
}

/// The expert GEMMs go to the engine moe_forward chose.
void expert_gemm(const GroupedGemmArgs& a, const MoeSaved& m, cudaStream_t stream) {
  if (m.cublas) detail::grouped_gemm_cublas(a, m.host_offsets, stream);
  else if (m.cutlass) grouped_gemm_cutlass(a, m.cutlass_work, stream);
  else grouped_gemm(a, stream);
}
void expert_gemm_tn(const GroupedGemmTNArgs& a, const MoeSaved& m, cudaStream_t stream) {
  if (m.cublas) detail::grouped_gemm_tn_cublas(a, m.host_offsets, stream);
  else if (m.cutlass) grouped_gemm_tn_cutlass(a, m.cutlass_work, stream);
  else grouped_gemm_tn(a, stream);
}
/// The library engines (cuBLAS, CUTLASS) cannot read or write rows through the plan: x is gathered into expert
/// order first and their outputs stay in sorted-row order.
bool sorted_rows(const MoeSaved& m) { return m.cublas || m.cutlass; }
/// Where pair p's expert output row lives: padded blocks, sorted rows (library engines), or pair order (nullptr).
const std::int64_t* out_row_map(const MoeSaved& m) {
  if (m.path == MoePath::Padded) return m.plan.pair_padded_row;
  return sorted_rows(m) ? m.plan.pair_row : nullptr;
}
/// The engine that runs: Auto picks by the size of one expert's GEMMs (GemmEngine's comment has the measurements).
GemmEngine resolve_engine(GemmEngine requested, const MoeShape& s, std::int64_t pairs) {
  const bool cutlass = cutlass_grouped_available();
  if (requested == GemmEngine::Cutlass)
    KMOE_CHECK_USAGE(cutlass, "kmoe::core::cuda::moe_forward: GemmEngine::Cutlass needs a build with "
                     "KMOE_ENABLE_CUTLASS and a Hopper (sm_90) device");
  if (requested != GemmEngine::Auto) return requested;
  const std::int64_t rows = pairs / s.experts;  // average rows per expert
  if (cutlass)
    return double(rows) * s.ffn * s.hidden >= kCublasMinExpertWork ? GemmEngine::Cublas : GemmEngine::Cutlass;
  return rows >= 512 ? GemmEngine::Cublas : GemmEngine::Kernel;
}

/// Whether an expert GEMM fuses SwiGLU into its epilogue: kmoe's kernel only (cuBLAS and CUTLASS here have none), unless
/// MoeSaved::fuse_swiglu is off. routed: the routed experts (engine chosen by moe_forward); the shared expert always
/// runs on kmoe's kernel.
bool fused_swiglu(const MoeSaved& m, bool routed) { return m.fuse_swiglu && !(routed && sorted_rows(m)); }
void run_gemm(const GroupedGemmArgs& a, const MoeSaved& m, bool routed, cudaStream_t stream) {
  if (routed) expert_gemm(a, m, stream);
  else grouped_gemm(a, stream);
}

/// `up` writes h13 = rows·[W1;W3]ᵀ to up.c_bf16 (b_split = F); then act = silu(h1)·h3: one GEMM with the SwiGLU
/// epilogue (writing h13 and act; h13 is never read back) or the GEMM and swiglu_forward.
void up_projection_swiglu(GroupedGemmArgs up, bf16_t* act, const MoeSaved& m, bool routed, cudaStream_t stream) {
  if (fused_swiglu(m, routed)) {
    up.epilogue = GemmEpilogue::SwigluForward;
    up.h13_out = up.c_bf16;
    up.ld_h13 = up.ldc;
    up.c_bf16 = act;
    up.ldc = up.b_split;
    grouped_gemm(up, stream);
    return;
  }
  run_gemm(up, m, routed, stream);
  swiglu_forward(up.c_bf16, up.rows, up.b_split, act, stream);
}

/// `g` writes d_act = d_out·W2 to g.c_bf16 (n = F); then dh13 = SwiGLU backward(h13, d_act): one GEMM whose epilogue
/// reads h13 and writes dh13 (d_act never reaches memory) or the GEMM and swiglu_backward.
void act_grad_swiglu(GroupedGemmArgs g, const bf16_t* h13, bf16_t* dh13, const MoeSaved& m, bool routed,
                     cudaStream_t stream) {
  if (fused_swiglu(m, routed)) {
    g.epilogue = GemmEpilogue::SwigluBackward;
    g.h13_in = h13;
    g.ld_h13 = 2 * g.n;
    g.c_bf16 = dh13;
    g.ldc = 2 * g.n;
    grouped_gemm(g, stream);
    return;
  }
  run_gemm(g, m, routed, stream);
  swiglu_backward(h13, g.c_bf16, g.rows, g.n, dh13, stream);
}

/// The shared expert (one dense SwiGLU MLP over all tokens): y = Ws2 (silu(Ws1 x) * Ws3 x), written (not added).
void shared_forward(const bf16_t* x, const MoeWeights& w, const MoeSaved& m, bf16_t* y, cudaStream_t stream) {
  const MoeShape& s = m.shape;
  const std::int64_t S = s.shared_ffn;
  GroupedGemmArgs up;
  up.rows = s.tokens;
  up.n = 2 * S;
  up.k = s.hidden;
  up.a = x;
  up.lda = s.hidden;
  up.b_trans = true;
  up.b0 = w.shared_w1;
  up.b1 = w.shared_w3;
  up.b_split = S;
  up.c_bf16 = m.shared_h13;
  up.ldc = 2 * S;
  up_projection_swiglu(up, m.shared_act, m, false, stream);
  GroupedGemmArgs down;
  down.rows = s.tokens;
  down.n = s.hidden;
  down.k = S;
  down.a = m.shared_act;
  down.lda = S;
  down.b_trans = true;
  down.b0 = w.shared_w2;
  down.c_bf16 = y;
  down.ldc = s.hidden;
  grouped_gemm(down, stream);
}

/// Backward of shared_forward: dx += ..., d_shared_w* overwritten. Like moe_backward it consumes the forward's
/// buffers: d_act goes over shared_act once dWs2 has read it, dh13 over shared_h13 in place.
void shared_backward(const bf16_t* x, const MoeWeights& w, const MoeSaved& m, const bf16_t* dy, const MoeGrads& g,
                     cudaStream_t stream) {
  const MoeShape& s = m.shape;
  const std::int64_t S = s.shared_ffn;
  GroupedGemmTNArgs t2;
  t2.rows = s.tokens;
  t2.m = s.hidden;
  t2.n = S;
  t2.a = dy;
  t2.lda = s.hidden;
  t2.b = m.shared_act;
  t2.ldb = S;
  t2.c0 = g.d_shared_w2;
  grouped_gemm_tn(t2, stream);
  bf16_t* d_act = m.shared_act;
  bf16_t* dh13 = m.shared_h13;
  GroupedGemmArgs a;
  a.rows = s.tokens;
  a.n = S;
  a.k = s.hidden;
  a.a = dy;
  a.lda = s.hidden;
  a.b_trans = false;
  a.b0 = w.shared_w2;  // [H,S] = [K,N]
  a.c_bf16 = d_act;
  a.ldc = S;
  act_grad_swiglu(a, m.shared_h13, dh13, m, false, stream);
  GroupedGemmArgs b;
  b.rows = s.tokens;
  b.n = s.hidden;
  b.k = 2 * S;
  b.a = dh13;
  b.lda = 2 * S;
  b.b_trans = false;
  b.b0 = w.shared_w1;
  b.b1 = w.shared_w3;
  b.b_split = S;
  b.c_f32 = g.dx;
  b.ldc = s.hidden;
  b.accumulate = true;
  grouped_gemm(b, stream);
  GroupedGemmTNArgs t;
  t.rows = s.tokens;
  t.m = 2 * S;
  t.n = s.hidden;
  t.a = dh13;
  t.lda = 2 * S;
  t.b = x;
  t.ldb = s.hidden;
  t.c0 = g.d_shared_w1;
  t.c1 = g.d_shared_w3;
  t.c_split = S;
  grouped_gemm_tn(t, stream);
}

}  // namespace

std::size_t moe_workspace_bytes(const MoeShape& s, MoePath path) {
  check_shape(s);
  const Sizes z = sizes_of(s, path);
  const std::size_t f4 = sizeof(float), b = sizeof(bf16_t);
  std::size_t total = align256(dispatch_plan_bytes(s.tokens, s.experts, s.k));
  total += 2 * align256(f4 * s.tokens * s.experts);                       // logits, probs
  total += align256(sizeof(std::int64_t) * z.pairs) + align256(f4 * z.pairs);  // topk_idx, topk_weight
  total += align256(b * z.rows * 2 * s.ffn) + align256(b * z.rows * s.ffn) + align256(b * z.rows * s.hidden);
  total += align256(b * z.rows * s.hidden);                                // xg
  total += align256(b * s.tokens * 3 * std::int64_t(s.shared_ffn));      // shared h13, act
  total += align256(cutlass_grouped_workspace_bytes(s.experts));         // CUTLASS engine's per-group arrays
  return total + scratch_bytes(s, path);
}

MoeSaved moe_carve(void* workspace, const MoeShape& s, MoePath path) {
  check_shape(s);
  KMOE_CHECK_INPUT(detail::aligned16(workspace), "kmoe::core::cuda::moe_carve: workspace is not aligned");
  const Sizes z = sizes_of(s, path);
  auto* at = static_cast<unsigned char*>(workspace);
  auto take = [&](std::size_t bytes) {
    void* p = at;
    at += align256(bytes);
    return p;
  };
  MoeSaved m;
  m.shape = s;
  m.path = path;
  m.plan = dispatch_plan_carve(take(dispatch_plan_bytes(s.tokens, s.experts, s.k)), s.tokens, s.experts, s.k);
  m.logits = static_cast<float*>(take(sizeof(float) * s.tokens * s.experts));
  m.probs = static_cast<float*>(take(sizeof(float) * s.tokens * s.experts));
  m.topk_idx = static_cast<std::int64_t*>(take(sizeof(std::int64_t) * z.pairs));
  m.topk_weight = static_cast<float*>(take(sizeof(float) * z.pairs));
  m.h13 = static_cast<bf16_t*>(take(sizeof(bf16_t) * z.rows * 2 * s.ffn));
  m.act = static_cast<bf16_t*>(take(sizeof(bf16_t) * z.rows * s.ffn));
  m.out = static_cast<bf16_t*>(take(sizeof(bf16_t) * z.rows * s.hidden));
  m.xg = static_cast<bf16_t*>(take(sizeof(bf16_t) * z.rows * s.hidden));
  if (s.shared_ffn > 0) {
    m.shared_h13 = static_cast<bf16_t*>(take(sizeof(bf16_t) * s.tokens * 3 * std::int64_t(s.shared_ffn)));
    m.shared_act = m.shared_h13 + s.tokens * 2 * std::int64_t(s.shared_ffn);
  }
  m.scratch_bytes = scratch_bytes(s, path);
  m.scratch = take(m.scratch_bytes);
  m.cutlass_work = take(cutlass_grouped_workspace_bytes(s.experts));
  return m;
}

void moe_forward(const bf16_t* x, const MoeWeights& w, MoeSaved& m, bf16_t* y, cudaStream_t stream) {
  const MoeShape& s = m.shape;
  const Sizes z = sizes_of(s, m.path);
  const DispatchPlan& plan = m.plan;
  routing_forward(x, w.gate, s.tokens, s.hidden, s.experts, s.k, m.logits, m.probs, m.topk_idx, m.topk_weight, stream);
  if (s.tokens == 0) return;
  dispatch_plan_build(m.topk_idx, plan, stream);
  const bool padded = m.path == MoePath::Padded;
  const GemmEngine engine = resolve_engine(m.engine, s, z.pairs);
  m.cublas = engine == GemmEngine::Cublas;
  m.cutlass = engine == GemmEngine::Cutlass;
  if (m.cublas) {  // the one host synchronisation of this engine: the group offsets
    m.host_offsets.resize(s.experts + 1);
    KMOE_CUDA_CHECK(cudaMemcpyAsync(m.host_offsets.data(), padded ? plan.padded_offsets : plan.offsets,
                                    sizeof(std::int64_t) * (s.experts + 1), cudaMemcpyDeviceToHost, stream));
    KMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  const Range range("kmoe::moe_forward", m);
  // x in expert order: padded blocks (MegaBlocks), or sorted rows when a library engine cannot read rows through
  // the plan.
  const bool gathered = padded || sorted_rows(m);
  if (gathered)
    gather_rows(x, s.hidden, padded ? plan.padded_pair : plan.sorted_pair, s.k, nullptr, m.xg, z.rows, stream);

  // h13 = rows · [W1;W3]ᵀ per expert: scattered reads x's token rows through the plan, padded reads the blocks.
  GroupedGemmArgs up;
  up.groups = s.experts;
  up.rows = z.rows;
  up.n = 2 * std::int64_t(s.ffn);
  up.k = s.hidden;
  up.offsets = padded ? plan.padded_offsets : plan.offsets;
  up.tile_offsets = padded ? plan.padded_tile_offsets : plan.tile_offsets;
  up.a = gathered ? m.xg : x;
  up.lda = s.hidden;
  up.a_index = gathered ? nullptr : plan.sorted_pair;
  up.a_div = s.k;
  up.b_trans = true;
  up.b0 = w.w1;
  up.b1 = w.w3;
  up.b_split = s.ffn;
  up.c_bf16 = m.h13;
  up.ldc = 2 * std::int64_t(s.ffn);
  up_projection_swiglu(up, m.act, m, true, stream);

  // out = act · W2ᵀ: scattered writes each row back to its pair's place (pair order), padded keeps block order.
  GroupedGemmArgs down = up;
  down.n = s.hidden;
  down.k = s.ffn;
  down.a = m.act;
  down.lda = s.ffn;
  down.a_index = nullptr;
  down.b0 = w.w2;
  down.b1 = nullptr;
  down.b_split = 0;
  down.c_bf16 = m.out;
  down.ldc = s.hidden;
  down.c_index = gathered ? nullptr : plan.sorted_pair;
  expert_gemm(down, m, stream);

  // The shared expert writes y first; the routed experts' combine adds to it.
  if (s.shared_ffn > 0) shared_forward(x, w, m, y, stream);
  combine_rows(m.out, s.hidden, out_row_map(m), m.topk_weight, s.tokens, s.k, y, nullptr, s.shared_ffn > 0, stream);
}

void moe_backward(const bf16_t* x, const MoeWeights& w, const MoeSaved& m, const bf16_t* dy, const MoeGrads& grads,
                  cudaStream_t stream) {
  float *dx = grads.dx, *d_gate = grads.d_gate, *dw1 = grads.dw1, *dw3 = grads.dw3, *dw2 = grads.dw2;
  const MoeShape& s = m.shape;
  const Sizes z = sizes_of(s, m.path);
  const DispatchPlan& plan = m.plan;
  const bool padded = m.path == MoePath::Padded;
  KMOE_CHECK_INPUT((dw1 != nullptr) != (grads.dw1_bf16 != nullptr) && (dw3 != nullptr) != (grads.dw3_bf16 != nullptr) &&
                       (dw2 != nullptr) != (grads.dw2_bf16 != nullptr),
                   "kmoe::core::cuda::moe_backward: give each expert weight gradient (dw1, dw3, dw2) either fp32 or "
                   "bf16 storage, not both or neither");
  if (s.tokens == 0) {
    auto zero = [&](void* p, std::size_t bytes) {
      if (p && bytes) KMOE_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream));
    };
    const std::size_t expert_elems = std::size_t(s.experts) * s.ffn * s.hidden, shared_elems = std::size_t(s.shared_ffn) * s.hidden;
    zero(d_gate, sizeof(float) * s.experts * s.hidden);
    for (float* g : {dw1, dw3, dw2}) zero(g, sizeof(float) * expert_elems);
    for (bf16_t* g : {grads.dw1_bf16, grads.dw3_bf16, grads.dw2_bf16}) zero(g, sizeof(bf16_t) * expert_elems);
    if (s.shared_ffn > 0)
      for (float* g : {grads.d_shared_w1, grads.d_shared_w3, grads.d_shared_w2}) zero(g, sizeof(float) * shared_elems);
    return;
  }
  auto* at = static_cast<unsigned char*>(m.scratch);
  auto take = [&](std::size_t bytes) {
    void* p = at;
    at += align256(bytes);
    return p;
  };
  auto* d_w = static_cast<float*>(take(sizeof(float) * z.pairs));
  auto* d_logits = static_cast<float*>(take(sizeof(float) * s.tokens * s.experts));
  void* route_work = take(routing_backward_workspace_bytes(s.tokens, s.experts));
  // The [R,·] tensors of the backward live in the forward's saved buffers, each taken once its last reader ran
  // (one stream: enqueue order is execution order). This is why a forward's MoeSaved serves one backward.
  bf16_t* d_out = m.out;    // after pair_dot read out
  bf16_t* d_act = m.act;    // after dW2 read act
  bf16_t* dh13 = m.h13;     // in place: swiglu_backward reads an element's h1, h3 before writing its dh1, dh3
  bf16_t* dx_rows = m.xg;   // after d[W1;W3] read xg (the scattered kernel engine never used xg)

  const Range range("kmoe::moe_backward", m);
  const std::int64_t* out_row = out_row_map(m);  // pair -> row of m.out
  const bool gathered = padded || sorted_rows(m);
  // y = sum_s w_s out_s: d w_s = <dy, out_s>; d out_s = w_s dy, laid out like the expert rows (sorted or padded).
  pair_dot(dy, m.out, s.hidden, out_row, s.tokens, s.k, d_w, stream);
  gather_rows(dy, s.hidden, padded ? plan.padded_pair : plan.sorted_pair, s.k, m.topk_weight, d_out, z.rows, stream);
  const std::int64_t* offsets = padded ? plan.padded_offsets : plan.offsets;

  // dW2_e = d_out_eᵀ · act_e (first: act's buffer becomes d_act next)
  GroupedGemmTNArgs t2;
  t2.groups = s.experts;
  t2.offsets = offsets;
  t2.m = s.hidden;
  t2.n = s.ffn;
  t2.a = d_out;
  t2.lda = s.hidden;
  t2.b = m.act;
  t2.ldb = s.ffn;
  t2.c0 = dw2;
  t2.c0_bf16 = grads.dw2_bf16;
  expert_gemm_tn(t2, m, stream);

  GroupedGemmArgs g;
  g.groups = s.experts;
  g.rows = z.rows;
  g.offsets = offsets;
  g.tile_offsets = padded ? plan.padded_tile_offsets : plan.tile_offsets;
  g.b_trans = false;
  // d_act = d_out · W2 ([R,H]·[H,F])
  g.n = s.ffn;
  g.k = s.hidden;
  g.a = d_out;
  g.lda = s.hidden;
  g.b0 = w.w2;
  g.c_bf16 = d_act;
  g.ldc = s.ffn;
  act_grad_swiglu(g, m.h13, dh13, m, true, stream);

  // Weight gradients d[W1;W3]_e = dh13_eᵀ · x_e (before dx: xg's buffer becomes dx_rows next).
  GroupedGemmTNArgs t;
  t.groups = s.experts;
  t.offsets = offsets;
  t.m = 2 * std::int64_t(s.ffn);
  t.n = s.hidden;
  t.a = dh13;
  t.lda = 2 * std::int64_t(s.ffn);
  t.b = gathered ? m.xg : x;
  t.ldb = s.hidden;
  t.b_index = gathered ? nullptr : plan.sorted_pair;
  t.b_div = s.k;
  t.c0 = dw1;
  t.c1 = dw3;
  t.c0_bf16 = grads.dw1_bf16;
  t.c1_bf16 = grads.dw3_bf16;
  t.c_split = s.ffn;
  expert_gemm_tn(t, m, stream);

  // dx_rows = dh13 · [W1;W3] ([R,2F]·[2F,H]); scattered rows go back to pair order
  g.n = s.hidden;
  g.k = 2 * std::int64_t(s.ffn);
  g.a = dh13;
  g.lda = 2 * std::int64_t(s.ffn);
  g.b0 = w.w1;
  g.b1 = w.w3;
  g.b_split = s.ffn;
  g.c_bf16 = dx_rows;
  g.ldc = s.hidden;
  g.c_index = gathered ? nullptr : plan.sorted_pair;
  expert_gemm(g, m, stream);
  combine_rows(dx_rows, s.hidden, out_row, nullptr, s.tokens, s.k, nullptr, dx, false, stream);

  if (s.shared_ffn > 0) shared_backward(x, w, m, dy, grads, stream);
  routing_backward(x, w.gate, m.probs, m.topk_idx, m.topk_weight, d_w, s.tokens, s.hidden, s.experts, s.k, d_logits,
                   d_gate, dx, route_work, stream);
}

}  // namespace kmoe::core::cuda
