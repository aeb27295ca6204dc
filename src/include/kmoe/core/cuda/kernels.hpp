/// \file kernels.hpp
/// \brief kmoe's hand-written CUDA kernels (sm_90; bf16 storage, fp32 accumulation) behind raw pointers and a
/// stream. The .cu files under src/cuda include only CUDA headers and this header; the Kokkos side passes
/// `view.data()` and `space.cuda_stream()`.
///
/// Conventions. Every pointer is device memory, row-major. bf16 tensors are passed as their 16-bit patterns
/// (bf16_t = kmoe::bf16 = __nv_bfloat16 layout). T tokens, H hidden, F expert ffn, E experts, k slots per token;
/// pair p = t*k + s names slot s of token t, P = T*k pairs. Every function only enqueues work on `stream` and returns
/// without waiting, unless its comment says it blocks; none needs the host to learn split sizes (no host sync) — the
/// cuBLAS engine takes them from the caller. The MoE block is composed from these primitives in moe/
/// (MoeLayer<bf16, Kokkos::Cuda>, DistributedMoe<bf16, Kokkos::Cuda>); this header is internal (not installed).
/// Errors in arguments throw kmoe::InputError; failed CUDA calls throw kmoe::InternalError (check.hpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kmoe::core::cuda {

/// A bf16 value as its bit pattern (kmoe::bf16 and __nv_bfloat16 share this layout).
using bf16_t = std::uint16_t;

/// Row tile of the grouped GEMMs: the MegaBlocks padded layout rounds each expert's rows up to a multiple of it.
inline constexpr int kGemmTileRows = 128;

// ---- device -----------------------------------------------------------------------------------------------------

/// Number of visible CUDA devices; 0 when there is no driver or no device (never throws).
int device_count() noexcept;

/// "NAME (sm_XY, N SMs, M MiB)" of the current device. Blocks.
std::string device_description();

/// y[i] += a * x[i]: the device script's first check that kmoe's own .cu code runs.
void axpy(float a, const float* x, float* y, std::int64_t n, cudaStream_t stream);

/// Fills n bf16 values with uniform random numbers of standard deviation `scale` (counter-based hash of (seed, i)):
/// benchmark and test inputs made on the device (never zeros, which hide unwritten outputs and time differently).
void fill_random_bf16(bf16_t* out, std::int64_t n, float scale, std::uint64_t seed, cudaStream_t stream);

// ---- routing ----------------------------------------------------------------------------------------------------

/// Fused softmax -> top-k -> renormalise, one warp per token (E <= 256, k <= min(E, 32)).
/// Top-k is descending with ties to the lower expert index (torch.topk). probs may be nullptr (not stored).
/// \param logits      [in]  [T,E] fp32
/// \param probs       [out] [T,E] fp32 softmax over experts, or nullptr
/// \param topk_idx    [out] [T,k] int64
/// \param topk_weight [out] [T,k] fp32, the chosen probabilities divided by their sum
void routing_softmax_topk(const float* logits, std::int64_t tokens, int experts, int k, float* probs,
                          std::int64_t* topk_idx, float* topk_weight, cudaStream_t stream);

/// Routing forward: logits = x·Gᵀ (one cuBLAS GEMM, bf16 in, fp32 out; no host wait), then routing_softmax_topk.
void routing_forward(const bf16_t* x, const bf16_t* gate, std::int64_t tokens, int hidden, int experts, int k,
                     float* logits, float* probs, std::int64_t* topk_idx, float* topk_weight, cudaStream_t stream);

/// Routing backward through renormalisation (top-k selection is a constant) and softmax:
/// d_logits [T,E] fp32 from d_topk_weight, plus d_logits_add [T,E] fp32 when given (a router loss's gradient); then
/// d_gate = d_logitsᵀ·x [E,H] fp32 (overwritten) and dx [T,H] fp32 += d_logits·G.
/// \param work [scratch] routing_backward_workspace_bytes(T, E) bytes of device memory
std::size_t routing_backward_workspace_bytes(std::int64_t tokens, int experts);
void routing_backward(const bf16_t* x, const bf16_t* gate, const float* probs, const std::int64_t* topk_idx,
                      const float* topk_weight, const float* d_topk_weight, std::int64_t tokens, int hidden,
                      int experts, int k, float* d_logits, float* d_gate, float* dx, void* work, cudaStream_t stream,
                      const float* d_logits_add = nullptr);

