/// \file routing.hpp
/// \brief Routing: logits = x·Gᵀ, scores, top-k (descending, ties to the lower expert index, as torch.topk) and the
/// combine weights, with the variants of RoutingOptions (<kmoe/core/routing_options.hpp>: sigmoid scores, a router
/// bias, a selection-only bias, group-limited top-k, softmax over the chosen k, renormalisation on/off with an
/// epsilon, a scaling factor); and its backward. The overloads without options run the default variant, softmax →
/// top-k → renormalise.
///
/// Scores, renormalisation and their gradients run in accum_t<T>: float64 for double data, float32 for float.
/// All functions block until their outputs are written.
#pragma once

#include <kmoe/core/grouped_gemm.hpp>
#include <kmoe/core/kernel_common.hpp>
#include <kmoe/core/routing_options.hpp>

namespace kmoe::core {

namespace detail {

/// Checks options against E and k; InputError naming the function and the offending value.
inline void check_routing_options(const char* fn, const RoutingOptions& o, std::int64_t experts, std::int64_t k) {
  KMOE_CHECK_INPUT(!o.softmax_over_topk || o.score == ScoreFunction::Softmax, fn,
                   ": softmax_over_topk needs the softmax score function, got ", score_function_name(o.score));
  KMOE_CHECK_INPUT(o.renorm_epsilon >= 0, fn, ": renorm_epsilon = ", o.renorm_epsilon, " is negative");
  KMOE_CHECK_INPUT(o.scaling_factor == o.scaling_factor && o.scaling_factor != 0, fn, ": scaling_factor = ",
                   o.scaling_factor, " must be a non-zero number");
  KMOE_CHECK_INPUT(o.n_group >= 1 && o.n_group <= 64 && experts % o.n_group == 0, fn, ": n_group = ", o.n_group,
                   " must be in [1, 64] and divide the ", experts, " experts");
  if (o.n_group > 1) {
    const std::int64_t size = experts / o.n_group;
    KMOE_CHECK_INPUT(o.topk_group >= 1 && o.topk_group <= o.n_group, fn, ": topk_group = ", o.topk_group,
                     " outside [1, n_group = ", o.n_group, "]");
    KMOE_CHECK_INPUT(o.group_score_topk >= 1 && o.group_score_topk <= size, fn, ": group_score_topk = ",
                     o.group_score_topk, " outside [1, experts per group = ", size, "]");
    KMOE_CHECK_INPUT(k <= o.topk_group * size, fn, ": top_k = ", k, " exceeds the ", o.topk_group * size,
                     " experts of the topk_group = ", o.topk_group, " kept groups");
  }
}

/// An empty rank-1 View of T in Space: "no bias".
template <class T, class Space>
using bias_view_t = Kokkos::View<const T*, Kokkos::LayoutRight, typename Space::memory_space>;

}  // namespace detail

/// Routing forward with options.
/// \param space          [in] execution space instance
/// \param x              [in] [T,H] tokens
/// \param gate           [in] [E,H] router weight
/// \param router_bias    [in] [E] added to the logits (GPT-OSS), or an empty View (extent 0) for none
/// \param selection_bias [in] [E] added to the choice score only, never to the weights (DeepSeek-V3's
///                        e_score_correction_bias), or an empty View for none
/// \param logits         [out] [T,E] x·Gᵀ (+ router_bias)
/// \param probs          [out] [T,E] the scores: softmax(logits) over experts, or sigmoid(logits)
/// \param topk_idx       [out] [T,k] int64, chosen experts by descending choice score (k = extent(1), 1 <= k <= E)
/// \param topk_weight    [out] [T,k] the combine weights (see RoutingOptions)
/// \param options        [in] the variant
/// \param algo           [in] GEMM algorithm of the logits product
/// This overload always runs the portable implementation (also on Kokkos::Cuda, where the bf16 CUDA kernel serves
/// only the overload without options).
template <class ExecSpace, class XV, class GV, class RBV, class SBV, class LV, class PV, class IV, class WV>
void routing_forward(const ExecSpace& space, const XV& x, const GV& gate, const RBV& router_bias,
                     const SBV& selection_bias, const LV& logits, const PV& probs, const IV& topk_idx,
                     const WV& topk_weight, const RoutingOptions& options, GemmAlgo algo = GemmAlgo::Auto) {
  detail::static_check_view<XV, 2>();
  detail::static_check_view<GV, 2>();
  detail::static_check_view<RBV, 1>();
  detail::static_check_view<SBV, 1>();
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
  const bool has_rb = router_bias.extent(0) != 0, has_sb = selection_bias.extent(0) != 0;
  if (has_rb) detail::check_extent(fn, "router_bias", router_bias, 0, experts);
  if (has_sb) detail::check_extent(fn, "selection_bias", selection_bias, 0, experts);
  detail::check_routing_options(fn, options, experts, k);
  const bool sigmoid = options.score == ScoreFunction::Sigmoid, over_k = options.softmax_over_topk;
  const bool renorm = options.renormalize;
  const A eps = A(options.renorm_epsilon), scale = A(options.scaling_factor);
  const std::int64_t n_group = options.n_group, topk_group = options.topk_group, group_n = options.group_score_topk;
  const std::int64_t group_size = experts / n_group;
  Kokkos::Profiling::pushRegion("kmoe::route[kokkos]");
  gemm(space, 'N', 'T', T(1), x, gate, T(0), logits, algo);
  Kokkos::parallel_for(
      "kmoe::route::scores_topk", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t) {
        if (has_rb)
          for (std::int64_t e = 0; e < experts; ++e) logits(t, e) = T(A(logits(t, e)) + A(router_bias(e)));
        if (sigmoid) {
          for (std::int64_t e = 0; e < experts; ++e) probs(t, e) = T(detail::sigmoid(A(logits(t, e))));
        } else {
          A mx = A(logits(t, 0));
          for (std::int64_t e = 1; e < experts; ++e) mx = A(logits(t, e)) > mx ? A(logits(t, e)) : mx;
          A sum = 0;
          for (std::int64_t e = 0; e < experts; ++e) sum += ::kmoe::detail::exp(A(logits(t, e)) - mx);
          for (std::int64_t e = 0; e < experts; ++e) probs(t, e) = T(::kmoe::detail::exp(A(logits(t, e)) - mx) / sum);
        }
        // The choice score of expert e: the score (or the logit), plus the selection bias.
        auto choice = [&](std::int64_t e) {
          const A c = over_k ? A(logits(t, e)) : A(probs(t, e));
          return has_sb ? c + A(selection_bias(e)) : c;
        };
        // Group limit: a bit per kept group. A group's score is the sum of its group_n largest choice scores (those
        // of rank < group_n, ties ranked by index); it is kept when fewer than topk_group groups beat it (a higher
        // score, or an equal one and a lower index).
        std::uint64_t kept = ~std::uint64_t(0);
        if (n_group > 1) {
          A group_score[64];
          for (std::int64_t g = 0; g < n_group; ++g) {
            const std::int64_t first = g * group_size, last = first + group_size;
            A total = 0;
            for (std::int64_t e = first; e < last; ++e) {
              const A c = choice(e);
              std::int64_t rank = 0;
              for (std::int64_t j = first; j < last; ++j) {
                const A cj = choice(j);
                rank += (cj > c || (cj == c && j < e)) ? 1 : 0;
              }
              if (rank < group_n) total += c;
            }
            group_score[g] = total;
          }
          kept = 0;
          for (std::int64_t g = 0; g < n_group; ++g) {
            std::int64_t better = 0;
            for (std::int64_t h = 0; h < n_group; ++h)
              better += (group_score[h] > group_score[g] || (group_score[h] == group_score[g] && h < g)) ? 1 : 0;
            if (better < topk_group) kept |= std::uint64_t(1) << g;
          }
        }
        // Selection: k passes of argmax over the eligible experts not yet chosen; strict '>' keeps the lower index
        // on ties.
        for (std::int64_t s = 0; s < k; ++s) {
          std::int64_t best = -1;
          A best_c = 0;
          for (std::int64_t e = 0; e < experts; ++e) {
            if (!((kept >> (e / group_size)) & 1)) continue;
            bool taken = false;
            for (std::int64_t j = 0; j < s; ++j) taken = taken || topk_idx(t, j) == e;
            if (taken) continue;
            const A c = choice(e);
            if (best < 0 || c > best_c) {
              best = e;
              best_c = c;
            }
          }
          topk_idx(t, s) = best;
        }
        // Weights: the chosen scores, or a softmax over the chosen logits; then renormalise and scale.
        A mx = 0;
        if (over_k) {
          mx = A(logits(t, topk_idx(t, 0)));
          for (std::int64_t s = 1; s < k; ++s) mx = A(logits(t, topk_idx(t, s))) > mx ? A(logits(t, topk_idx(t, s))) : mx;
        }
        auto value = [&](std::int64_t s) {
          return over_k ? ::kmoe::detail::exp(A(logits(t, topk_idx(t, s))) - mx) : A(probs(t, topk_idx(t, s)));
        };
        A chosen_sum = 0;
        for (std::int64_t s = 0; s < k; ++s) chosen_sum += value(s);
        const A denom = over_k ? chosen_sum : renorm ? chosen_sum + eps : A(1);
        const A denom2 = over_k && renorm ? A(1) + eps : A(1);  // a softmax already sums to 1
        for (std::int64_t s = 0; s < k; ++s) {
          A w = value(s) / denom;
          if (over_k && renorm) w = w / denom2;
          topk_weight(t, s) = T(scale == A(1) ? w : w * scale);
        }
      });
  space.fence();
  Kokkos::Profiling::popRegion();
}

