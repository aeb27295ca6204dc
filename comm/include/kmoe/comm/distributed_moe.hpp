/// \file distributed_moe.hpp
/// \brief kmoe::comm::DistributedMoe: a MoE block under expert parallelism — MoeLayer's stages with an all-to-all
/// between them, forward and backward, and the gradient reduction that makes every rank's gradients whole.
///
/// Each rank holds the router and shared expert whole and the routed experts layout.local_experts() (a contiguous
/// slice); it routes its own tokens, sends each (token, expert) row to the expert's owner in its ep group, runs
/// MoeLayer::expert_forward on the rows it receives (grouped by local expert), sends the outputs back and combines them:
///
///   route -> DispatchHandle (counts exchanged once) -> dispatch_forward -> expert_forward -> combine_forward -> combine
///   backward: combine_backward (layer) -> combine_backward (comm) -> expert_backward -> dispatch_backward (comm)
///             -> dispatch_backward (layer) -> route_backward, shared expert beside
///
/// The rows of one expert arrive ordered by source rank, then by token, so with tokens split contiguously over the
/// ranks every expert GEMM sees its rows in the single-process order.
#pragma once

#include <kmoe/config.hpp>
#include <kmoe/comm/alltoall.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/gradients.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <memory>
#include <optional>

namespace kmoe::comm {

/// The weights one rank holds: the router (and its biases), the shared expert (and its gate) of `full`, and copies
/// of the experts layout.local_experts() with their biases (first_expert set accordingly). UsageError when `full`
/// does not hold all the placement's experts.
template <class T, class ExecSpace>
moe::MoeWeights<T, ExecSpace> local_slice(const moe::MoeWeights<T, ExecSpace>& full, const ExpertParallel& layout);

namespace detail {
/// Every DistributedMoe's constructor check: the router has the placement's experts and `w` holds exactly this
/// rank's slice of them (InputError naming the rank and both ranges otherwise).
template <class W>
void check_expert_slice(const ExpertParallel& layout, const W& w) {
  const auto mine = layout.local_experts();
  KMOE_CHECK_INPUT(w.num_experts() == layout.placement().num_experts(), "kmoe::comm::DistributedMoe: the router has ",
                   w.num_experts(), " experts, the placement ", layout.placement().num_experts());
  KMOE_CHECK_INPUT(w.first_expert == mine.begin && w.num_local_experts() == mine.count,
                   "kmoe::comm::DistributedMoe: rank ", layout.world().rank(), " holds experts [", w.first_expert, ",",
                   w.first_expert + w.num_local_experts(), "), its placement is [", mine.begin, ",", mine.end(), ")");
}
}  // namespace detail

/// A GradientSet over the gradients of one block under `layout`: router, its bias, the shared expert and its gate
/// replicated; w1/w3/w2 and their biases expert slices (what DistributedMoe::gradient_set returns). Absent tensors
/// (empty Views) are left out. The set refers to `g`'s views.
template <class G, class ExecSpace>
GradientSet expert_gradient_set(const ExpertParallel& layout, const moe::MoeWeights<G, ExecSpace>& g) {
  GradientSet set(layout);
  moe::for_each_weight_pair(g, g, [&](const auto& v, const auto&, const char* name) {
    if (v.span() == 0) return;
    set.add(name, v, moe::is_expert_tensor(name) ? GradKind::expert : GradKind::replicated);
  });
  return set;
}

/// One MoE block over an expert-parallel layout. Not thread-safe: forward() saves the context that backward() uses.
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
class DistributedMoe {
 public:
  using Layer = moe::MoeLayer<T, ExecSpace>;
  using matrix = typename Layer::matrix;
  using const_matrix = typename Layer::const_matrix;

  /// \param layout  [in] the world/ep/replica groups; must outlive this object
  /// \param weights [in] this rank's weights (local_slice of the full ones, or loaded as such); InputError when the
  ///                     expert slice is not layout.local_experts() or the router does not have placement().num_experts()
  /// \param options [in] top_k, GEMM algorithm (the expert path is always the grouped one: rows arrive grouped)
  /// \param space   [in] execution space instance
  DistributedMoe(const ExpertParallel& layout, moe::MoeWeights<T, ExecSpace> weights, moe::MoeOptions options,
                 ExecSpace space = ExecSpace());

  /// y [T,H] for this rank's tokens x [T,H] (T may differ between ranks, may be 0). Collective over the ep group.
  /// x must stay alive and unchanged until backward().
  matrix forward(const_matrix x);

