/// \file gather_scatter.hpp
/// \brief Moving token rows between token order and expert order (MegaBlocks' padded_gather / padded_scatter) and
/// their backward passes.
///
/// `row_of_pair` [T*k] maps pair p = t*k + s to its row in the expert-ordered buffer: DispatchPlan::pair_padded_row
/// for the padded layout (MegaBlocks), DispatchPlan::pair_row for the unpadded one (dispatch/combine of expert
/// parallelism, ScatterMoE's combine). Rows that no pair names are padding: written as zero, never read.
/// Every function blocks until its output is written; none uses atomics (results are deterministic).
#pragma once

#include <kmoe/core/kernel_common.hpp>

namespace kmoe::core {

namespace detail {
template <class ExecSpace>
using Range2D = Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>, Kokkos::IndexType<std::int64_t>>;

template <class ExecSpace, class V>
void zero_rows(const ExecSpace& space, const V& v) {
  using T = typename V::non_const_value_type;
  Kokkos::parallel_for("kmoe::zero", Range2D<ExecSpace>(space, {0, 0}, {std::int64_t(v.extent(0)), std::int64_t(v.extent(1))}),
                       KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) { v(i, j) = T(0); });
}

/// d_topk_weight[t,s] = <dy[t, :], ye[row_of_pair[t*k+s], :]>: the gradient of the combine weights. Blocks.
template <class ExecSpace, class DYV, class YEV, class RV, class DWV>
void pair_dot(const ExecSpace& space, const DYV& dy, const YEV& ye, const RV& row_of_pair, const DWV& d_topk_weight) {
  static_check_view<DWV, 2>();
  using T = typename DWV::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t tokens = dy.extent(0), hidden = dy.extent(1), k = d_topk_weight.extent(1);
  check_extent("kmoe::core::pair_dot", "d_topk_weight", d_topk_weight, 0, tokens);
  Kokkos::parallel_for(
      "kmoe::pair_dot", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens * k),
      KOKKOS_LAMBDA(const std::int64_t p) {
        const std::int64_t t = p / k, r = row_of_pair(p);
        A sum = 0;
        for (std::int64_t h = 0; h < hidden; ++h) sum += A(dy(t, h)) * A(ye(r, h));
        d_topk_weight(t, p % k) = T(sum);
      });
  space.fence();
}
}  // namespace detail

/// Gather: xe[row_of_pair[t*k+s], :] = x[t, :]; the other rows of xe become zero.
/// \param x           [in] [T,H]
/// \param row_of_pair [in] [T*k]
/// \param top_k       [in] k
/// \param xe          [out] [R,H], R >= T*k
template <class ExecSpace, class XV, class RV, class XEV>
void padded_gather(const ExecSpace& space, const XV& x, const RV& row_of_pair, std::int64_t top_k, const XEV& xe) {
  detail::static_check_view<XV, 2>();
  detail::static_check_view<XEV, 2>();
  using T = typename XEV::non_const_value_type;
  constexpr const char* fn = "kmoe::core::padded_gather";
  const std::int64_t pairs = row_of_pair.extent(0), hidden = x.extent(1);
  KMOE_CHECK_INPUT(pairs == std::int64_t(x.extent(0)) * top_k, fn, ": ", pairs, " pairs for ", x.extent(0),
                   " tokens x top_k ", top_k);
  detail::check_extent(fn, "xe", xe, 1, hidden);
  KMOE_CHECK_INPUT(std::int64_t(xe.extent(0)) >= pairs, fn, ": xe has ", xe.extent(0), " rows for ", pairs, " pairs");
  Kokkos::Profiling::pushRegion("kmoe::padded_gather[kokkos]");
  if (std::int64_t(xe.extent(0)) > pairs) detail::zero_rows(space, xe);
  Kokkos::parallel_for(
      "kmoe::padded_gather", detail::Range2D<ExecSpace>(space, {0, 0}, {pairs, hidden}),
      KOKKOS_LAMBDA(const std::int64_t p, const std::int64_t h) { xe(row_of_pair(p), h) = T(x(p / top_k, h)); });
  space.fence();
  Kokkos::Profiling::popRegion();
}