/// Routing forward, the default variant (softmax → top-k → renormalise, no biases).
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
  using B = detail::bias_view_t<typename LV::non_const_value_type, ExecSpace>;
  routing_forward(space, x, gate, B(), B(), logits, probs, topk_idx, topk_weight, RoutingOptions(), algo);
}

/// Routing forward on the default instance of ExecSpace.
template <class ExecSpace = Kokkos::DefaultExecutionSpace, class XV, class GV, class LV, class PV, class IV, class WV>
void routing_forward(const XV& x, const GV& gate, const LV& logits, const PV& probs, const IV& topk_idx,
                     const WV& topk_weight, GemmAlgo algo = GemmAlgo::Auto) {
  routing_forward(ExecSpace(), x, gate, logits, probs, topk_idx, topk_weight, algo);
}

/// Routing backward with options: from dL/d(topk_weight) through the scaling, the renormalisation, the top-k selection
/// (a constant; the selection bias gets no gradient) and the score function to dL/d(logits); then
/// dx += d_logits·G, d_gate = d_logitsᵀ·x and d_router_bias = the column sums of d_logits.
/// \param x             [in] [T,H]
/// \param gate          [in] [E,H]
/// \param probs         [in] [T,E] from routing_forward (the scores)
/// \param topk_idx      [in] [T,k]
/// \param topk_weight   [in] [T,k]
/// \param d_topk_weight [in] [T,k]
/// \param d_logits      [out] [T,E]
/// \param dx            [in,out] [T,H]: accumulated into when accumulate_dx, else overwritten
/// \param d_gate        [out] [E,H]
/// \param d_router_bias [out] [E], or an empty View when the router has no bias
/// \param options       [in] the options routing_forward ran with
/// \param d_logits_add  [in] [T,E] a gradient w.r.t. the logits from elsewhere (a router loss: router_losses.hpp),
///                      added to d_logits before the GEMMs and the bias sums, or an empty View
template <class ExecSpace, class XV, class GV, class PV, class IV, class WV, class DWV, class DLV, class DXV,
          class DGV, class DBV>
