// Template bodies of <kmoe/comm/alltoall.hpp>: row gathers/scatters as Kokkos kernels around one alltoallv each.
#pragma once

#include <kmoe/comm/alltoall.hpp>
#include <kmoe/comm/expert_parallel.hpp>

#include <string>

namespace kmoe::comm {
namespace detail {

using Index = std::int64_t;

/// Copies a View of host-readable int64 ids into a host vector, row-major (works for any layout and memory space).
template <class IdxView>
std::vector<Index> to_host_row_major(const IdxView& v) {
  static_assert(IdxView::rank == 2, "topk_idx must be a rank-2 View [tokens, k]");
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<Index> out(h.extent(0) * h.extent(1));
  for (std::size_t t = 0; t < h.extent(0); ++t)
    for (std::size_t s = 0; s < h.extent(1); ++s) out[t * h.extent(1) + s] = static_cast<Index>(h(t, s));
  return out;
}

/// Rows x columns on Exec, columns fastest (row-major data): no integer division per element.
template <class Exec>
using Rows2D =
    Kokkos::MDRangePolicy<Exec, Kokkos::Rank<2, Kokkos::Iterate::Right, Kokkos::Iterate::Right>, Kokkos::IndexType<Index>>;

/// The handle's permutations where Exec can read them: the default memory space's copy or the host copy.
template <class Exec>
auto send_assignment_for(const DispatchHandle& h) {
  if constexpr (Kokkos::SpaceAccessibility<Exec, DispatchHandle::IndexView::memory_space>::accessible)
    return h.send_assignment();
  else
    return h.send_assignment_host();
}
template <class Exec>
auto grouped_source_for(const DispatchHandle& h) {
  if constexpr (Kokkos::SpaceAccessibility<Exec, DispatchHandle::IndexView::memory_space>::accessible)
    return h.grouped_source();
  else
    return h.grouped_source_host();
}

/// The source row of row i: index(i) / div, or i itself when identity.
template <class IndexView>
struct SourceRow {
  IndexView index;
  Index div = 1;
  bool identity = false;
  KOKKOS_INLINE_FUNCTION Index operator()(Index i) const { return identity ? i : index(i) / div; }
};
template <class IndexView>
SourceRow<IndexView> source_row(const IndexView& index, Index div, bool identity) {
  return SourceRow<IndexView>{index, div, identity};
}

/// dst(i, :) = src(from(i), :) for every row i of dst, on Exec.
template <class Exec, class Dst, class Src, class From>
void gather_rows(const Dst& dst, const Src& src, const From& from) {
  const Index n = static_cast<Index>(dst.extent(0)), w = static_cast<Index>(dst.extent(1));
  if (n == 0 || w == 0) return;
  Kokkos::parallel_for(
      "kmoe::comm::gather_rows", Rows2D<Exec>({0, 0}, {n, w}),
      KOKKOS_LAMBDA(const Index i, const Index c) { dst(i, c) = src(from(i), c); });
}

/// dst(index(i), :) = src(i, :) for every row i of src, on Exec (index is a permutation: no two rows collide).
template <class Exec, class Dst, class Src, class IndexView>
void scatter_rows(const Dst& dst, const Src& src, const IndexView& index) {
  const Index n = static_cast<Index>(src.extent(0)), w = static_cast<Index>(src.extent(1));
  if (n == 0 || w == 0) return;
  Kokkos::parallel_for(
      "kmoe::comm::scatter_rows", Rows2D<Exec>({0, 0}, {n, w}),
      KOKKOS_LAMBDA(const Index i, const Index c) { dst(index(i), c) = src(i, c); });
}

template <class RowView>
void check_rows(const RowView&) {
  static_assert(RowView::rank == 2, "kmoe::comm transports take rank-2 Views [rows, width]");
}

/// One alltoallv of whole rows (counts in rows), then waits: Kokkos' kernels and the communicator's stream may differ.
template <class V>
void exchange(Communicator& comm, const V& send, const std::vector<Index>& sc, const std::vector<Index>& so,
              const V& recv, const std::vector<Index>& rc, const std::vector<Index>& ro) {
  Kokkos::fence();
  comm.alltoallv(send.data(), sc.data(), so.data(), recv.data(), rc.data(), ro.data(),
                 static_cast<Index>(send.extent(1)), data_type_v<typename V::value_type>);
  comm.synchronize();
}

}  // namespace detail

template <class IdxView>
DispatchHandle::DispatchHandle(Communicator& ep_group, const ExpertPlacement& placement, const IdxView& topk_idx)
    : comm_(&ep_group),
      num_tokens_(static_cast<std::int64_t>(topk_idx.extent(0))),
      top_k_(static_cast<int>(topk_idx.extent(1))) {
  plan(detail::to_host_row_major(topk_idx).data(), placement);
}

template <class IdxView>
DispatchHandle::DispatchHandle(const ExpertParallel& layout, const IdxView& topk_idx)
    : DispatchHandle(layout.ep_group(), layout.placement(), topk_idx) {}

template <class RowView>
RowsOf<RowView> dispatch_forward(const DispatchHandle& h, const RowView& rows, RowOrder order) {
  detail::check_rows(rows);
  using Exec = typename RowView::execution_space;
  const auto n = static_cast<std::int64_t>(rows.extent(0));
  KMOE_CHECK_USAGE(n == h.num_assignments() || n == h.num_tokens(), "kmoe::comm::dispatch_forward: rows has ", n,
                   " rows; expected ", h.num_tokens(), " (tokens) or ", h.num_assignments(), " (tokens x k)");
  const bool per_assignment = n == h.num_assignments();
  const auto width = rows.extent(1);
  using Out = RowsOf<RowView>;
  Out send(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::comm::dispatch_send"), h.num_assignments(), width);
  Out recv(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::comm::dispatch_recv"), h.num_received(), width);
  Out out(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::comm::dispatched"), h.num_received(), width);
  // Send order is RowOrder::expert: rows in that order are sent as they are.
  detail::gather_rows<Exec>(send, rows,
                            detail::source_row(detail::send_assignment_for<Exec>(h), per_assignment ? 1 : h.top_k(),
                                               per_assignment && order == RowOrder::expert));
  detail::exchange(h.communicator(), send, h.send_counts(), h.send_offsets(), recv, h.recv_counts(), h.recv_offsets());
  detail::gather_rows<Exec>(out, recv, detail::source_row(detail::grouped_source_for<Exec>(h), 1, false));
  Kokkos::fence();
  return out;
}

template <class RowView>
RowsOf<RowView> combine_forward(const DispatchHandle& h, const RowView& grouped, RowOrder order) {
  detail::check_rows(grouped);
  using Exec = typename RowView::execution_space;
  KMOE_CHECK_USAGE(static_cast<std::int64_t>(grouped.extent(0)) == h.num_received(),
                   "kmoe::comm::combine_forward: grouped rows has ", grouped.extent(0), " rows; the dispatch delivered ",
                   h.num_received());
  const auto width = grouped.extent(1);
  using Out = RowsOf<RowView>;
  Out recv(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::comm::combine_send"), h.num_received(), width);
  Out send(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::comm::combine_recv"), h.num_assignments(), width);
  detail::scatter_rows<Exec>(recv, grouped, detail::grouped_source_for<Exec>(h));
  // The reverse route: what arrived from peer q goes back to q, in send order (= RowOrder::expert).
  detail::exchange(h.communicator(), recv, h.recv_counts(), h.recv_offsets(), send, h.send_counts(), h.send_offsets());
  if (order == RowOrder::expert) return send;
  Out out(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::comm::combined"), h.num_assignments(), width);
  detail::scatter_rows<Exec>(out, send, detail::send_assignment_for<Exec>(h));
  Kokkos::fence();
  return out;
}

}  // namespace kmoe::comm