  /// Gradients of L = sum(y * dy) (summed over all ranks' tokens once reduce_gradients() has run): dx for this rank's
  /// tokens; grads.router/shared_* = this rank's tokens' share; grads.w1/w3/w2 = the local experts' gradients from
  /// this ep group's tokens. Collective over the ep group.
  /// \param d_logits [in] optional [T,E] gradient of further terms w.r.t. this rank's router logits (a router loss
  ///                 of the global batch: core::router_loss_backward with statistics summed over the ranks), added
  ///                 before the router's GEMMs; empty (the default) for none, InputError on another shape
  moe::MoeBackward<T, ExecSpace> backward(const_matrix dy, const_matrix d_logits = const_matrix());

  /// A GradientSet over `grads` (router and shared expert replicated, w1/w3/w2 expert slices): call reduce() to make
  /// them whole on every rank, then global_norm() / clip(). The set refers to `grads`' views.
  GradientSet gradient_set(const moe::MoeBackward<T, ExecSpace>& grads) const;

  const Layer& layer() const { return layer_; }
  const ExpertParallel& layout() const { return *layout_; }
  /// The last forward()'s routing and dispatch handle.
  const moe::Routing<T, ExecSpace>& routing() const { return routing_; }
  const DispatchHandle& handle() const;

 private:
  const ExpertParallel* layout_;
  Layer layer_;
  // The context of the last forward().
  const_matrix x_;
  moe::Routing<T, ExecSpace> routing_;
  std::optional<DispatchHandle> handle_;
  matrix x_rows_;  // the dispatched rows (experts_.x refers to them)
  moe::ExpertContext<T, ExecSpace> experts_, shared_;
  matrix y_rows_;  // expert outputs back on this rank, in the plan's row order
};

#if KMOE_ENABLE_CUDA
/// What the row exchanges of DistributedMoe<bf16, Kokkos::Cuda> moved and how long they took, while timed.
struct ExchangeStats {
  std::int64_t calls = 0;  ///< exchanges (two per forward, two per backward)
  double bytes = 0;        ///< bytes this rank sent (its own rows included, as nccl-tests counts them)
  double seconds = 0;      ///< wall time of the exchanges alone (each starts after a fence, ends when rows are in place)
};

namespace detail {
class CommExchange;  // comm/src/cuda_distributed_moe.cpp: moe::ExpertExchange over the ep group's Communicator
}  // namespace detail

/// Expert parallelism on the bf16 CUDA block: MoeLayer<bf16, Kokkos::Cuda> runs its one composition with an
/// ExpertExchange over the ep group (moe/cuda/moe_layer.hpp's file comment shows where it sits): the dispatch plan
/// is built on the device, the counts cross to the host once per forward (one copy of E counts, issued right after the
/// plan and overlapped with the gather and the shared expert), rows are sent straight from the gather buffer
/// (destination-major) and received expert-major, so the grouped GEMMs read the receive buffer in place; the outputs
/// return the same way into the buffer the combine reads, and the backward reuses the same layout. The ep group must
/// move device memory: NCCL (one GPU per rank), or MPI over device buffers (several ranks sharing one GPU; staged
/// through the host unless the MPI is CUDA-aware).
template <>
class DistributedMoe<bf16, Kokkos::Cuda> {
 public:
  using Layer = moe::MoeLayer<bf16, Kokkos::Cuda>;
  using matrix = Layer::matrix;
  using const_matrix = Layer::const_matrix;

  /// As the portable DistributedMoe's constructor; UsageError unless the ep group moves device memory.
  DistributedMoe(const ExpertParallel& layout, moe::MoeWeights<bf16, Kokkos::Cuda> weights, moe::MoeOptions options,
                 Kokkos::Cuda space = Kokkos::Cuda());
  ~DistributedMoe();
  DistributedMoe(DistributedMoe&&) noexcept;
  DistributedMoe& operator=(DistributedMoe&&) noexcept;

  /// y [T,H] bf16 for this rank's tokens (T may differ between ranks, may be 0). Collective over the ep group;
  /// enqueued on the layer's stream except the one wait for the count exchange.
  matrix forward(const_matrix x);
  /// As forward(x), writing into y ([T,H]).
  void forward(const_matrix x, matrix y);
  /// fp32 gradients of L = sum(y * dy), shared out as the portable DistributedMoe's (reduce_gradients makes them
  /// whole). Collective over the ep group. d_logits [T,E] fp32 (optional): added to the router logits' gradient
  /// (a router loss's gradient for this rank's tokens).
  moe::MoeBackward<bf16, Kokkos::Cuda> backward(const_matrix dy, Layer::grad_const_matrix d_logits = {});
  /// As backward(dy), writing into `out` (all overwritten).
  void backward(const_matrix dy, const moe::MoeBackward<bf16, Kokkos::Cuda>& out,
                Layer::grad_const_matrix d_logits = {});
  /// A GradientSet over `grads` (router and shared expert replicated, w1/w3/w2 expert slices).
  GradientSet gradient_set(const moe::MoeBackward<bf16, Kokkos::Cuda>& grads) const;