void routing_backward(const ExecSpace& space, const XV& x, const GV& gate, const PV& probs, const IV& topk_idx,
                      const WV& topk_weight, const DWV& d_topk_weight, const DLV& d_logits, const DXV& dx,
                      const DGV& d_gate, const DBV& d_router_bias, const RoutingOptions& options,
                      bool accumulate_dx = true, GemmAlgo algo = GemmAlgo::Auto,
                      const Kokkos::View<const typename DLV::non_const_value_type**, Kokkos::LayoutRight,
                                         typename ExecSpace::memory_space>& d_logits_add = {}) {
  detail::static_check_view<PV, 2>();
  detail::static_check_view<IV, 2>();
  detail::static_check_view<WV, 2>();
  detail::static_check_view<DWV, 2>();
  detail::static_check_view<DLV, 2>();
  detail::static_check_view<DBV, 1>();
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
  const bool has_db = d_router_bias.extent(0) != 0;
  if (has_db) detail::check_extent(fn, "d_router_bias", d_router_bias, 0, experts);
  const bool has_add = d_logits_add.extent(0) != 0 || d_logits_add.extent(1) != 0;
  if (has_add) {
    detail::check_extent(fn, "d_logits_add", d_logits_add, 0, tokens);
    detail::check_extent(fn, "d_logits_add", d_logits_add, 1, experts);
  }
  detail::check_routing_options(fn, options, experts, k);
  const bool sigmoid = options.score == ScoreFunction::Sigmoid, over_k = options.softmax_over_topk;
  const bool renorm = options.renormalize;
  const A scale = A(options.scaling_factor);
  Kokkos::Profiling::pushRegion("kmoe::route_backward[kokkos]");
  Kokkos::parallel_for(
      "kmoe::route_backward::logits",
      Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t) {
        // Undo the scaling: w'_s = w_s / scale, dL/dw'_s = scale dw_s.
        auto dw = [&](std::int64_t s) { return scale == A(1) ? A(d_topk_weight(t, s)) : scale * A(d_topk_weight(t, s)); };
        auto w = [&](std::int64_t s) { return scale == A(1) ? A(topk_weight(t, s)) : A(topk_weight(t, s)) / scale; };
        // The values v_s before renormalisation: the chosen scores p_s (or their softmax over the k, p_s / sum p).
        A sum_p = 0;
        for (std::int64_t s = 0; s < k; ++s) sum_p += A(probs(t, topk_idx(t, s)));
        // Renormalisation w'_s = v_s / (S + eps): dL/dv_s = (dw'_s - <dw', w'>) / (S + eps), S = sum v.
        // Without it, dL/dv_s = dw'_s. (A softmax over the k sums to 1, so S = 1 there.)
        A dw_dot_w = 0;
        for (std::int64_t s = 0; s < k; ++s) dw_dot_w += dw(s) * w(s);
        const A denom = renorm ? (over_k ? A(1) : sum_p) + A(options.renorm_epsilon) : A(1);
        auto dv = [&](std::int64_t s) { return renorm ? (dw(s) - dw_dot_w) / denom : dw(s); };
        for (std::int64_t e = 0; e < experts; ++e) d_logits(t, e) = T(0);
        if (over_k) {
          // v = softmax over the chosen logits: dL/dl_s = v_s (dv_s - <v, dv>).
          A v_dot_dv = 0;
          for (std::int64_t s = 0; s < k; ++s) v_dot_dv += A(probs(t, topk_idx(t, s))) / sum_p * dv(s);
          for (std::int64_t s = 0; s < k; ++s) {
            const A v = A(probs(t, topk_idx(t, s))) / sum_p;
            d_logits(t, topk_idx(t, s)) = T(v * (dv(s) - v_dot_dv));
          }
        } else if (sigmoid) {
          // p = sigmoid(l): dL/dl = dp p (1 - p) for the chosen experts, 0 elsewhere.
          for (std::int64_t s = 0; s < k; ++s) {
            const A p = A(probs(t, topk_idx(t, s)));
            d_logits(t, topk_idx(t, s)) = T(dv(s) * p * (A(1) - p));
          }
        } else {
          // softmax over E: dL/dl_e = p_e (dp_e - sum_j p_j dp_j)
          A p_dot_dp = 0;
          for (std::int64_t s = 0; s < k; ++s) p_dot_dp += A(probs(t, topk_idx(t, s))) * dv(s);
          for (std::int64_t e = 0; e < experts; ++e) d_logits(t, e) = T(-A(probs(t, e)) * p_dot_dp);
          for (std::int64_t s = 0; s < k; ++s) {
            const std::int64_t e = topk_idx(t, s);
            d_logits(t, e) = T(A(probs(t, e)) * (dv(s) - p_dot_dp));
          }
        }
        if (has_add)
          for (std::int64_t e = 0; e < experts; ++e) d_logits(t, e) = T(A(d_logits(t, e)) + A(d_logits_add(t, e)));
      });
  if (has_db)
    Kokkos::parallel_for(
        "kmoe::route_backward::router_bias",
        Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, experts),
        KOKKOS_LAMBDA(const std::int64_t e) {
          A sum = 0;
          for (std::int64_t t = 0; t < tokens; ++t) sum += A(d_logits(t, e));
          d_router_bias(e) = T(sum);
        });
  gemm(space, 'N', 'N', T(1), d_logits, gate, accumulate_dx ? T(1) : T(0), dx, algo);
  gemm(space, 'T', 'N', T(1), d_logits, x, T(0), d_gate, algo);
  space.fence();
  Kokkos::Profiling::popRegion();
}

/// Routing backward of the default variant: from dL/d(topk_weight) through the renormalisation, the top-k selection
/// (a constant) and the softmax to dL/d(logits), then dx += d_logits·G and d_gate = d_logitsᵀ·x.
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
  using B = Kokkos::View<typename DLV::non_const_value_type*, Kokkos::LayoutRight, typename ExecSpace::memory_space>;
  routing_backward(space, x, gate, probs, topk_idx, topk_weight, d_topk_weight, d_logits, dx, d_gate, B(),
                   RoutingOptions(), accumulate_dx, algo);
}

}  // namespace kmoe::core

// The CUDA backend's overloads (selected by execution space and value types; GemmAlgo::Kokkos forces this file's).
#include <kmoe/config.hpp>
#if KMOE_ENABLE_CUDA
#include <kmoe/core/cuda/routing.hpp>
#endif
