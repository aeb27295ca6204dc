/// \file moe_layer.hpp
/// \brief The CUDA backend of kmoe::moe::MoeLayer: MoeLayer<kmoe::bf16, Kokkos::Cuda>
/// composes the MoE block once from kmoe's CUDA primitives (routing, device dispatch plan, gather, the grouped expert
/// MLP, combine; bf16 storage, fp32 accumulation) — for one GPU, and under expert parallelism with an ExpertExchange
/// that moves the expert rows between ranks (kmoe::comm::DistributedMoe<bf16, Kokkos::Cuda> passes one). Chosen by
/// value type and execution space, like routing_forward's CUDA overload: MoeLayer<float, Kokkos::Cuda> keeps the
/// portable kernels and is this layer's reference. <kmoe/moe/moe_layer.hpp> includes this header in CUDA builds.
///
/// The block, forward (backward in reverse):
///   route        logits = x·Gᵀ, softmax, top-k, renormalise (fused, one warp per token)
///   plan         pairs grouped by expert on the device (counts, offsets, padded offsets; no host copy)
///   gather       x's rows in expert order: padded blocks (MegaBlocks), sorted rows (library engines, or the send
///                buffer of expert parallelism, destination-major); the scattered kernel engine skips it and reads
///                token rows through the plan (ScatterMoE)
///   [exchange]   expert parallelism: counts exchanged once (one small device-to-host copy), rows sent straight from
///                the gather buffer and received expert-major, so the expert GEMMs read the receive buffer in place
///   expert MLP   grouped GEMMs on the engine options.gemm picks (Auto: measured), SwiGLU fused where it can be
///   [exchange]   outputs back to the tokens' ranks, into the same buffer layout the combine reads
///   combine      y = Σ_s w_s · out_s (+ the shared expert, computed first)
///
/// Differences from the portable layer, all following from the CUDA block:
///   - gradients and routing outputs are fp32 (grad_value_t<bf16> = float);
///   - forward()/backward() enqueue on space().cuda_stream() and return without waiting (no host synchronisation on
///     one GPU; the cuBLAS engine, options.gemm = Blas or Auto on large experts, waits once per forward for the split
///     sizes; expert parallelism waits once per forward for the count exchange). Work on the same space instance,
///     Kokkos::fence() and Kokkos::deep_copy see the results;
///   - the padded path pads each expert to 128 rows; options.block must divide 128;
///   - the saved context (routing(), the plan) lives in device workspaces that the next forward() reuses: routing()'s
///     Views are valid until then. Copies of a layer share those workspaces;
///   - one backward() per forward(): the backward reuses the saved activations as its scratch (a second backward() is
///     an InputError).
#pragma once

#include <kmoe/core/bf16.hpp>
#include <kmoe/moe/cuda/expert_exchange.hpp>
#include <kmoe/moe/detail/cuda_options.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <memory>
#include <vector>

namespace kmoe::moe {

namespace detail {
class CudaBlock;  // moe/cuda/moe_layer.cpp: the workspaces and the composition
}  // namespace detail

/// One MoE block on kmoe's CUDA kernels. Same API as the portable MoeLayer (moe_layer.hpp) for the single-process
/// calls, plus the expert-parallel forward/backward; see the file comment for the differences.
template <>
class MoeLayer<bf16, Kokkos::Cuda> {
 public:
  using views = MoeViews<bf16, Kokkos::Cuda>;
  using matrix = views::matrix;
  using const_matrix = views::const_matrix;
  using grad_matrix = MoeViews<float, Kokkos::Cuda>::matrix;
  using grad_const_matrix = MoeViews<float, Kokkos::Cuda>::const_matrix;
  /// The kernels this layer runs.
  static constexpr LayerBackend backend = LayerBackend::Cuda;