// ---- dispatch plan ----------------------------------------------------------------------------------------------

/// Where each (token, slot) pair goes, built on the device from topk_idx alone (histogram, scan, stable grouping:
/// within an expert, pairs keep ascending p). All arrays are device memory carved from one buffer.
struct DispatchPlan {
  std::int64_t tokens = 0, pairs = 0, padded_capacity = 0;
  int experts = 0, k = 0;
  std::int64_t* counts = nullptr;           ///< [E] pairs routed to expert e
  std::int64_t* offsets = nullptr;          ///< [E+1] sorted rows of expert e are [offsets[e], offsets[e+1])
  std::int64_t* tile_offsets = nullptr;     ///< [E+1] prefix of ceil(counts/kGemmTileRows): GEMM row tiles
  std::int64_t* padded_offsets = nullptr;   ///< [E+1] MegaBlocks layout: each expert rounded up to kGemmTileRows
  std::int64_t* padded_tile_offsets = nullptr;  ///< [E+1] padded_offsets / kGemmTileRows
  std::int64_t* sorted_pair = nullptr;      ///< [P] sorted row -> pair
  std::int64_t* pair_row = nullptr;         ///< [P] pair -> sorted row
  std::int64_t* pair_padded_row = nullptr;  ///< [P] pair -> padded row
  std::int64_t* padded_pair = nullptr;      ///< [padded_capacity] padded row -> pair, -1 on padding rows
  std::int64_t* chunk_counts = nullptr;     ///< scratch: per-chunk histograms
};

/// Bytes of device memory a plan for these sizes needs (one allocation, passed to dispatch_plan_carve).
std::size_t dispatch_plan_bytes(std::int64_t tokens, int experts, int k);
/// Lays the plan's arrays out in `buffer` (dispatch_plan_bytes long, 256-byte aligned). Does not touch the device.
DispatchPlan dispatch_plan_carve(void* buffer, std::int64_t tokens, int experts, int k);
/// Fills the plan from topk_idx [T,k] (values in [0,E)).
void dispatch_plan_build(const std::int64_t* topk_idx, const DispatchPlan& plan, cudaStream_t stream);

// ---- gather / scatter -------------------------------------------------------------------------------------------

/// dst[r,:] = scale[index[r]] * src[index[r] / div, :] for r < rows; zero rows where index[r] < 0 (padding).
/// index nullptr: identity; scale nullptr: 1. Covers the MegaBlocks padded gather (index = padded_pair, div = k)
/// and the gathered, weighted dy of both backwards (scale = topk_weight).
void gather_rows(const bf16_t* src, std::int64_t cols, const std::int64_t* index, int div, const float* scale,
                 bf16_t* dst, std::int64_t rows, cudaStream_t stream);

/// Combine over slots: out[t,:] (+)= sum_s w[t,s] * src[row(t*k+s), :], row = row_map[p] or p when row_map is
/// nullptr; w nullptr: unweighted (the backward of a gather). Deterministic (no atomics). Output bf16 or fp32.
void combine_rows(const bf16_t* src, std::int64_t cols, const std::int64_t* row_map, const float* w,
                  std::int64_t tokens, int k, bf16_t* out_bf16, float* out_f32, bool accumulate, cudaStream_t stream);

/// d_w[t,s] = <dy[t,:], src[row(t*k+s),:]> (fp32): the gradient of the combine weights.
void pair_dot(const bf16_t* dy, const bf16_t* src, std::int64_t cols, const std::int64_t* row_map,
              std::int64_t tokens, int k, float* d_w, cudaStream_t stream);

// ---- grouped GEMMs (bf16 tensor cores, fp32 accumulate) ----------------------------------------------------------

