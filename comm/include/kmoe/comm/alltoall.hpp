/// \file alltoall.hpp
/// \brief All-to-all dispatch and combine of token rows over an expert-parallel group, forward and backward.
///
/// Data flow for one batch of T local tokens routed to k experts each (assignment a = t*k + s is token t's s-th expert):
///   make_dispatch      counts per (peer, expert) exchanged once (alltoall_counts), the send/receive layout kept in the handle
///   dispatch_forward   x [T, H] (or per-assignment rows [T*k, H]) -> rows [R, H] on the owners, grouped by local expert
///   (expert compute on the grouped rows: expert_offsets() delimit each local expert's rows)
///   combine_forward    expert rows [R, H'] -> [T*k, H'] back on the token's rank, in assignment order
///   combine_backward   d[T*k, H'] -> [R, H'] grouped  (the transport of dispatch_forward)
///   dispatch_backward  d[R, H]    -> [T*k, H] in assignment order (the transport of combine_forward; sum the k rows of a
///                      token for dx)
/// Within one local expert the received rows are ordered by source rank, then by the source's assignment order, so with
/// tokens split contiguously over the ranks the rows of an expert come in the same order as in a single-process run.
/// The transports run on the execution space of the data's memory space (RowView::execution_space) and return views in
/// the same memory space: host views for the MPI backend (or a CUDA-aware MPI), device views for NCCL. Every call
/// blocks until the data is in place (it fences Kokkos and synchronizes the communicator).
#pragma once

#include <kmoe/comm/communicator.hpp>
#include <kmoe/comm/placement.hpp>

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <vector>

namespace kmoe::comm {

class ExpertParallel;

/// The order of the k rows per token on the token's rank (the input of dispatch_forward/combine_backward, the output of
/// combine_forward/dispatch_backward).
enum class RowOrder {
  pair,   ///< row t*k + s is token t's s-th expert
  expert  ///< sorted by expert, ties in pair order: the row order of kmoe::core::DispatchPlan (MoeLayer's stages)
};

/// The rows a transport returns for input rows of type RowView: a new LayoutRight view of the same (non-const) element
/// type in RowView's memory space.
template <class RowView>
using RowsOf = Kokkos::View<typename RowView::non_const_value_type**, Kokkos::LayoutRight,
                            typename RowView::memory_space>;

/// The layout of one dispatch, computed once and reused by combine and by both backward passes (no second count
/// exchange). Holds a reference to the ep group communicator, which must outlive it.
class DispatchHandle {
 public:
  using IndexView = Kokkos::View<std::int64_t*, Kokkos::DefaultExecutionSpace::memory_space>;
  using HostIndexView = Kokkos::View<std::int64_t*, Kokkos::HostSpace>;

  /// Plans the dispatch of `topk_idx` (T x k expert ids, each in [0, E)) over `ep_group`. Collective over ep_group:
  /// exchanges the counts per (peer, expert). Throws kmoe::InputError naming the token and value for an expert id out
  /// of range, kmoe::UsageError when ep_group.size() != placement.ep().
  /// \param ep_group  [in] this rank's ep group (placement.ep() ranks)
  /// \param placement [in] which ep rank owns which experts
  /// \param topk_idx  [in] T x k expert ids of the local tokens (any memory space; copied to the host)
  template <class IdxView>
  DispatchHandle(Communicator& ep_group, const ExpertPlacement& placement, const IdxView& topk_idx);
  /// The same from an ExpertParallel's ep group and placement.
  template <class IdxView>
  DispatchHandle(const ExpertParallel& layout, const IdxView& topk_idx);

