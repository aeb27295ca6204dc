// The expert MLP primitive (kernels.hpp, ExpertMlp): the grouped GEMMs of one SwiGLU MLP per expert, forward and
// backward, on the engine the caller resolved, with SwiGLU fused into kmoe's GEMM epilogues where that engine allows.
// The MoE block itself (routing, plan, dispatch, combine around this) is composed in moe/.
#include "common.cuh"

#include <kmoe/core/cuda/cutlass_grouped.hpp>

#include <nvtx3/nvToolsExt.h>

#include <string>

namespace kmoe::core::cuda {

namespace {

/// A profiling range named after the API and the engine taken, e.g. kmoe::expert_mlp_forward[cutlass].
class Range {
 public:
  Range(const char* api, GemmEngine e) {
    const std::string name = std::string(api) +
                             (e == GemmEngine::Cublas ? "[cublas]" : e == GemmEngine::Cutlass ? "[cutlass]" : "[kernel]");
    nvtxRangePushA(name.c_str());
  }
  ~Range() { nvtxRangePop(); }
  Range(const Range&) = delete;
  Range& operator=(const Range&) = delete;
};

void gemm(const GroupedGemmArgs& a, const ExpertMlp& m, cudaStream_t stream) {
  switch (m.engine) {
    case GemmEngine::Cublas: return detail::grouped_gemm_cublas(a, *m.host_offsets, m.cublas, stream);
    case GemmEngine::Cutlass: return grouped_gemm_cutlass(a, m.cutlass_work, stream);
    default: return grouped_gemm(a, stream);
  }
}
void gemm_tn(const GroupedGemmTNArgs& a, const ExpertMlp& m, cudaStream_t stream) {
  switch (m.engine) {
    case GemmEngine::Cublas: return detail::grouped_gemm_tn_cublas(a, *m.host_offsets, m.cublas, stream);
    case GemmEngine::Cutlass: return grouped_gemm_tn_cutlass(a, m.cutlass_work, stream);
    default: return grouped_gemm_tn(a, stream);
  }
}

/// SwiGLU in the GEMM epilogue: kmoe's kernel only (cuBLAS and CUTLASS here have none), unless switched off.
bool fused(const ExpertMlp& m) { return m.fuse_swiglu && m.engine == GemmEngine::Kernel; }

void check(const ExpertMlp& m, const char* fn) {
  KMOE_CHECK_INPUT(m.groups >= 1 && m.rows >= 0 && m.hidden > 0 && m.ffn > 0, fn, ": groups ", m.groups, ", rows ",
                   m.rows, ", hidden ", m.hidden, ", ffn ", m.ffn);
  KMOE_CHECK_INPUT(m.engine != GemmEngine::Auto, fn, ": resolve the engine first (resolve_gemm_engine)");
  KMOE_CHECK_INPUT(m.engine == GemmEngine::Kernel || m.row_index == nullptr, fn,
                   ": only the kernel engine reads and writes rows through an index");
  KMOE_CHECK_INPUT(m.engine != GemmEngine::Cublas ||
                       (m.host_offsets && static_cast<int>(m.host_offsets->size()) == m.groups + 1),
                   fn, ": the cuBLAS engine needs the ", m.groups + 1, " group offsets on the host");
  KMOE_CHECK_INPUT(m.engine != GemmEngine::Cutlass || m.cutlass_work != nullptr, fn,
                   ": the CUTLASS engine needs its workspace");
}

/// The GEMM arguments every expert GEMM shares: groups, rows, offsets.
GroupedGemmArgs grouped_args(const ExpertMlp& m) {
  GroupedGemmArgs a;
  a.groups = m.groups;
  a.rows = m.rows;
  a.offsets = m.offsets;
  a.tile_offsets = m.tile_offsets;
  return a;
}

}  // namespace

GemmEngine resolve_gemm_engine(GemmEngine requested, std::int64_t rows_per_expert, int ffn, int hidden) {
  const bool cutlass = cutlass_grouped_available();
  if (requested == GemmEngine::Cutlass)
    KMOE_CHECK_USAGE(cutlass, "kmoe: the CUTLASS GEMM engine needs a build with KMOE_ENABLE_CUTLASS and a Hopper "
                     "(sm_90) device");
  if (requested != GemmEngine::Auto) return requested;
  if (cutlass)
    return double(rows_per_expert) * ffn * hidden >= kCublasMinExpertWork ? GemmEngine::Cublas : GemmEngine::Cutlass;
  return rows_per_expert >= 512 ? GemmEngine::Cublas : GemmEngine::Kernel;
}

void expert_mlp_forward(const ExpertMlp& m, const bf16_t* x, bf16_t* h13, bf16_t* act, bf16_t* out,
                        cudaStream_t stream) {
  check(m, "kmoe::core::cuda::expert_mlp_forward");
  const Range range("kmoe::expert_mlp_forward", m.engine);
  const std::int64_t F = m.ffn, H = m.hidden;
  // h13 = x · [W1;W3]ᵀ, then act = silu(h1)·h3: one GEMM with the SwiGLU epilogue (writing h13 and act) or the GEMM
  // and swiglu_forward.
  GroupedGemmArgs up = grouped_args(m);
  up.n = 2 * F;
  up.k = H;
  up.a = x;
  up.lda = H;
  up.a_index = m.row_index;
  up.a_div = m.row_div;
  up.b_trans = true;
  up.b0 = m.w1;
  up.b1 = m.w3;
  up.b_split = F;
  if (fused(m)) {
    up.epilogue = GemmEpilogue::SwigluForward;
    up.h13_out = h13;
    up.ld_h13 = 2 * F;
    up.c_bf16 = act;
    up.ldc = F;
    grouped_gemm(up, stream);
  } else {
    up.c_bf16 = h13;
    up.ldc = 2 * F;
    gemm(up, m, stream);
    swiglu_forward(h13, m.rows, F, act, stream);
  }
  // out = act · W2ᵀ, written back through the row index (pair order) when there is one.
  GroupedGemmArgs down = grouped_args(m);
  down.n = H;
  down.k = F;
  down.a = act;
  down.lda = F;
  down.b_trans = true;
  down.b0 = m.w2;
  down.c_bf16 = out;
  down.ldc = H;
  down.c_index = m.row_index;
  gemm(down, m, stream);
}

void expert_mlp_backward(const ExpertMlp& m, const bf16_t* x, bf16_t* h13, bf16_t* act, const bf16_t* d_out,
                         const ExpertMlpGrads& g, cudaStream_t stream) {
  constexpr const char* fn = "kmoe::core::cuda::expert_mlp_backward";
  check(m, fn);
  KMOE_CHECK_INPUT((g.dw1 != nullptr) != (g.dw1_bf16 != nullptr) && (g.dw3 != nullptr) != (g.dw3_bf16 != nullptr) &&
                       (g.dw2 != nullptr) != (g.dw2_bf16 != nullptr),
                   fn, ": give each weight gradient (dw1, dw3, dw2) either fp32 or bf16 storage, not both or neither");
  KMOE_CHECK_INPUT((g.dx_rows != nullptr) != (g.dx_f32 != nullptr) && (g.dx_f32 == nullptr || m.offsets == nullptr),
                   fn, ": give dx_rows (bf16) or, ungrouped, dx_f32 (accumulated)");
  const Range range("kmoe::expert_mlp_backward", m.engine);
  const std::int64_t F = m.ffn, H = m.hidden;
  // dW2_g = d_out_gᵀ · act_g (first: act's buffer becomes d_act next)
  GroupedGemmTNArgs t2;
  t2.groups = m.groups;
  t2.rows = m.rows;
  t2.offsets = m.offsets;
  t2.m = H;
  t2.n = F;
  t2.a = d_out;
  t2.lda = H;
  t2.b = act;
  t2.ldb = F;
  t2.c0 = g.dw2;
  t2.c0_bf16 = g.dw2_bf16;
  gemm_tn(t2, m, stream);

  // d_act = d_out · W2 ([R,H]·[H,F]) into act's buffer, then dh13 = SwiGLU backward over h13 in place: one GEMM whose
  // epilogue reads h13 and writes dh13 (d_act never reaches memory), or the GEMM and swiglu_backward.
  bf16_t* d_act = act;
  bf16_t* dh13 = h13;
  GroupedGemmArgs da = grouped_args(m);
  da.n = F;
  da.k = H;
  da.a = d_out;
  da.lda = H;
  da.b_trans = false;
  da.b0 = m.w2;
  if (fused(m)) {
    da.epilogue = GemmEpilogue::SwigluBackward;
    da.h13_in = h13;
    da.ld_h13 = 2 * F;
    da.c_bf16 = dh13;
    da.ldc = 2 * F;
    grouped_gemm(da, stream);
  } else {
    da.c_bf16 = d_act;
    da.ldc = F;
    gemm(da, m, stream);
    swiglu_backward(h13, d_act, m.rows, F, dh13, stream);
  }

  // d[W1;W3]_g = dh13_gᵀ · x_g (before dx: dx_rows may alias x)
  GroupedGemmTNArgs t;
  t.groups = m.groups;
  t.rows = m.rows;
  t.offsets = m.offsets;
  t.m = 2 * F;
  t.n = H;
  t.a = dh13;
  t.lda = 2 * F;
  t.b = x;
  t.ldb = H;
  t.b_index = m.row_index;
  t.b_div = m.row_div;
  t.c0 = g.dw1;
  t.c1 = g.dw3;
  t.c0_bf16 = g.dw1_bf16;
  t.c1_bf16 = g.dw3_bf16;
  t.c_split = F;
  gemm_tn(t, m, stream);

  // dx = dh13 · [W1;W3] ([R,2F]·[2F,H]): bf16 rows (through the row index) or added to fp32 dx.
  GroupedGemmArgs dx = grouped_args(m);
  dx.n = H;
  dx.k = 2 * F;
  dx.a = dh13;
  dx.lda = 2 * F;
  dx.b_trans = false;
  dx.b0 = m.w1;
  dx.b1 = m.w3;
  dx.b_split = F;
  dx.ldc = H;
  if (g.dx_f32) {
    dx.c_f32 = g.dx_f32;
    dx.accumulate = true;
  } else {
    dx.c_bf16 = g.dx_rows;
    dx.c_index = m.row_index;
  }
  gemm(dx, m, stream);
}

}  // namespace kmoe::core::cuda
