/// \file dispatch_plan.hpp
/// \brief The dispatch plan: the (token, slot) pairs of a top-k routing grouped by expert with a stable counting sort.
///
/// A pair p = t*k + s names slot s of token t. Sorted by expert (ties kept in pair order), the pairs become "rows":
/// expert e owns rows [offsets[e], offsets[e+1]). The padded layout (MegaBlocks) rounds each expert's row count up to
/// a multiple of `block`: expert e owns padded rows [padded_offsets[e], padded_offsets[e] + counts[e]), the rest of its
/// padded range is zero padding. All indices are int64 (tokens x width can pass 2^31).
#pragma once

#include <kmoe/core/kernel_common.hpp>

#include <vector>

namespace kmoe::core {

/// Where each (token, slot) pair goes; built once per routing, reused by dispatch and combine (forward and backward).
template <class MemorySpace>
struct DispatchPlan {
  using index_view = Kokkos::View<std::int64_t*, MemorySpace>;
  std::int64_t num_tokens = 0;   ///< T
  std::int64_t top_k = 0;        ///< k
  std::int64_t num_experts = 0;  ///< E
  std::int64_t block = 1;        ///< padded rows per expert are a multiple of this
  index_view counts;             ///< [E] rows (pairs) routed to each expert
  index_view offsets;            ///< [E+1] exclusive prefix sum of counts
  index_view padded_offsets;     ///< [E+1] exclusive prefix sum of counts rounded up to block
  index_view row_pair;           ///< [T*k] the pair at each expert-ordered row
  index_view pair_row;           ///< [T*k] inverse of row_pair: the row of each pair
  index_view pair_padded_row;    ///< [T*k] the row of each pair in the padded layout
  std::vector<std::int64_t> counts_host;          ///< host copy of counts
  std::vector<std::int64_t> offsets_host;         ///< host copy of offsets (GEMM loops slice with it)
  std::vector<std::int64_t> padded_offsets_host;  ///< host copy of padded_offsets