/// What grouped_gemm does with its fp32 tile before storing it. The SwiGLU epilogues exist in kmoe's kernel only (the
/// cuBLAS engine has no such epilogue); they remove the separate swiglu_forward / swiglu_backward passes.
///  Store          C = the GEMM (bf16 or fp32, optionally accumulated).
///  SwigluForward  the GEMM is h13 = A·[W1;W3]ᵀ (b_trans, b1 given, n = 2·b_split = 2F): each block computes the same
///                 columns f of h1 and h3, and C [rows, F] receives act = silu(h1)·h3 (from the bf16-rounded h1, h3,
///                 as swiglu_forward computes it from the stored h13); h13_out (nullptr: not stored) receives h13.
///  SwigluBackward the GEMM is d_act = A·W2 (b_trans = false, n = F); h13_in [rows, 2F] is read at C's rows and
///                 C [rows, 2F] receives dh13 = [d_act·h3·silu'(h1) | d_act·silu(h1)] (d_act rounded to bf16 first,
///                 as swiglu_backward reads it); d_act never reaches memory. C may alias h13_in (each element is read
///                 before it is written, by the same thread).
/// Fused epilogues need bf16 C, not accumulated, F, ldc and ld_h13 multiples of 8 and 16-byte aligned C and h13.
enum class GemmEpilogue { Store, SwigluForward, SwigluBackward };

/// Row-grouped GEMM: for each group g and row r in [offsets[g], offsets[g+1]):
///   C[crow(r), :] = A[arow(r), :] · op(B_g)
/// arow(r) = a_index ? a_index[r] / a_div : r (a_index[r] < 0 reads a zero row); crow(r) = c_index ? c_index[r] : r.
/// B_g is stored [N,K] (b_trans: C = A·B_gᵀ, e.g. x·W1ᵀ) or [K,N] (C = A·B_g, e.g. dy·W2). Its stored rows come from
/// two tensors stacked along the stored-row axis: rows j < b_split from b0 (b_split rows per group), the rest from
/// b1 (stored_rows - b_split per group) — so [W1;W3] needs no concatenated copy. b1 nullptr: all from b0.
/// offsets/tile_offsets nullptr: one group of `rows` rows. The grid is sized for `rows` (an upper bound on
/// offsets[G]) plus one partial tile per group, so the host never learns the split sizes.
struct GroupedGemmArgs {
  int groups = 1;
  std::int64_t rows = 0;                       ///< rows when ungrouped; upper bound of offsets[groups] otherwise
  std::int64_t n = 0, k = 0;
  const std::int64_t* offsets = nullptr;       ///< [groups+1] device
  const std::int64_t* tile_offsets = nullptr;  ///< [groups+1] device: prefix of ceil(rows_g / kGemmTileRows)
  const bf16_t* a = nullptr;
  std::int64_t lda = 0;
  const std::int64_t* a_index = nullptr;
  int a_div = 1;
  bool b_trans = true;
  const bf16_t* b0 = nullptr;
  const bf16_t* b1 = nullptr;
  std::int64_t b_split = 0;
  bf16_t* c_bf16 = nullptr;                    ///< one of c_bf16 / c_f32
  float* c_f32 = nullptr;
  std::int64_t ldc = 0;
  const std::int64_t* c_index = nullptr;
  bool accumulate = false;                     ///< C += (fp32 output only)
  GemmEpilogue epilogue = GemmEpilogue::Store;
  bf16_t* h13_out = nullptr;                   ///< SwigluForward: [rows, 2F] pre-activations written, or nullptr
  const bf16_t* h13_in = nullptr;              ///< SwigluBackward: [rows, 2F] pre-activations read
  std::int64_t ld_h13 = 0;
};
void grouped_gemm(const GroupedGemmArgs& args, cudaStream_t stream);