  /// \param weights [in] bf16 parameters in CudaSpace (shared, not copied; contiguous): all experts, or under expert
  ///                parallelism the slice [first_expert, +num_local_experts); InputError on inconsistent shapes,
  ///                hidden/ffn/shared ffn not multiples of 8, more than 256 experts or top_k > 32
  /// \param options [in] top_k; impl Scatter/Padded; gemm Auto/Blas/Kokkos/Cutlass -> engine Auto (CUTLASS on small
  ///                experts when built, else cuBLAS/kmoe's kernel by size)/cuBLAS/kmoe's grouped kernel/CUTLASS;
  ///                fuse_swiglu, cublas_streams, cublas_grouped; UsageError when block does not divide 128
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
  /// d_logits [T,E] fp32 (optional): added to the router logits' gradient before the router GEMMs — a router loss's
  /// gradient (<kmoe/core/router_losses.hpp>) reaches the router weight and dx this way.
  MoeBackward<bf16, Kokkos::Cuda> backward(const_matrix dy, grad_const_matrix d_logits = {});
  /// As backward(dy), writing into `out` (dx [T,H] and tensors shaped like the weights; all overwritten).
  void backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out, grad_const_matrix d_logits = {});

  /// Expert weight gradients stored in bf16 (shaped like w1, w3, w2): what a bf16 PyTorch module's .grad holds. The
  /// GEMMs accumulate in fp32 either way; only the stored result is rounded, which halves the bytes the weight-gradient
  /// GEMMs write (Mixtral-8x7B layer: 5.6 -> 2.8 GB per step, perf/NOTES.md).
  struct Bf16ExpertGrads {
    views::tensor3 w1, w3, w2;
  };
  /// As backward(dy, out), with the expert weight gradients written to `expert_grads` in bf16; out.grads.w1/w3/w2
  /// are not touched and may be empty.
  void backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out, const Bf16ExpertGrads& expert_grads,
                grad_const_matrix d_logits = {});

  /// Expert parallelism: the same block with `exchange` moving rows between the ep group's ranks; this layer holds
  /// its rank's expert slice and routes its own tokens (T may differ between ranks, may be 0). Collective over the
  /// group; waits once for the count exchange. kmoe::comm::DistributedMoe<bf16, Kokkos::Cuda> calls these.
  /// \param exchange [in] must stay alive until the matching backward has returned
  void forward(const_matrix x, matrix y, ExpertExchange& exchange);
  /// Gradients for the last forward(x, y, exchange): dx for this rank's tokens, the router and shared expert from
  /// them, the local experts' gradients from every rank's rows routed to them. Collective over the group.
  void backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out, ExpertExchange& exchange,
                grad_const_matrix d_logits = {});

  /// The last forward()'s routing: logits, probs, topk_idx, topk_weight (fp32, device) and the plan (device arrays;
  /// plan.block = 128). The first call after a forward() copies the plan's counts and offsets to the host (one
  /// small device-to-host copy and a wait), so a forward that nobody asks about never waits for them.
  const Routing<bf16, Kokkos::Cuda>& routing() const;
  /// The last forward()'s router logits [T,E] (fp32, device; no copy, no wait).
  grad_matrix router_logits() const { return routing_.logits; }
  /// The last forward()'s tokens per expert (copied to the host on first request, as routing()).
  const std::vector<std::int64_t>& expert_counts() const { return routing().expert_counts(); }
  /// The engine the last forward() ran the routed experts' GEMMs on: "kernel", "cublas" or "cutlass" ("" before one).
  const char* gemm_engine() const;
  /// Device bytes the layer holds for the saved activations, the plan and the backward's scratch (its workspaces).
  std::size_t workspace_bytes() const;
  /// Name of the profiling region forward() pushes, e.g. "kmoe::moe::forward[cuda,scattered]".
  const char* forward_region() const;

 private:
  void forward_impl(const_matrix x, matrix y, ExpertExchange* exchange);
  void backward_impl(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out, ExpertExchange* exchange,
                     const Bf16ExpertGrads* expert_grads, grad_const_matrix d_logits);
  /// Fills routing_'s Views (unmanaged, over the workspace) after a forward.
  void expose_routing();

  MoeWeights<bf16, Kokkos::Cuda> weights_;
  MoeOptions options_;
  Kokkos::Cuda space_;
  std::shared_ptr<detail::CudaBlock> block_;
  const_matrix x_;
  mutable Routing<bf16, Kokkos::Cuda> routing_;
  mutable bool plan_on_host_ = false;
  bool have_forward_ = false;
  bool forward_exchanged_ = false;  // the last forward ran with an ExpertExchange
};

}  // namespace kmoe::moe