  /// Benchmarks: time every row exchange on its own (a fence before each, a wait after: slower, so off by default)
  /// and collect ExchangeStats; take_exchange_stats() returns and resets them.
  void time_exchanges(bool on);
  ExchangeStats take_exchange_stats();

  const Layer& layer() const { return layer_; }
  const ExpertParallel& layout() const { return *layout_; }
  /// The last forward()'s routing (as MoeLayer<bf16, Kokkos::Cuda>::routing()).
  const moe::Routing<bf16, Kokkos::Cuda>& routing() const { return layer_.routing(); }

 private:
  const ExpertParallel* layout_;
  Layer layer_;
  std::unique_ptr<detail::CommExchange> exchange_;
  const_matrix x_;
};
#endif

// ---------------------------------------------------------------------------------------------------------------

template <class T, class ExecSpace>
moe::MoeWeights<T, ExecSpace> local_slice(const moe::MoeWeights<T, ExecSpace>& full, const ExpertParallel& layout) {
  const auto mine = layout.local_experts();
  KMOE_CHECK_USAGE(full.first_expert == 0 && full.num_local_experts() == layout.placement().num_experts() &&
                       full.num_experts() == layout.placement().num_experts(),
                   "kmoe::comm::local_slice: the weights hold experts [", full.first_expert, ",",
                   full.first_expert + full.num_local_experts(), ") of ", full.num_experts(),
                   "; the placement needs all ", layout.placement().num_experts());
  moe::MoeWeights<T, ExecSpace> w = full;
  const auto slice = [&](const auto& v, const char* name) {
    using V = std::decay_t<decltype(v)>;
    V out(std::string(name), mine.count, v.extent(1), v.extent(2));
    Kokkos::deep_copy(out, Kokkos::subview(v, Kokkos::make_pair(mine.begin, mine.end()), Kokkos::ALL, Kokkos::ALL));
    return out;
  };
  w.w1 = slice(full.w1, "kmoe::local::w1");
  w.w3 = slice(full.w3, "kmoe::local::w3");
  w.w2 = slice(full.w2, "kmoe::local::w2");
  const auto slice_bias = [&](const auto& v, const char* name) {
    using V = std::decay_t<decltype(v)>;
    if (v.extent(0) == 0) return V();
    V out(std::string(name), mine.count, v.extent(1));
    Kokkos::deep_copy(out, Kokkos::subview(v, Kokkos::make_pair(mine.begin, mine.end()), Kokkos::ALL));
    return out;
  };
  w.w1_bias = slice_bias(full.w1_bias, "kmoe::local::w1_bias");
  w.w3_bias = slice_bias(full.w3_bias, "kmoe::local::w3_bias");
  w.w2_bias = slice_bias(full.w2_bias, "kmoe::local::w2_bias");
  w.first_expert = mine.begin;
  return w;
}

template <class T, class ExecSpace>
DistributedMoe<T, ExecSpace>::DistributedMoe(const ExpertParallel& layout, moe::MoeWeights<T, ExecSpace> weights,
                                             moe::MoeOptions options, ExecSpace space)
    : layout_(&layout), layer_(std::move(weights), options, space) {
  constexpr bool host_data =
      Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename ExecSpace::memory_space>::accessible;
  // The communicator reads the layer's buffers directly: their memory must be the kind it moves.
  const bool device_comm = layout.ep_group().uses_device_memory();
  KMOE_CHECK_USAGE(!(device_comm && host_data), "kmoe::comm::DistributedMoe: the ", layout.ep_group().backend(),
                   " communicator moves device memory, but ", ExecSpace::name(),
                   " keeps its data on the host: run the layer on a device execution space");
  KMOE_CHECK_USAGE(device_comm || host_data, "kmoe::comm::DistributedMoe: the ", layout.ep_group().backend(),
                   " communicator moves host memory, but ", ExecSpace::name(),
                   " keeps its data on the device: use a host execution space (e.g. --backend openmp), NCCL, or an "
                   "MpiCommunicator made with BufferMemory::device");
  detail::check_expert_slice(layout, layer_.weights());
}

template <class T, class ExecSpace>
const DispatchHandle& DistributedMoe<T, ExecSpace>::handle() const {
  KMOE_CHECK_USAGE(handle_.has_value(), "kmoe::comm::DistributedMoe::handle: no forward() yet");
  return *handle_;
}

template <class T, class ExecSpace>
typename DistributedMoe<T, ExecSpace>::matrix DistributedMoe<T, ExecSpace>::forward(const_matrix x) {
  Kokkos::Profiling::pushRegion("kmoe::comm::DistributedMoe::forward[alltoall]");
  handle_.reset();
  routing_ = layer_.route(x);
  x_ = x;
  handle_.emplace(layout_->ep_group(), layout_->placement(), routing_.topk_idx);
  x_rows_ = dispatch_forward(*handle_, x);
  experts_ = layer_.expert_forward(x_rows_, handle_->expert_offsets());
  // Back in send order, which is the plan's row order (both are stable sorts of the pairs by expert).
  y_rows_ = combine_forward(*handle_, experts_.y, RowOrder::expert);
  matrix y(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::comm::y")), x.extent(0), x.extent(1));
  layer_.combine(y_rows_, routing_, y, false, false);
  shared_ = layer_.shared_forward(x, y);
  Kokkos::Profiling::popRegion();
  return y;
}

template <class T, class ExecSpace>
moe::MoeBackward<T, ExecSpace> DistributedMoe<T, ExecSpace>::backward(const_matrix dy, const_matrix d_logits) {
  KMOE_CHECK_INPUT(handle_.has_value(), "kmoe::comm::DistributedMoe::backward: no forward() to differentiate");
  KMOE_CHECK_INPUT(dy.extent(0) == x_.extent(0) && dy.extent(1) == x_.extent(1),
                   "kmoe::comm::DistributedMoe::backward: dy is [", dy.extent(0), ",", dy.extent(1), "], expected [",
                   x_.extent(0), ",", x_.extent(1), "]");
  KMOE_CHECK_INPUT(d_logits.span() == 0 || (d_logits.extent(0) == x_.extent(0) &&
                                            std::int64_t(d_logits.extent(1)) == layer_.weights().num_experts()),
                   "kmoe::comm::DistributedMoe::backward: d_logits is [", d_logits.extent(0), ",", d_logits.extent(1),
                   "], expected [", x_.extent(0), ",", layer_.weights().num_experts(), "]");
  Kokkos::Profiling::pushRegion("kmoe::comm::DistributedMoe::backward[alltoall]");
  const auto& h = *handle_;
  const std::int64_t tokens = x_.extent(0), hidden = x_.extent(1);
  moe::MoeBackward<T, ExecSpace> out;
  out.grads = moe::zeros_like(layer_.weights());
  matrix dy_rows(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::comm::dy_rows")),
                 h.num_assignments(), hidden);
  matrix d_topk_weight(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::comm::d_topk_weight")),
                       tokens, h.top_k());
  layer_.combine_backward(dy, y_rows_, routing_, dy_rows, d_topk_weight, false);
  const matrix dy_grouped = combine_backward(h, dy_rows, RowOrder::expert);
  matrix dx_grouped(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::comm::dx_grouped")),
                    h.num_received(), hidden);
  layer_.expert_backward(experts_, dy_grouped, dx_grouped, out.grads.w1, out.grads.w3, out.grads.w2,
                         out.grads.w1_bias, out.grads.w3_bias, out.grads.w2_bias);
  const matrix dx_rows = dispatch_backward(h, dx_grouped, RowOrder::expert);
  out.dx = matrix(std::string("kmoe::comm::dx"), tokens, hidden);
  layer_.dispatch_backward(dx_rows, routing_, out.dx, false, false);
  layer_.route_backward(x_, routing_, d_topk_weight, out.dx, out.grads.router, out.grads.router_bias, d_logits);
  layer_.shared_backward(shared_, dy, out.dx, out.grads.shared_w1, out.grads.shared_w3, out.grads.shared_w2,
                         out.grads.shared_gate);
  Kokkos::Profiling::popRegion();
  return out;
}

template <class T, class ExecSpace>
GradientSet DistributedMoe<T, ExecSpace>::gradient_set(const moe::MoeBackward<T, ExecSpace>& b) const {
  return expert_gradient_set(*layout_, b.grads);
}

}  // namespace kmoe::comm
