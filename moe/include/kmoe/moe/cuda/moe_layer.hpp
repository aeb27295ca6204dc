/// \file moe_layer.hpp
/// \brief The CUDA backend of kmoe::moe::MoeLayer (../shared/STYLE.md habit 3): MoeLayer<kmoe::bf16, Kokkos::Cuda>
/// runs kmoe's hand-written block (<kmoe/core/cuda/kernels.hpp>: moe_forward / moe_backward; bf16 storage, fp32
/// accumulation) behind the MoeLayer API. Chosen by value type and execution space, like routing_forward's CUDA
/// overload: MoeLayer<float, Kokkos::Cuda> keeps the portable kernels and is this layer's reference.
/// <kmoe/moe/moe_layer.hpp> includes this header in CUDA builds.
///
/// Differences from the portable layer, all following from the hand-written block:
///   - gradients and routing outputs are fp32 (grad_value_t<bf16> = float);
///   - forward()/backward() enqueue on space().cuda_stream() and return without waiting (no host synchronisation;
///     the cuBLAS engine, options.gemm = Blas or Auto on large experts, waits once per forward for the split sizes).
///     Work on the same space instance, Kokkos::fence() and Kokkos::deep_copy see the results;
///   - the padded path pads each expert to 128 rows (core::cuda::kGemmTileRows); options.block must divide 128;
///   - the saved context (routing(), the plan) lives in one device workspace that the next forward() reuses:
///     routing()'s Views are valid until then. Copies of a layer share that workspace;
///   - one backward() per forward(): the block's backward reuses the saved activations as its scratch (a second
///     backward() is an InputError);
///   - the stages API (expert parallelism) is not implemented yet: calling a stage fails to compile with a message
///     (docs/comm.md).
#pragma once

#include <kmoe/core/bf16.hpp>
#include <kmoe/core/cuda/kernels.hpp>
#include <kmoe/moe/detail/cuda_options.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <vector>

namespace kmoe::moe {

namespace detail {
template <class...>
constexpr bool always_false = false;

/// The raw block's view of a bf16 layer's weights (kernels.hpp's MoeWeights: bf16 bit patterns).
inline core::cuda::MoeWeights raw_weights(const MoeWeights<bf16, Kokkos::Cuda>& w) {
  static_assert(sizeof(bf16) == sizeof(core::cuda::bf16_t), "kmoe::bf16 is the bf16 bit pattern");
  auto bits = [](const bf16* p) { return reinterpret_cast<const core::cuda::bf16_t*>(p); };
  core::cuda::MoeWeights r;
  r.gate = bits(w.router.data());
  r.w1 = bits(w.w1.data());
  r.w3 = bits(w.w3.data());
  r.w2 = bits(w.w2.data());
  r.shared_w1 = bits(w.shared_w1.data());
  r.shared_w3 = bits(w.shared_w3.data());
  r.shared_w2 = bits(w.shared_w2.data());
  return r;
}

/// The raw block's view of a bf16 layer's gradients (fp32 device tensors, kernels.hpp's MoeGrads).
inline core::cuda::MoeGrads raw_grads(const MoeBackward<bf16, Kokkos::Cuda>& out) {
  core::cuda::MoeGrads g;
  g.dx = out.dx.data();
  g.d_gate = out.grads.router.data();
  g.dw1 = out.grads.w1.data();
  g.dw3 = out.grads.w3.data();
  g.dw2 = out.grads.w2.data();
  g.d_shared_w1 = out.grads.shared_w1.data();
  g.d_shared_w3 = out.grads.shared_w3.data();
  g.d_shared_w2 = out.grads.shared_w2.data();
  return g;
}
}  // namespace detail

/// One MoE block on kmoe's hand-written CUDA kernels. Same API as the portable MoeLayer (moe_layer.hpp) for the
/// single-process calls; see the file comment for the differences.
template <>
class MoeLayer<bf16, Kokkos::Cuda> {
 public:
  using views = MoeViews<bf16, Kokkos::Cuda>;
  using matrix = views::matrix;
  using const_matrix = views::const_matrix;
  using grad_matrix = MoeViews<float, Kokkos::Cuda>::matrix;
  /// The kernels this layer runs.
  static constexpr LayerBackend backend = LayerBackend::Cuda;