/// Backward of padded_gather: dx[t, :] (+)= sum_s dxe[row_of_pair[t*k+s], :].
/// \param dxe        [in] [R,H]
/// \param dx         [in,out] [T,H]; overwritten unless accumulate
template <class ExecSpace, class DXEV, class RV, class DXV>
void padded_gather_backward(const ExecSpace& space, const DXEV& dxe, const RV& row_of_pair, std::int64_t top_k,
                            const DXV& dx, bool accumulate = false) {
  detail::static_check_view<DXEV, 2>();
  detail::static_check_view<DXV, 2>();
  using T = typename DXV::non_const_value_type;
  using A = accum_t<T>;
  constexpr const char* fn = "kmoe::core::padded_gather_backward";
  const std::int64_t tokens = dx.extent(0), hidden = dx.extent(1);
  KMOE_CHECK_INPUT(std::int64_t(row_of_pair.extent(0)) == tokens * top_k, fn, ": ", row_of_pair.extent(0),
                   " pairs for ", tokens, " tokens x top_k ", top_k);
  detail::check_extent(fn, "dxe", dxe, 1, hidden);
  Kokkos::parallel_for(
      "kmoe::padded_gather_backward", detail::Range2D<ExecSpace>(space, {0, 0}, {tokens, hidden}),
      KOKKOS_LAMBDA(const std::int64_t t, const std::int64_t h) {
        A sum = accumulate ? A(dx(t, h)) : A(0);
        for (std::int64_t s = 0; s < top_k; ++s) sum += A(dxe(row_of_pair(t * top_k + s), h));
        dx(t, h) = T(sum);
      });
  space.fence();
}

/// Scatter (the weighted combine): y[t, :] (+)= sum_s w[t,s] * ye[row_of_pair[t*k+s], :].
/// \param ye          [in] [R,H] expert outputs in expert order
/// \param topk_weight [in] [T,k]
/// \param y           [in,out] [T,H]; overwritten unless accumulate
template <class ExecSpace, class YEV, class RV, class WV, class YV>
void padded_scatter(const ExecSpace& space, const YEV& ye, const RV& row_of_pair, const WV& topk_weight, const YV& y,
                    bool accumulate = false) {
  detail::static_check_view<YEV, 2>();
  detail::static_check_view<WV, 2>();
  detail::static_check_view<YV, 2>();
  using T = typename YV::non_const_value_type;
  using A = accum_t<T>;
  constexpr const char* fn = "kmoe::core::padded_scatter";
  const std::int64_t tokens = y.extent(0), hidden = y.extent(1), k = topk_weight.extent(1);
  detail::check_extent(fn, "topk_weight", topk_weight, 0, tokens);
  detail::check_extent(fn, "row_of_pair", row_of_pair, 0, tokens * k);
  detail::check_extent(fn, "ye", ye, 1, hidden);
  Kokkos::Profiling::pushRegion("kmoe::padded_scatter[kokkos]");
  Kokkos::parallel_for(
      "kmoe::padded_scatter", detail::Range2D<ExecSpace>(space, {0, 0}, {tokens, hidden}),
      KOKKOS_LAMBDA(const std::int64_t t, const std::int64_t h) {
        A sum = accumulate ? A(y(t, h)) : A(0);
        for (std::int64_t s = 0; s < k; ++s) sum += A(topk_weight(t, s)) * A(ye(row_of_pair(t * k + s), h));
        y(t, h) = T(sum);
      });
  space.fence();
  Kokkos::Profiling::popRegion();
}

/// Backward of padded_scatter: dye[row_of_pair[t*k+s], :] = w[t,s] * dy[t, :] (other rows zero) and
/// d_topk_weight[t,s] = <dy[t, :], ye[row_of_pair[t*k+s], :]>.
/// \param dy            [in] [T,H]
/// \param ye            [in] [R,H] the forward's expert outputs
/// \param dye           [out] [R,H]
/// \param d_topk_weight [out] [T,k]
template <class ExecSpace, class DYV, class YEV, class RV, class WV, class DYEV, class DWV>
void padded_scatter_backward(const ExecSpace& space, const DYV& dy, const YEV& ye, const RV& row_of_pair,
                             const WV& topk_weight, const DYEV& dye, const DWV& d_topk_weight) {
  detail::static_check_view<DYV, 2>();
  detail::static_check_view<DYEV, 2>();
  using T = typename DYEV::non_const_value_type;
  constexpr const char* fn = "kmoe::core::padded_scatter_backward";
  const std::int64_t tokens = dy.extent(0), hidden = dy.extent(1), k = topk_weight.extent(1), pairs = tokens * k;
  detail::check_extent(fn, "row_of_pair", row_of_pair, 0, pairs);
  detail::check_extent(fn, "dye", dye, 1, hidden);
  KMOE_CHECK_INPUT(dye.extent(0) == ye.extent(0), fn, ": dye has ", dye.extent(0), " rows, ye has ", ye.extent(0));
  Kokkos::Profiling::pushRegion("kmoe::padded_scatter_backward[kokkos]");
  if (std::int64_t(dye.extent(0)) > pairs) detail::zero_rows(space, dye);
  Kokkos::parallel_for(
      "kmoe::padded_scatter_backward::rows", detail::Range2D<ExecSpace>(space, {0, 0}, {pairs, hidden}),
      KOKKOS_LAMBDA(const std::int64_t p, const std::int64_t h) {
        dye(row_of_pair(p), h) = T(topk_weight(p / k, p % k) * dy(p / k, h));
      });
  detail::pair_dot(space, dy, ye, row_of_pair, d_topk_weight);
  Kokkos::Profiling::popRegion();
}

}  // namespace kmoe::core
