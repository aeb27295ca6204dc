#include <kmoe/comm/alltoall.hpp>

#include <numeric>
#include <string>

namespace kmoe::comm {

namespace {
DispatchHandle::IndexView to_view(const std::vector<std::int64_t>& v, const char* label) {
  DispatchHandle::IndexView out(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), v.size());
  const Kokkos::View<const std::int64_t*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> h(v.data(),
                                                                                                        v.size());
  Kokkos::deep_copy(out, h);
  return out;
}
}  // namespace

void DispatchHandle::plan(const std::int64_t* idx, const ExpertPlacement& placement) {
  const int ep = placement.ep(), me = comm_->rank();
  KMOE_CHECK_USAGE(comm_->size() == ep, "kmoe::comm::DispatchHandle: the ep group has ", comm_->size(),
                   " ranks but the placement has ep = ", ep);
  const std::int64_t E = placement.num_experts(), nA = num_assignments();
  const std::int64_t ml = placement.max_local_experts();

  // Rows per expert, then their send order: stable counting sort by expert. Experts are contiguous over the ep ranks,
  // so this also groups the rows by destination rank.
  std::vector<std::int64_t> per_expert(E, 0);
  for (std::int64_t a = 0; a < nA; ++a) {
    const std::int64_t e = idx[a];
    KMOE_CHECK_INPUT(e >= 0 && e < E, "kmoe::comm::DispatchHandle: topk_idx[", a / top_k_, "][", a % top_k_, "] = ", e,
                     " is outside [0, ", E, ")");
    ++per_expert[e];
  }
  std::vector<std::int64_t> next(E + 1, 0);
  std::partial_sum(per_expert.begin(), per_expert.end(), next.begin() + 1);
  send_counts_.assign(ep, 0);
  send_offsets_.assign(ep, 0);
  std::vector<std::int64_t> send_by_expert(static_cast<std::size_t>(ep) * ml, 0);
  for (int p = 0; p < ep; ++p) {
    const Range ex = placement.experts_of(p);
    send_offsets_[p] = next[ex.begin];
    send_counts_[p] = next[ex.end()] - next[ex.begin];
    for (std::int64_t j = 0; j < ex.count; ++j) send_by_expert[p * ml + j] = per_expert[ex.begin + j];
  }
  std::vector<std::int64_t> send_assignment(nA);
  for (std::int64_t a = 0; a < nA; ++a) send_assignment[next[idx[a]]++] = a;

  // The one count exchange: rows per (source rank, local expert).
  std::vector<std::int64_t> recv_by_expert(static_cast<std::size_t>(ep) * ml, 0);
  comm_->alltoall_counts(send_by_expert.data(), recv_by_expert.data(), static_cast<int>(ml));

  local_ = placement.experts_of(me);
  recv_counts_.assign(ep, 0);
  recv_offsets_.assign(ep, 0);
  grouped_offsets_.assign(local_.count + 1, 0);
  for (int q = 0; q < ep; ++q) {
    for (std::int64_t j = 0; j < ml; ++j) {
      const std::int64_t c = recv_by_expert[q * ml + j];
      KMOE_ASSERT(c >= 0 && (j < local_.count || c == 0), "rank ", q, " sent ", c, " rows for local expert ", j);
      recv_counts_[q] += c;
      if (j < local_.count) grouped_offsets_[j + 1] += c;
    }
    if (q > 0) recv_offsets_[q] = recv_offsets_[q - 1] + recv_counts_[q - 1];
  }
  std::partial_sum(grouped_offsets_.begin(), grouped_offsets_.end(), grouped_offsets_.begin());

  // Received rows are source-major (from q: its rows for my expert 0, then expert 1, ...); the expert compute wants
  // them expert-major (expert j: rows from rank 0, then rank 1, ...).
  std::vector<std::int64_t> grouped_source(grouped_offsets_.back());
  for (std::int64_t j = 0; j < local_.count; ++j) {
    std::int64_t pos = grouped_offsets_[j];
    for (int q = 0; q < ep; ++q) {
      std::int64_t src = recv_offsets_[q];
      for (std::int64_t jj = 0; jj < j; ++jj) src += recv_by_expert[q * ml + jj];
      for (std::int64_t r = 0; r < recv_by_expert[q * ml + j]; ++r) grouped_source[pos++] = src + r;
    }
  }
  send_assignment_ = to_view(send_assignment, "kmoe::comm::send_assignment");
  grouped_source_ = to_view(grouped_source, "kmoe::comm::grouped_source");
  send_assignment_host_ = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), send_assignment_);
  grouped_source_host_ = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), grouped_source_);
}

}  // namespace kmoe::comm
