/// \file moe_layer.hpp
/// \brief kmoe::moe::MoeLayer: one Mixture-of-Experts block (top-k softmax router, SwiGLU experts, optional shared
/// expert), forward and backward, built in stages that expert parallelism can split with an all-to-all.
///
/// Semantics (Mixtral / GraniteMoe / GraniteMoeShared as transformers computes them):
///   logits = x·Gᵀ; p = softmax(logits); (w, idx) = topk(p, k) descending; w /= sum(w);
///   y[t] = sum_s w[t,s] · W2[idx] (silu(W1[idx] x[t]) * W3[idx] x[t])  [+ Ws2 (silu(Ws1 x[t]) * Ws3 x[t])]
/// and the variants the weights carry (MoeWeights::routing, ::expert and the optional tensors), each family's math as
/// transformers computes it: the routing variants of core::RoutingOptions with a router bias (GPT-OSS) and a
/// selection bias (DeepSeek-V3); expert biases and the clamped SwiGLU (GPT-OSS, core::ExpertOptions); a shared
/// expert scaled by sigmoid(x·g) (Qwen2-MoE's shared_expert_gate).
///
/// The stages, each with its backward (all block until their outputs are written):
///   (a) route             x [T,H] -> Routing (logits, probs, topk_idx, topk_weight, dispatch plan)
///       dispatch          x -> rows [R,H] grouped by expert (R = T*k, or the padded count with padded = true)
///   (b) expert_forward    rows grouped by *local* expert + host offsets -> expert outputs (the only stage that needs
///                         the expert weights; a rank of expert parallelism owns experts [first_expert, +local))
///   (c) combine           expert outputs in the dispatch order -> y [T,H] weighted by topk_weight
///       shared_forward    the shared expert, added to y
/// Expert parallelism: route -> dispatch -> all-to-all (rows per destination rank are contiguous, since ranks own
/// contiguous expert ranges and rows are sorted by expert) -> regroup by local expert -> expert_forward -> all-to-all
/// back into the dispatch order -> combine. The backward runs the same stages in reverse.
///
/// Data layout: row-major Views in ExecSpace's memory space; x [T,H], router [E,H], w1/w3 [E,F,H], w2 [E,H,F],
/// shared_w1/w3 [S,H], shared_w2 [H,S]; topk_idx int64.
///
/// Backends: the class template below is the portable implementation (float/double on
/// any Kokkos space, Kokkos::Cuda included). In CUDA builds, MoeLayer<kmoe::bf16, Kokkos::Cuda> is a specialisation
/// (<kmoe/moe/cuda/moe_layer.hpp>, included at the end of this header) that runs kmoe's hand-written CUDA block
/// (bf16 storage, fp32 accumulation, fp32 gradients); MoeLayer<float, Kokkos::Cuda> is its portable counterpart.
#pragma once

