/// \file routing.hpp
/// \brief Top-k softmax routing: logits = x·Gᵀ, softmax, top-k (descending, ties to the lower expert index, as
/// torch.topk), renormalisation over the k chosen; and its backward.
///
/// Softmax and renormalisation run in accum_t<T>: float64 for double data, float32 for float.
/// Both functions block until their outputs are written.
#pragma once

#include <kmoe/core/grouped_gemm.hpp>
#include <kmoe/core/kernel_common.hpp>

namespace kmoe::core {

/// Routing forward.
/// \param space       [in] execution space instance
/// \param x           [in] [T,H] tokens
/// \param gate        [in] [E,H] router weight
/// \param logits      [out] [T,E] x·Gᵀ
/// \param probs       [out] [T,E] softmax(logits) over experts
/// \param topk_idx    [out] [T,k] int64, chosen experts by descending probability (k = extent(1), 1 <= k <= E)
/// \param topk_weight [out] [T,k] the chosen probabilities divided by their sum
/// \param algo        [in] GEMM algorithm of the logits product
template <class ExecSpace, class XV, class GV, class LV, class PV, class IV, class WV>
void routing_forward(const ExecSpace& space, const XV& x, const GV& gate, const LV& logits, const PV& probs,
                     const IV& topk_idx, const WV& topk_weight, GemmAlgo algo = GemmAlgo::Auto) {
  detail::static_check_view<XV, 2>();
  detail::static_check_view<GV, 2>();
  detail::static_check_view<LV, 2>();
  detail::static_check_view<PV, 2>();
  detail::static_check_view<IV, 2>();
  detail::static_check_view<WV, 2>();
  static_assert(std::is_same<typename IV::non_const_value_type, std::int64_t>::value, "topk_idx holds int64");
  using T = typename LV::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t tokens = x.extent(0), hidden = x.extent(1), experts = gate.extent(0), k = topk_idx.extent(1);
  constexpr const char* fn = "kmoe::core::routing_forward";
  detail::check_extent(fn, "gate", gate, 1, hidden);
  detail::check_extent(fn, "logits", logits, 0, tokens);
  detail::check_extent(fn, "logits", logits, 1, experts);
  detail::check_extent(fn, "probs", probs, 0, tokens);
  detail::check_extent(fn, "probs", probs, 1, experts);
  detail::check_extent(fn, "topk_idx", topk_idx, 0, tokens);
  detail::check_extent(fn, "topk_weight", topk_weight, 0, tokens);
  detail::check_extent(fn, "topk_weight", topk_weight, 1, k);
  KMOE_CHECK_INPUT(k >= 1 && k <= experts, fn, ": top_k = ", k, " outside [1, ", experts, "]");
  Kokkos::Profiling::pushRegion("kmoe::route[kokkos]");
  gemm(space, 'N', 'T', T(1), x, gate, T(0), logits, algo);
  Kokkos::parallel_for(
      "kmoe::route::softmax_topk", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t) {
        A mx = A(logits(t, 0));
        for (std::int64_t e = 1; e < experts; ++e) mx = A(logits(t, e)) > mx ? A(logits(t, e)) : mx;
        A sum = 0;
        for (std::int64_t e = 0; e < experts; ++e) sum += ::kmoe::detail::exp(A(logits(t, e)) - mx);
        for (std::int64_t e = 0; e < experts; ++e) probs(t, e) = T(::kmoe::detail::exp(A(logits(t, e)) - mx) / sum);
        // Selection: k passes of argmax over the experts not yet chosen; strict '>' keeps the lower index on ties.
        A chosen_sum = 0;
        for (std::int64_t s = 0; s < k; ++s) {
          std::int64_t best = -1;
          A best_p = 0;
          for (std::int64_t e = 0; e < experts; ++e) {
            bool taken = false;
            for (std::int64_t j = 0; j < s; ++j) taken = taken || topk_idx(t, j) == e;
            if (taken) continue;
            const A p = A(probs(t, e));
            if (best < 0 || p > best_p) {
              best = e;
              best_p = p;
            }
          }
          topk_idx(t, s) = best;
          chosen_sum += best_p;
        }
        for (std::int64_t s = 0; s < k; ++s) topk_weight(t, s) = T(A(probs(t, topk_idx(t, s))) / chosen_sum);
      });
  space.fence();
  Kokkos::Profiling::popRegion();
}