  /// \param weights [in] bf16 parameters in CudaSpace (shared, not copied; contiguous); InputError on inconsistent
  ///                shapes, hidden/ffn/shared ffn not multiples of 8, more than 256 experts or top_k > 32
  /// \param options [in] top_k; impl Scatter/Padded -> the block's scattered/padded path; gemm Auto/Blas/Kokkos ->
  ///                engine Auto (CUTLASS on small experts when built, else cuBLAS/kernel by size)/cuBLAS/kmoe's kernel;
  ///                UsageError when block does not divide 128
  /// \param space   [in] the instance whose stream all work is enqueued on
  MoeLayer(MoeWeights<bf16, Kokkos::Cuda> weights, MoeOptions options, Kokkos::Cuda space = Kokkos::Cuda());

  const MoeWeights<bf16, Kokkos::Cuda>& weights() const { return weights_; }
  const MoeOptions& options() const { return options_; }
  const Kokkos::Cuda& space() const { return space_; }

  /// y = block(x) [T,H] bf16; saves the context for backward(). x must stay alive and unchanged until backward().
  /// InputError when x is not [T,H] with H = hidden, or when the layer holds a slice of the experts.
  matrix forward(const_matrix x);
  /// As forward(x), writing y into `y` ([T,H], overwritten; InputError on another shape).
  void forward(const_matrix x, matrix y);
  /// fp32 gradients of L = sum(y * dy) for the last forward(). InputError when dy's shape differs from y's.
  MoeBackward<bf16, Kokkos::Cuda> backward(const_matrix dy);
  /// As backward(dy), writing into `out` (dx [T,H] and tensors shaped like the weights; all overwritten).
  void backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out);
  /// The last forward()'s routing: logits, probs, topk_idx, topk_weight (fp32, device) and the plan (device arrays;
  /// plan.block = 128). The first call after a forward() copies the plan's counts and offsets to the host (one
  /// small device-to-host copy and a wait), so a forward that nobody asks about never waits for them.
  const Routing<bf16, Kokkos::Cuda>& routing() const;
  /// The last forward()'s router logits [T,E] (fp32, device; no copy, no wait).
  grad_matrix router_logits() const { return routing_.logits; }
  /// The last forward()'s tokens per expert (copied to the host on first request, as routing()).
  const std::vector<std::int64_t>& expert_counts() const { return routing().expert_counts(); }
  /// The engine the last forward() ran the expert GEMMs on: true = cuBLAS, false = kmoe's grouped kernel.
  bool used_cublas() const;
  /// Name of the profiling region forward() pushes, e.g. "kmoe::moe::forward[cuda,scattered]".
  const char* forward_region() const;

  // ---- stages: not yet for bf16 on CUDA (docs/comm.md). Each fails to compile with this message if called. ----
  template <class... A>
  void route(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void route_backward(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void dispatch(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void dispatch_backward(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void expert_forward(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void expert_backward(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void combine(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void combine_backward(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void shared_forward(A&&...) const { stages_not_implemented<A...>(); }
  template <class... A>
  void shared_backward(A&&...) const { stages_not_implemented<A...>(); }

 private:
  template <class... A>
  static void stages_not_implemented() {
    static_assert(detail::always_false<A...>,
                  "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>: the stages API (route/dispatch/expert_forward/combine, "
                  "used by expert parallelism) is not implemented for the hand-written bf16 CUDA block yet; use "
                  "MoeLayer<float, Kokkos::Cuda> (the portable kernels) for stages (docs/comm.md)");
  }
  /// Fills routing_'s Views (unmanaged, over the workspace) after a forward.
  void expose_routing();

  MoeWeights<bf16, Kokkos::Cuda> weights_;
  MoeOptions options_;
  Kokkos::Cuda space_;
  detail::CudaBlockOptions block_;
  core::cuda::MoeShape shape_;                // of the last forward (tokens change per call)
  Kokkos::View<unsigned char*, Kokkos::CudaSpace> workspace_;  // moe_workspace_bytes, grown when a shape needs more
  core::cuda::MoeSaved saved_;                // the last forward's context, carved from workspace_
  const_matrix x_;
  mutable Routing<bf16, Kokkos::Cuda> routing_;
  mutable bool plan_on_host_ = false;
  bool have_forward_ = false;
  bool saved_consumed_ = false;  // a backward() reused the saved activations as scratch (kernels.hpp, moe_backward)
};

}  // namespace kmoe::moe