  /// T*k: rows of the unpadded layout.
  std::int64_t num_rows() const { return num_tokens * top_k; }
  /// Rows of the padded layout.
  std::int64_t num_padded_rows() const { return padded_offsets_host.empty() ? 0 : padded_offsets_host.back(); }
};

namespace detail {
template <class V>
std::vector<std::int64_t> to_host_vector(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<std::int64_t>(h.data(), h.data() + h.extent(0));
}
}  // namespace detail

/// Builds the plan of a routing: a stable, deterministic parallel counting sort (per-chunk histograms, scanned in
/// (expert, chunk) order, then each chunk scatters its pairs in order). Blocks (copies the offsets to the host).
/// \param space       [in] execution space instance
/// \param topk_idx    [in] [T,k] int64 expert of each pair; each in [0, num_experts) (InputError otherwise)
/// \param num_experts [in] E
/// \param block       [in] row multiple of the padded layout (>= 1)
template <class ExecSpace, class IV>
DispatchPlan<typename ExecSpace::memory_space> make_dispatch_plan(const ExecSpace& space, const IV& topk_idx,
                                                                  std::int64_t num_experts, std::int64_t block = 1) {
  detail::static_check_view<IV, 2>();
  using Mem = typename ExecSpace::memory_space;
  using Range = Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>;
  using index_view = Kokkos::View<std::int64_t*, Mem>;
  constexpr const char* fn = "kmoe::core::make_dispatch_plan";
  KMOE_CHECK_INPUT(num_experts >= 1, fn, ": num_experts = ", num_experts);
  KMOE_CHECK_INPUT(block >= 1, fn, ": block = ", block);
  Kokkos::Profiling::pushRegion("kmoe::dispatch_plan[kokkos]");
  DispatchPlan<Mem> plan;
  plan.num_tokens = topk_idx.extent(0);
  plan.top_k = topk_idx.extent(1);
  plan.num_experts = num_experts;
  plan.block = block;
  const std::int64_t k = plan.top_k, pairs = plan.num_rows(), experts = num_experts;

  std::int64_t bad = 0;
  Kokkos::parallel_reduce(
      "kmoe::dispatch_plan::check", Range(space, 0, pairs),
      KOKKOS_LAMBDA(const std::int64_t p, std::int64_t& n) {
        const std::int64_t e = topk_idx(p / k, p % k);
        if (e < 0 || e >= experts) ++n;
      },
      bad);
  KMOE_CHECK_INPUT(bad == 0, fn, ": ", bad, " of ", pairs, " topk_idx entries are outside [0, ", experts, ")");

  // Chunks: a few per thread, so the histogram [chunks, E] stays small and every thread has work.
  const std::int64_t chunks = std::max<std::int64_t>(1, std::min<std::int64_t>(pairs, 4 * space.concurrency()));
  const std::int64_t chunk_len = pairs == 0 ? 0 : (pairs + chunks - 1) / chunks;
  Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Mem> hist("kmoe::dispatch_plan::hist", chunks, experts);
  Kokkos::parallel_for(
      "kmoe::dispatch_plan::histogram", Range(space, 0, chunks), KOKKOS_LAMBDA(const std::int64_t c) {
        const std::int64_t end = (c + 1) * chunk_len < pairs ? (c + 1) * chunk_len : pairs;
        for (std::int64_t p = c * chunk_len; p < end; ++p) hist(c, topk_idx(p / k, p % k)) += 1;
      });
  plan.counts = index_view("kmoe::dispatch_plan::counts", experts);
  plan.offsets = index_view("kmoe::dispatch_plan::offsets", experts + 1);
  plan.padded_offsets = index_view("kmoe::dispatch_plan::padded_offsets", experts + 1);
  auto counts = plan.counts;
  auto offsets = plan.offsets;
  auto padded = plan.padded_offsets;
  Kokkos::parallel_for(
      "kmoe::dispatch_plan::counts", Range(space, 0, experts), KOKKOS_LAMBDA(const std::int64_t e) {
        std::int64_t n = 0;
        for (std::int64_t c = 0; c < chunks; ++c) n += hist(c, e);
        counts(e) = n;
      });
  Kokkos::parallel_scan(
      "kmoe::dispatch_plan::offsets", Range(space, 0, experts + 1),
      KOKKOS_LAMBDA(const std::int64_t e, std::int64_t& sum, const bool final) {
        if (final) offsets(e) = sum;
        if (e < experts) sum += counts(e);
      });
  Kokkos::parallel_scan(
      "kmoe::dispatch_plan::padded_offsets", Range(space, 0, experts + 1),
      KOKKOS_LAMBDA(const std::int64_t e, std::int64_t& sum, const bool final) {
        if (final) padded(e) = sum;
        if (e < experts) sum += (counts(e) + block - 1) / block * block;
      });
  // hist(c, e) becomes the first row of chunk c's pairs of expert e.
  Kokkos::parallel_for(
      "kmoe::dispatch_plan::bases", Range(space, 0, experts), KOKKOS_LAMBDA(const std::int64_t e) {
        std::int64_t base = offsets(e);
        for (std::int64_t c = 0; c < chunks; ++c) {
          const std::int64_t n = hist(c, e);
          hist(c, e) = base;
          base += n;
        }
      });
  plan.row_pair = index_view(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::dispatch_plan::row_pair"), pairs);
  plan.pair_row = index_view(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::dispatch_plan::pair_row"), pairs);
  plan.pair_padded_row =
      index_view(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::dispatch_plan::pair_padded_row"), pairs);
  auto row_pair = plan.row_pair;
  auto pair_row = plan.pair_row;
  auto pair_padded_row = plan.pair_padded_row;
  Kokkos::parallel_for(
      "kmoe::dispatch_plan::scatter", Range(space, 0, chunks), KOKKOS_LAMBDA(const std::int64_t c) {
        const std::int64_t end = (c + 1) * chunk_len < pairs ? (c + 1) * chunk_len : pairs;
        for (std::int64_t p = c * chunk_len; p < end; ++p) {
          const std::int64_t e = topk_idx(p / k, p % k);
          const std::int64_t r = hist(c, e)++;
          row_pair(r) = p;
          pair_row(p) = r;
          pair_padded_row(p) = padded(e) + (r - offsets(e));
        }
      });
  space.fence();
  plan.counts_host = detail::to_host_vector(plan.counts);
  plan.offsets_host = detail::to_host_vector(plan.offsets);
  plan.padded_offsets_host = detail::to_host_vector(plan.padded_offsets);
  Kokkos::Profiling::popRegion();
  return plan;
}

/// make_dispatch_plan on the default instance of ExecSpace.
template <class ExecSpace = Kokkos::DefaultExecutionSpace, class IV>
DispatchPlan<typename ExecSpace::memory_space> make_dispatch_plan(const IV& topk_idx, std::int64_t num_experts,
                                                                  std::int64_t block = 1) {
  return make_dispatch_plan(ExecSpace(), topk_idx, num_experts, block);
}

}  // namespace kmoe::core