/// Routing forward on the default instance of ExecSpace.
template <class ExecSpace = Kokkos::DefaultExecutionSpace, class XV, class GV, class LV, class PV, class IV, class WV>
void routing_forward(const XV& x, const GV& gate, const LV& logits, const PV& probs, const IV& topk_idx,
                     const WV& topk_weight, GemmAlgo algo = GemmAlgo::Auto) {
  routing_forward(ExecSpace(), x, gate, logits, probs, topk_idx, topk_weight, algo);
}

/// Routing backward: from dL/d(topk_weight) through the renormalisation, the top-k selection (a constant) and the
/// softmax to dL/d(logits), then dx += d_logits·G and d_gate = d_logitsᵀ·x.
/// \param x             [in] [T,H]
/// \param gate          [in] [E,H]
/// \param probs         [in] [T,E] from routing_forward
/// \param topk_idx      [in] [T,k]
/// \param topk_weight   [in] [T,k]
/// \param d_topk_weight [in] [T,k]
/// \param d_logits      [out] [T,E]
/// \param dx            [in,out] [T,H]: accumulated into when accumulate_dx, else overwritten
/// \param d_gate        [out] [E,H]
template <class ExecSpace, class XV, class GV, class PV, class IV, class WV, class DWV, class DLV, class DXV,
          class DGV>
void routing_backward(const ExecSpace& space, const XV& x, const GV& gate, const PV& probs, const IV& topk_idx,
                      const WV& topk_weight, const DWV& d_topk_weight, const DLV& d_logits, const DXV& dx,
                      const DGV& d_gate, bool accumulate_dx = true, GemmAlgo algo = GemmAlgo::Auto) {
  detail::static_check_view<PV, 2>();
  detail::static_check_view<IV, 2>();
  detail::static_check_view<WV, 2>();
  detail::static_check_view<DWV, 2>();
  detail::static_check_view<DLV, 2>();
  using T = typename DLV::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t tokens = probs.extent(0), experts = probs.extent(1), k = topk_idx.extent(1);
  constexpr const char* fn = "kmoe::core::routing_backward";
  detail::check_extent(fn, "x", x, 0, tokens);
  detail::check_extent(fn, "gate", gate, 0, experts);
  detail::check_extent(fn, "topk_idx", topk_idx, 0, tokens);
  detail::check_extent(fn, "topk_weight", topk_weight, 0, tokens);
  detail::check_extent(fn, "topk_weight", topk_weight, 1, k);
  detail::check_extent(fn, "d_topk_weight", d_topk_weight, 0, tokens);
  detail::check_extent(fn, "d_topk_weight", d_topk_weight, 1, k);
  detail::check_extent(fn, "d_logits", d_logits, 0, tokens);
  detail::check_extent(fn, "d_logits", d_logits, 1, experts);
  Kokkos::Profiling::pushRegion("kmoe::route_backward[kokkos]");
  Kokkos::parallel_for(
      "kmoe::route_backward::logits",
      Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t) {
        // w_s = p_s / S with S = sum of the chosen p: dL/dp_s = (dw_s - <dw, w>) / S for chosen s, 0 elsewhere.
        A sum_p = 0, dw_dot_w = 0;
        for (std::int64_t s = 0; s < k; ++s) {
          sum_p += A(probs(t, topk_idx(t, s)));
          dw_dot_w += A(d_topk_weight(t, s)) * A(topk_weight(t, s));
        }
        // softmax: dL/dl_e = p_e (dp_e - sum_j p_j dp_j)
        A p_dot_dp = 0;
        for (std::int64_t s = 0; s < k; ++s)
          p_dot_dp += A(probs(t, topk_idx(t, s))) * (A(d_topk_weight(t, s)) - dw_dot_w) / sum_p;
        for (std::int64_t e = 0; e < experts; ++e) d_logits(t, e) = T(-A(probs(t, e)) * p_dot_dp);
        for (std::int64_t s = 0; s < k; ++s) {
          const std::int64_t e = topk_idx(t, s);
          const A dp = (A(d_topk_weight(t, s)) - dw_dot_w) / sum_p;
          d_logits(t, e) = T(A(probs(t, e)) * (dp - p_dot_dp));
        }
      });
  gemm(space, 'N', 'N', T(1), d_logits, gate, accumulate_dx ? T(1) : T(0), dx, algo);
  gemm(space, 'T', 'N', T(1), d_logits, x, T(0), d_gate, algo);
  Kokkos::Profiling::popRegion();
}

}  // namespace kmoe::core

// The CUDA backend's overloads (selected by execution space and value types; GemmAlgo::Kokkos forces this file's).
#include <kmoe/config.hpp>
#if KMOE_ENABLE_CUDA
#include <kmoe/core/cuda/routing.hpp>
#endif