  std::int64_t num_tokens() const { return num_tokens_; }
  int top_k() const { return top_k_; }
  std::int64_t num_assignments() const { return num_tokens_ * top_k_; }
  /// Rows this rank receives (and computes): the sum of its local experts' rows over the ep group.
  std::int64_t num_received() const { return grouped_offsets_.back(); }
  /// The experts this rank owns.
  Range local_experts() const { return local_; }
  /// num_local_experts + 1 offsets into the grouped rows: local expert j has rows [offsets[j], offsets[j+1]).
  const std::vector<std::int64_t>& expert_offsets() const { return grouped_offsets_; }
  Communicator& communicator() const { return *comm_; }

  /// Rows sent to / received from each ep peer, with their offsets (host).
  const std::vector<std::int64_t>& send_counts() const { return send_counts_; }
  const std::vector<std::int64_t>& send_offsets() const { return send_offsets_; }
  const std::vector<std::int64_t>& recv_counts() const { return recv_counts_; }
  const std::vector<std::int64_t>& recv_offsets() const { return recv_offsets_; }
  /// send_assignment()(i): the assignment at send position i (assignments sorted stably by expert, i.e. position i is
  /// row i of RowOrder::expert).
  const IndexView& send_assignment() const { return send_assignment_; }
  /// grouped_source()(j): the position in the received (source-major) buffer of grouped row j.
  const IndexView& grouped_source() const { return grouped_source_; }
  /// Host copies of the two permutations (the same allocations when the default memory space is the host's).
  const HostIndexView& send_assignment_host() const { return send_assignment_host_; }
  const HostIndexView& grouped_source_host() const { return grouped_source_host_; }

 private:
  void plan(const std::int64_t* topk_host, const ExpertPlacement& placement);

  Communicator* comm_;
  std::int64_t num_tokens_ = 0;
  int top_k_ = 1;
  Range local_;
  std::vector<std::int64_t> send_counts_, send_offsets_, recv_counts_, recv_offsets_, grouped_offsets_;
  IndexView send_assignment_, grouped_source_;
  HostIndexView send_assignment_host_, grouped_source_host_;
};

/// Moves token rows to the ranks that own their experts, grouped by local expert.
/// \param h    [in] the handle
/// \param rows  [in] [T, H] token rows (assignment a reads row a / k) or [T*k, H] rows, one per assignment
/// \param order [in] the order of [T*k, H] rows (ignored for token rows unless k == 1)
/// \return [num_received, H], grouped by local expert (expert_offsets())
template <class RowView>
RowsOf<RowView> dispatch_forward(const DispatchHandle& h, const RowView& rows, RowOrder order = RowOrder::pair);

/// Moves expert output rows back to their tokens' ranks.
/// \param h       [in] the handle of the dispatch that produced the grouped rows
/// \param grouped [in] [num_received, H'] rows grouped by local expert
/// \param order   [in] the order of the returned rows
/// \return [T*k, H'] rows, one per assignment, in `order`
template <class RowView>
RowsOf<RowView> combine_forward(const DispatchHandle& h, const RowView& grouped, RowOrder order = RowOrder::pair);

/// The gradient of combine_forward: d[T*k, H'] in `order` -> [num_received, H'] grouped.
template <class RowView>
RowsOf<RowView> combine_backward(const DispatchHandle& h, const RowView& d_rows, RowOrder order = RowOrder::pair) {
  KMOE_CHECK_USAGE(static_cast<std::int64_t>(d_rows.extent(0)) == h.num_assignments(),
                   "kmoe::comm::combine_backward: d_rows has ", d_rows.extent(0), " rows, expected ", h.num_assignments());
  return dispatch_forward(h, d_rows, order);
}

/// The gradient of dispatch_forward: d[num_received, H] grouped -> [T*k, H] in `order`, one row per assignment (the
/// caller sums a token's k rows, which is what dx needs when dispatch_forward read token rows).
template <class RowView>
RowsOf<RowView> dispatch_backward(const DispatchHandle& h, const RowView& d_grouped, RowOrder order = RowOrder::pair) {
  return combine_forward(h, d_grouped, order);
}

}  // namespace kmoe::comm

#include <kmoe/comm/detail/alltoall_impl.hpp>
