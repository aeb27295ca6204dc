/// \file gather.hpp
/// \brief Collecting row-split data on one rank (what `kmoe block` under mpirun does before rank 0 writes the outputs).
#pragma once

#include <kmoe/comm/communicator.hpp>

#include <Kokkos_Core.hpp>
#include <vector>

namespace kmoe::comm {

/// Concatenates every rank's rows on `root`, in rank order: rank r contributes rows.extent(0) rows (any number, 0 too)
/// of the same width. Built on alltoall_counts + alltoallv, so it works on any backend (views in the communicator's
/// memory space). Collective; blocks.
/// \param comm [in] the group
/// \param rows [in] this rank's [n_r, W] rows (LayoutRight, contiguous)
/// \param root [in] the rank that receives
/// \return on root: [sum n_r, W]; elsewhere an empty [0, W] view
template <class RowView>
Kokkos::View<typename RowView::non_const_value_type**, Kokkos::LayoutRight, typename RowView::memory_space>
gather_rows(Communicator& comm, const RowView& rows, int root = 0) {
  static_assert(RowView::rank == 2, "gather_rows takes a rank-2 View");
  using T = typename RowView::non_const_value_type;
  using Out = Kokkos::View<T**, Kokkos::LayoutRight, typename RowView::memory_space>;
  KMOE_CHECK_USAGE(rows.span_is_contiguous(), "kmoe::comm::gather_rows: rows must be contiguous");
  const int n = comm.size(), me = comm.rank();
  std::vector<std::int64_t> sc(n, 0), so(n, 0), rc(n, 0), ro(n, 0);
  sc[root] = static_cast<std::int64_t>(rows.extent(0));
  comm.alltoall_counts(sc.data(), rc.data(), 1);
  for (int q = 1; q < n; ++q) ro[q] = ro[q - 1] + rc[q - 1];
  Out out(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::comm::gathered")),
          me == root ? ro[n - 1] + rc[n - 1] : 0, rows.extent(1));
  Kokkos::fence();
  comm.alltoallv(rows.data(), sc.data(), so.data(), out.data(), rc.data(), ro.data(),
                 static_cast<std::int64_t>(rows.extent(1)), data_type_v<T>);
  comm.synchronize();
  return out;
}

}  // namespace kmoe::comm