/// Weight-gradient grouped GEMM: C_g[m,n] = sum over rows r of group g of A[arow(r), m] * B[brow(r), n] (fp32 out,
/// overwritten; an empty group gets zeros). C_g rows m < c_split go to c0 (c_split rows per group), the rest to c1
/// (so d[W1;W3] lands in dW1 and dW3). arow/brow as in GroupedGemmArgs.
struct GroupedGemmTNArgs {
  int groups = 1;
  std::int64_t rows = 0;                   ///< when offsets is nullptr: one group of this many rows
  std::int64_t m = 0, n = 0;
  const std::int64_t* offsets = nullptr;   ///< [groups+1] device
  const bf16_t* a = nullptr;
  std::int64_t lda = 0;
  const std::int64_t* a_index = nullptr;
  int a_div = 1;
  const bf16_t* b = nullptr;
  std::int64_t ldb = 0;
  const std::int64_t* b_index = nullptr;
  int b_div = 1;
  float* c0 = nullptr;
  float* c1 = nullptr;
  std::int64_t c_split = 0;                ///< c1 nullptr: all rows to c0 (c_split ignored)
  bf16_t* c0_bf16 = nullptr;               ///< bf16 output instead of c0 (set one of c0 / c0_bf16; fp32 accumulation
  bf16_t* c1_bf16 = nullptr;               ///< either way), and instead of c1
};
void grouped_gemm_tn(const GroupedGemmTNArgs& args, cudaStream_t stream);

// ---- SwiGLU ------------------------------------------------------------------------------------------------------

/// act[r,f] = silu(h13[r,f]) * h13[r,F+f] for r < rows (h13 = [x·W1ᵀ | x·W3ᵀ], [rows, 2F]).
void swiglu_forward(const bf16_t* h13, std::int64_t rows, std::int64_t ffn, bf16_t* act, cudaStream_t stream);
/// dh13[r,f] = d_act * h3 * silu'(h1), dh13[r,F+f] = d_act * silu(h1). dh13 may be h13 (in place).
void swiglu_backward(const bf16_t* h13, const bf16_t* d_act, std::int64_t rows, std::int64_t ffn, bf16_t* dh13,
                     cudaStream_t stream);

// ---- the expert MLP: the stage between dispatch and combine ----------------------------------------------------

/// Which engine runs the expert GEMMs. Kernel: kmoe's grouped kernel (reads and writes rows through an index, SwiGLU
/// fused into its epilogues; split sizes stay on the device). Cublas: cublasGemmEx per expert, which needs the split
/// sizes on the host (the caller copies them; unindexed rows). Cutlass: CUTLASS 4.2 Hopper grouped GEMMs, one launch
/// per GEMM operation, per-group sizes written on the device (<kmoe/core/cuda/cutlass_grouped.hpp>; no host sync;
/// unindexed rows); needs a build with KMOE_ENABLE_CUTLASS and an sm_90 device (UsageError otherwise).
/// Auto (resolve_gemm_engine), measured on the H100 (perf/RESULTS.md, CUTLASS section; docs/kernels.md): with CUTLASS,
/// Cutlass unless one expert's GEMMs are large (average rows per expert × F × H >= kCublasMinExpertWork), then Cublas
/// — per-expert cublasGemmEx is host-launch-bound on small experts (fine-grained H=2048 F=768 E=64 k=8 T=8192:
/// CUTLASS 4.97 ms vs cuBLAS 7.41 ms per forward+backward, same run) and 1-3% faster on large ones (Mixtral T=2048:
/// 8.66 vs 8.83 ms; T=8192: 27.66 vs 28.61 ms). Without CUTLASS: Cublas when experts average at least 512 rows, else
/// Kernel. A CUDA graph can capture the block only with Kernel or Cutlass (Cublas synchronises with the host).
enum class GemmEngine { Auto, Kernel, Cublas, Cutlass };
/// Auto's boundary between the CUTLASS and cuBLAS engines: average rows per expert × F × H (between the fine-grained
/// 1.6e9, where CUTLASS is 1.5-1.9x faster, and Mixtral T=2048's 3.0e10, where cuBLAS is 1-3% faster).
inline constexpr double kCublasMinExpertWork = 8e9;

/// The engine that runs for `requested` on experts averaging `rows_per_expert` rows of an F×H MLP: Auto picks as
/// GemmEngine's comment says; UsageError when Cutlass is requested but not built or not on an sm_90 device.
GemmEngine resolve_gemm_engine(GemmEngine requested, std::int64_t rows_per_expert, int ffn, int hidden);