#include <kmoe/config.hpp>
#include <kmoe/core/bf16.hpp>
#include <kmoe/core/dispatch_plan.hpp>
#include <kmoe/core/expert_mlp.hpp>
#include <kmoe/core/expert_options.hpp>
#include <kmoe/core/kernel_common.hpp>
#include <kmoe/core/routing_options.hpp>

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::moe {

/// Value type of a layer's routing outputs (logits, probabilities, top-k weights) and of its gradients: T for
/// float/double layers, float for bf16 layers — the hand-written block computes routing in fp32 and accumulates and
/// writes gradients in fp32 (mixed-precision "main gradients"; docs/decisions.md).
template <class T>
using grad_value_t = core::accum_t<T>;

/// Which kernels a MoeLayer runs (MoeLayer<T, S>::backend).
enum class LayerBackend {
  Portable,  ///< kmoe's Kokkos kernels (src/include/kmoe/core/*.hpp), any execution space
  Cuda       ///< kmoe's CUDA block composed from its CUDA primitives: MoeLayer<bf16, Kokkos::Cuda>
};

/// Which expert path the single-process layer runs.
enum class ExpertImpl {
  Scatter,  ///< ScatterMoE-style: expert GEMMs read token rows through the dispatch plan (no gathered copy of x)
  Padded    ///< MegaBlocks-style: padded gather into an expert-contiguous buffer, grouped GEMMs, padded scatter
};

/// Parses "scatter" / "padded"; UsageError naming the value otherwise.
ExpertImpl parse_expert_impl(const std::string& name);

/// How the layer computes (not what: the weights fix that, MoeWeights::routing and ::expert included).
struct MoeOptions {
  std::int64_t top_k = 2;                         ///< experts per token (1 <= top_k <= num_experts)
  ExpertImpl impl = ExpertImpl::Scatter;          ///< expert path of forward()/backward()
  /// Padded: rows per expert rounded up to a multiple of this. The bf16 CUDA layer pads to 128 rows (its GEMM tile)
  /// and requires block to divide 128, so that its layout still is a multiple of block.
  std::int64_t block = 32;
  /// GEMM implementation. Portable layers: Auto/Blas = the BLAS TPL, Kokkos = kmoe's portable kernel (parity tests).
  /// The bf16 CUDA layer: Auto = measured choice, Blas = cuBLAS per expert, Kokkos = kmoe's own grouped CUDA kernel
  /// (kmoe's kernel instead of the vendor library; there is no portable bf16 path: use MoeLayer<float, Kokkos::Cuda>).
  core::GemmAlgo gemm = core::GemmAlgo::Auto;
  std::int64_t tile_rows = core::kScatterTileRows;  ///< Scatter, portable layers: rows per staged tile (CUDA: unused)
  /// The bf16 CUDA layer's kernel engine: SwiGLU fused into the grouped GEMM epilogues (bit-identical to the separate
  /// passes, which false selects for comparisons). Library engines (cuBLAS, CUTLASS) always run the separate passes.
  bool fuse_swiglu = true;
  /// The bf16 CUDA layer's cuBLAS engine: spread the per-expert GEMMs over this many side streams (1..8), or batch them
  /// in one grouped call (both measured no faster on the H100; kept for other GPUs: docs/kernels.md).
  int cublas_streams = 1;
  bool cublas_grouped = false;
};

/// Row-major View aliases of a layer computing in T on ExecSpace.
template <class T, class ExecSpace>
struct MoeViews {
  using memory_space = typename ExecSpace::memory_space;
  using vector = Kokkos::View<T*, Kokkos::LayoutRight, memory_space>;
  using matrix = Kokkos::View<T**, Kokkos::LayoutRight, memory_space>;
  using const_matrix = Kokkos::View<const T**, Kokkos::LayoutRight, memory_space>;
  using tensor3 = Kokkos::View<T***, Kokkos::LayoutRight, memory_space>;
  using index_matrix = Kokkos::View<std::int64_t**, Kokkos::LayoutRight, memory_space>;
};

/// The parameters of one MoE block (or, for expert parallelism, of the experts one rank owns), and the family's
/// math (routing and expert variants) that goes with them: a checkpoint's weights make the right layer whatever
/// options the caller picks. Also the type of their gradients (same shapes; routing/expert/family unused there).
///
/// The seven tensors every family has, then the optional ones a family adds (empty Views, extent 0, when it has
/// none). They are members here rather than a second struct so that every user of for_each_weight_pair (gradients,
/// AdamW, checkpoints, expert slices, the finetune trainer) carries them without a second code path; an absent one
/// costs an empty View.
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
struct MoeWeights {
  using views = MoeViews<T, ExecSpace>;
  /// The selection bias's type: T for float/double, float for bf16 (checkpoints keep it in F32).
  using wide_vector = typename MoeViews<core::accum_t<T>, ExecSpace>::vector;
  typename views::matrix router;     ///< [E,H] (always all experts: every rank routes its own tokens)
  typename views::tensor3 w1;        ///< [E_local,F,H] gate projection of experts [first_expert, first_expert+E_local)
  typename views::tensor3 w3;        ///< [E_local,F,H] up projection
  typename views::tensor3 w2;        ///< [E_local,H,F] down projection
  typename views::matrix shared_w1;  ///< [S,H] shared expert gate projection; extent 0 when the model has none
  typename views::matrix shared_w3;  ///< [S,H]
  typename views::matrix shared_w2;  ///< [H,S]
  // Optional tensors (extent 0 = absent).
  typename views::vector router_bias;  ///< [E] added to the logits (GPT-OSS); replicated like the router
  typename views::matrix w1_bias;      ///< [E_local,F] added to W1 x (GPT-OSS); sliced with the experts
  typename views::matrix w3_bias;      ///< [E_local,F] added to W3 x
  typename views::matrix w2_bias;      ///< [E_local,H] added to the expert output
  typename views::matrix shared_gate;  ///< [1,H] the shared expert is scaled by sigmoid(x·g) (Qwen2-MoE)
  /// [E] selection-only bias (DeepSeek-V3's e_score_correction_bias): steers the choice, never the weights, gets no
  /// gradient (a buffer in transformers, not a parameter): not one of for_each_weight_pair's tensors.
  wide_vector score_bias;
  std::int64_t first_expert = 0;  ///< global index of w1[0]
  core::RoutingOptions routing;   ///< the family's routing (default: softmax, top-k, renormalise)
  core::ExpertOptions expert;     ///< the family's expert activation (default: SwiGLU)
  std::string family;             ///< the architecture the weights came from ("" when made by hand), for messages

  std::int64_t hidden() const { return router.extent(1); }
  std::int64_t num_experts() const { return router.extent(0); }
  std::int64_t num_local_experts() const { return w1.extent(0); }
  std::int64_t ffn() const { return w1.extent(1); }
  std::int64_t shared_ffn() const { return shared_w1.extent(0); }
  bool has_shared() const { return shared_w1.extent(0) > 0; }
  bool has_router_bias() const { return router_bias.extent(0) > 0; }
  bool has_score_bias() const { return score_bias.extent(0) > 0; }
  bool has_expert_biases() const { return w1_bias.extent(0) > 0 || w3_bias.extent(0) > 0 || w2_bias.extent(0) > 0; }
  bool has_shared_gate() const { return shared_gate.extent(0) > 0; }
  /// True when the block is the Mixtral/Granite one: default routing and activation, no optional tensor.
  bool is_plain() const {
    return routing.is_default() && expert.is_default() && !has_router_bias() && !has_score_bias() &&
           !has_expert_biases() && !has_shared_gate();
  }
};

/// Calls f(a.NAME, b.NAME, "NAME") for the trainable tensors of two sets that use MoeWeights' member names
/// (MoeWeights, their gradients, io::MoeLayerWeights), in the order router, w1, w3, w2, shared_w1, shared_w3,
/// shared_w2, then the optional router_bias, w1_bias, w3_bias, w2_bias, shared_gate (empty Views where absent):
/// conversions between the sets name the tensors once, here. score_bias is not trained and not visited.
template <class A, class B, class F>
void for_each_weight_pair(A&& a, B&& b, F&& f) {
  f(a.router, b.router, "router");
  f(a.w1, b.w1, "w1");
  f(a.w3, b.w3, "w3");
  f(a.w2, b.w2, "w2");
  f(a.shared_w1, b.shared_w1, "shared_w1");
  f(a.shared_w3, b.shared_w3, "shared_w3");
  f(a.shared_w2, b.shared_w2, "shared_w2");
  f(a.router_bias, b.router_bias, "router_bias");
  f(a.w1_bias, b.w1_bias, "w1_bias");
  f(a.w3_bias, b.w3_bias, "w3_bias");
  f(a.w2_bias, b.w2_bias, "w2_bias");
  f(a.shared_gate, b.shared_gate, "shared_gate");
}

/// True for the tensors that are sliced with the experts under expert parallelism (w1, w3, w2 and their biases);
/// the others are replicated.
inline bool is_expert_tensor(const std::string& name) {
  return name == "w1" || name == "w3" || name == "w2" || name == "w1_bias" || name == "w3_bias" || name == "w2_bias";
}

/// Zero-filled tensors of the shapes of `like` (used for gradients).
template <class T, class ExecSpace>
MoeWeights<T, ExecSpace> zeros_like(const MoeWeights<T, ExecSpace>& like);

/// Stage (a)'s result: what routing decided for the local tokens, and the plan that dispatch/combine reuse.
/// Value type grad_value_t<T> (fp32 for a bf16 layer).
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
struct Routing {
  using views = MoeViews<T, ExecSpace>;
  using value_matrix = typename MoeViews<grad_value_t<T>, ExecSpace>::matrix;
  value_matrix logits;                       ///< [T,E] router logits x·Gᵀ (+ router bias), for a load-balancing loss
  value_matrix probs;                        ///< [T,E] the scores: softmax of the logits (sigmoid for DeepSeek-V3)
  typename views::index_matrix topk_idx;     ///< [T,k] chosen experts, descending choice score
  value_matrix topk_weight;                  ///< [T,k] the combine weights (renormalised and scaled per the routing)
  core::DispatchPlan<typename views::memory_space> plan;  ///< pairs grouped by (global) expert, padded offsets too
  /// Rows per expert (global experts), on the host.
  const std::vector<std::int64_t>& expert_counts() const { return plan.counts_host; }
};

/// What expert_forward saves for expert_backward.
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
struct ExpertContext {
  using views = MoeViews<T, ExecSpace>;
  typename views::const_matrix x;   ///< [R,H] the input rows (a reference: keep them alive and unchanged)
  std::vector<std::int64_t> offsets;  ///< host, E_local+1: local expert g owns rows [offsets[g], offsets[g+1])
  typename views::matrix h1, h3;    ///< [R,F] x·W1ᵀ and x·W3ᵀ (+ biases)
  typename views::matrix y;         ///< [R,H] the expert outputs (the shared expert's before its gate)
  typename views::matrix gate;      ///< gated shared expert: [R,1] sigmoid(x·g); else empty
};

/// Gradients of a backward pass, in grad_value_t<T> (T for float/double layers, fp32 for a bf16 layer).
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
struct MoeBackward {
  using value_type = grad_value_t<T>;
  typename MoeViews<value_type, ExecSpace>::matrix dx;  ///< [T,H]
  MoeWeights<value_type, ExecSpace> grads;  ///< router = d gate, w1/w3/w2, shared_*, optional tensors' (same shapes)
};

/// Uninitialised gradient tensors (value type G) shaped like `like`'s weights, labelled kmoe::grad::NAME; used by
/// layers whose kernels overwrite every gradient element.
template <class G, class T, class ExecSpace>
MoeWeights<G, ExecSpace> uninitialized_like(const MoeWeights<T, ExecSpace>& like) {
  MoeWeights<G, ExecSpace> out;
  for_each_weight_pair(out, like, [](auto& dst, const auto& src, const char* name) {
    using V = std::decay_t<decltype(dst)>;
    dst = V(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::grad::") + name), src.layout());
  });
  out.first_expert = like.first_expert;
  return out;
}

/// One MoE block. Not thread-safe: forward() saves the context that the next backward() consumes.
/// \tparam T         double or float (float computes softmax in float32; bf16 checkpoints are widened to T on load);
///                   bf16 only on Kokkos::Cuda (the specialisation in <kmoe/moe/cuda/moe_layer.hpp>)
/// \tparam ExecSpace Kokkos execution space (Serial, OpenMP, Cuda, ...); Views live in its memory space
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
class MoeLayer {
  static_assert(!std::is_same<T, bf16>::value,
                "kmoe::moe::MoeLayer<bf16, S>: bf16 layers run only on Kokkos::Cuda (kmoe's hand-written CUDA block, "
                "a build with KMOE_ENABLE_CUDA); on other spaces use MoeLayer<float, S> (bf16 checkpoints load "
                "exactly into float)");

 public:
  using views = MoeViews<T, ExecSpace>;
  using matrix = typename views::matrix;
  using const_matrix = typename views::const_matrix;
  /// The kernels this layer runs.
  static constexpr LayerBackend backend = LayerBackend::Portable;

  /// \param weights [in] the parameters (views are shared, not copied); InputError on inconsistent shapes
  /// \param options [in] top_k, path, GEMM algorithm
  /// \param space   [in] execution space instance all work runs on
  MoeLayer(MoeWeights<T, ExecSpace> weights, MoeOptions options, ExecSpace space = ExecSpace());

  const MoeWeights<T, ExecSpace>& weights() const { return weights_; }
  const MoeOptions& options() const { return options_; }
  const ExecSpace& space() const { return space_; }

  // ---- single process: all experts local --------------------------------------------------------------------
  /// y = block(x) [T,H]; saves the context for backward(). x must stay alive and unchanged until backward().
  /// InputError when x is not [T,H] with H = hidden (message names the shape), or when the layer holds a slice.
  matrix forward(const_matrix x);
  /// As forward(x), writing y into `y` ([T,H], overwritten; InputError on another shape): no allocation of y.
  void forward(const_matrix x, matrix y);
  /// Gradients of L = sum(y * dy) for the last forward(). InputError when dy's shape differs from y's.
  /// \param d_logits [in] optional [T,E] gradient of further terms of L w.r.t. the router logits (a router loss,
  ///                 <kmoe/core/router_losses.hpp>), added before the router's GEMMs: its share of dx and d router
  ///                 comes with the rest. An empty View (the default) adds nothing; InputError on another shape.
  MoeBackward<T, ExecSpace> backward(const_matrix dy, const_matrix d_logits = const_matrix());
  /// As backward(dy, d_logits), writing into `out` (dx [T,H] and tensors shaped like the weights; all overwritten).
  void backward(const_matrix dy, const MoeBackward<T, ExecSpace>& out, const_matrix d_logits = const_matrix());
  /// The last forward()'s routing (logits for a load-balancing loss, counts per expert).
  const Routing<T, ExecSpace>& routing() const { return routing_; }
  /// The last forward()'s router logits [T,E].
  typename Routing<T, ExecSpace>::value_matrix router_logits() const { return routing_.logits; }
  /// The last forward()'s tokens per expert.
  const std::vector<std::int64_t>& expert_counts() const { return routing_.expert_counts(); }

  // ---- stages (expert parallelism calls these with an all-to-all between them) -------------------------------
  /// (a) Route the local tokens: logits, scores, top-k, weights (the weights' routing variant), plan (padded offsets
  /// with options().block).
  Routing<T, ExecSpace> route(const_matrix x) const;
  /// (a') Backward of route: dx += d_logits·G, d_router = d_logitsᵀ·x, d_router_bias = column sums of d_logits
  /// (overwritten; pass an empty View when the router has no bias), where d_logits comes from d_topk_weight plus
  /// `d_logits_add` ([T,E], e.g. a router loss's gradient) when that is not empty.
  void route_backward(const_matrix x, const Routing<T, ExecSpace>& routing, const_matrix d_topk_weight, matrix dx,
                      matrix d_router, typename views::vector d_router_bias = {},
                      const_matrix d_logits_add = const_matrix()) const;
  /// Gather x's rows into dispatch order: row plan.pair_row[p] (or pair_padded_row with padded; padding rows zero).
  matrix dispatch(const_matrix x, const Routing<T, ExecSpace>& routing, bool padded = false) const;
  /// Backward of dispatch: dx (+)= the sum over each token's k rows of d_rows.
  void dispatch_backward(const_matrix d_rows, const Routing<T, ExecSpace>& routing, matrix dx, bool padded = false,
                         bool accumulate = false) const;
  /// (b) Expert MLP on rows grouped by local expert: local expert g (global first_expert + g) owns rows
  /// [offsets[g], offsets[g+1]); offsets has E_local+1 entries, offsets.back() = rows.extent(0).
  ExpertContext<T, ExecSpace> expert_forward(const_matrix rows, std::vector<std::int64_t> offsets) const;
  /// (b') Backward: d_rows [R,H] (out), d_w1/d_w3 [E_local,F,H], d_w2 [E_local,H,F] (out, overwritten); with expert
  /// biases also d_w1_bias/d_w3_bias [E_local,F], d_w2_bias [E_local,H] (out; empty Views = not wanted).
  void expert_backward(const ExpertContext<T, ExecSpace>& ctx, const_matrix dy_rows, matrix d_rows,
                       typename views::tensor3 d_w1, typename views::tensor3 d_w3, typename views::tensor3 d_w2,
                       matrix d_w1_bias = {}, matrix d_w3_bias = {}, matrix d_w2_bias = {}) const;
  /// (c) y[t] (+)= sum_s topk_weight[t,s] · y_rows[row of (t,s)] (rows in dispatch order, padded or not).
  void combine(const_matrix y_rows, const Routing<T, ExecSpace>& routing, matrix y, bool padded = false,
               bool accumulate = false) const;
  /// (c') Backward of combine: dy_rows (out, [R,H]) and d_topk_weight (out, [T,k]).
  void combine_backward(const_matrix dy, const_matrix y_rows, const Routing<T, ExecSpace>& routing, matrix dy_rows,
                        matrix d_topk_weight, bool padded = false) const;
  /// Shared expert: y += Ws2 (silu(Ws1 x) * Ws3 x), scaled by sigmoid(x·g) when the weights have a shared_gate;
  /// returns its context (no-op without a shared expert).
  ExpertContext<T, ExecSpace> shared_forward(const_matrix x, matrix y) const;
  /// Backward of shared_forward: dx += ..., d_shared_w1/w3/w2 (out), d_gate [1,H] (out; with a shared_gate).
  void shared_backward(const ExpertContext<T, ExecSpace>& ctx, const_matrix dy, matrix dx, matrix d_w1, matrix d_w3,
                       matrix d_w2, matrix d_gate = {}) const;
  /// The weights' expert biases and activation, as the expert kernels take them.
  core::ExpertExtras<T, typename views::memory_space> expert_extras() const;

 private:
  /// backward() into gradients that hold zeros.
  void backward_zeroed(const_matrix dy, const MoeBackward<T, ExecSpace>& out, const_matrix d_logits);

  MoeWeights<T, ExecSpace> weights_;
  MoeOptions options_;
  ExecSpace space_;
  // The context of the last forward().
  const_matrix x_;
  Routing<T, ExecSpace> routing_;
  ExpertContext<T, ExecSpace> experts_;  // Padded: the grouped context; Scatter: h1/h3/y in plan order
  ExpertContext<T, ExecSpace> shared_;
  bool have_forward_ = false;
};

}  // namespace kmoe::moe

#include <kmoe/moe/detail/moe_layer_impl.hpp>
#if KMOE_ENABLE_CUDA
#include <kmoe/moe/cuda/moe_layer.hpp>
#endif