/// How the cuBLAS engine issues its per-expert GEMMs. streams > 1 spreads the experts over that many side streams
/// (1..8; an experiment for small experts: on the H100 it changed the fine-grained block by less than the run-to-run
/// spread, perf/NOTES.md); grouped batches all experts of one GEMM into one cublasGemmGroupedBatchedEx (measured
/// slower: cuBLAS's grouped kernels run at about half the per-expert rate, fine-grained 7.4 -> 7.8 ms, Mixtral 27.7
/// -> 52.9 ms). Defaults: one stream, per-expert calls.
struct CublasSettings {
  int streams = 1;
  bool grouped = false;
};

/// A grouped SwiGLU expert MLP: groups of rows, group g (expert g) owning rows [offsets[g], offsets[g+1]), each
/// computing out = W2_g (silu(W1_g x) * W3_g x). Weights bf16: W1/W3 [G,F,H], W2 [G,H,F]. The routed experts and the
/// shared expert (one group, offsets nullptr) both run through it.
struct ExpertMlp {
  int groups = 1;
  std::int64_t rows = 0;  ///< upper bound on offsets[groups] (the grid is sized by it); the rows when ungrouped
  int hidden = 0, ffn = 0;
  const std::int64_t* offsets = nullptr;       ///< [groups+1] device (nullptr: one group of `rows` rows)
  const std::int64_t* tile_offsets = nullptr;  ///< [groups+1] device: prefix of ceil(rows_g / kGemmTileRows) (Kernel)
  const std::vector<std::int64_t>* host_offsets = nullptr;  ///< [groups+1] host (Cublas only)
  GemmEngine engine = GemmEngine::Kernel;  ///< resolved: Kernel, Cublas or Cutlass
  bool fuse_swiglu = true;                 ///< Kernel engine: SwiGLU in the GEMM epilogues (bit-identical results)
  CublasSettings cublas;                   ///< Cublas engine
  void* cutlass_work = nullptr;            ///< Cutlass engine: cutlass_grouped_workspace_bytes(groups) device bytes
  /// Kernel engine only: row r of the MLP reads x row row_index[r] / row_div and writes its output (out, dx_rows)
  /// to row row_index[r] (ScatterMoE: token rows read through the dispatch plan, results in pair order). nullptr:
  /// rows in group order.
  const std::int64_t* row_index = nullptr;
  int row_div = 1;
  const bf16_t* w1 = nullptr;
  const bf16_t* w3 = nullptr;
  const bf16_t* w2 = nullptr;
};

/// Forward: h13 = x·[W1;W3]ᵀ [rows,2F] and act = silu(h1)·h3 [rows,F] (both kept for the backward), out = act·W2ᵀ
/// [rows,H] bf16 (through row_index when set).
void expert_mlp_forward(const ExpertMlp& m, const bf16_t* x, bf16_t* h13, bf16_t* act, bf16_t* out,
                        cudaStream_t stream);

/// The expert MLP's gradients. Weight gradients fp32 (dw*) or bf16 (dw*_bf16: what a bf16 PyTorch module's .grad holds;
/// the GEMMs accumulate in fp32 either way): exactly one of each pair. The input gradient goes to dx_rows [rows,H] bf16
/// (through row_index when set) or is added to dx_f32 [rows,H] fp32 (ungrouped only: the shared expert).
struct ExpertMlpGrads {
  float* dw1 = nullptr;
  float* dw3 = nullptr;
  float* dw2 = nullptr;
  bf16_t* dw1_bf16 = nullptr;
  bf16_t* dw3_bf16 = nullptr;
  bf16_t* dw2_bf16 = nullptr;
  bf16_t* dx_rows = nullptr;
  float* dx_f32 = nullptr;
};

/// Backward from d_out [rows,H] bf16 (group order): dW2 = d_outᵀ·act, d_act = d_out·W2 -> dh13 (SwiGLU backward),
/// d[W1;W3] = dh13ᵀ·x, dx = dh13·[W1;W3]. Consumes the forward's saved buffers: act becomes d_act and h13 becomes
/// dh13 (in place), so one forward serves one backward. dx_rows may alias x (x is read before dx_rows is written).
/// An empty group gets zero weight gradients.
void expert_mlp_backward(const ExpertMlp& m, const bf16_t* x, bf16_t* h13, bf16_t* act, const bf16_t* d_out,
                         const ExpertMlpGrads& g, cudaStream_t stream);

}  // namespace kmoe::core::cuda
