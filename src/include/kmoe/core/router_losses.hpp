/// \file router_losses.hpp
/// \brief The router's auxiliary losses and their gradients w.r.t. the router logits: the Switch/Mixtral
/// load-balancing loss with the semantics of transformers' `load_balancing_loss_func`, and the ST-MoE router z-loss.
///
/// For tokens t with weights m_t (1 each, or a padding mask as transformers' attention_mask) and E experts:
///   p[t] = softmax(logits[t]);  S_t = the top_k experts of p[t] (ties to the lower index, as routing_forward)
///   N = sum_t m_t;  f_e = sum_t m_t [e in S_t] / N;  P_e = sum_t m_t p[t,e] / N
///   load balancing  = E * sum_e f_e P_e     (sum_e f_e = top_k: a perfectly even router scores top_k)
///   z-loss          = sum_t m_t logsumexp(logits[t])^2 / N
/// The top-k is recomputed from the logits (as transformers does), so the losses need only the logits: any layer's
/// routing().logits, the bf16 CUDA layer's fp32 ones included.
///
/// Everything but the last products is a sum over tokens, which RouterLossStats carries. Adding the statistics of
/// several layers gives transformers' loss over a tuple of layer logits (it concatenates the layers' tokens: one loss
/// over all of them, not the mean of per-layer losses); the statistics of one layer give the per-layer loss. Adding
/// those of several ranks (comm::allreduce_router_loss_stats) gives the loss of the global batch: every rank then holds
/// the same loss, and router_loss_backward gives each rank the gradient of that global loss w.r.t. its own tokens'
/// logits, so the router gradients summed over the ranks (comm::GradientSet) equal the single-process ones.
///
/// Gradient: the expert mask is a constant (topk and one_hot have no gradient in autograd), so
///   d load_balancing / d p[t,e] = E m_t f_e / N,   d z-loss / d logits[t,j] = 2 m_t logsumexp(logits[t]) p[t,j] / N,
/// and through the softmax d logits[t,j] = p[t,j] (dp[t,j] - sum_e p[t,e] dp[t,e]).
///
/// Per-token math runs in accum_t of the logits (float32 for float logits, float64 for double); sums over tokens in
/// float64. Both functions block until their results are written.
#pragma once

#include <kmoe/core/kernel_common.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe::core {

/// The sums over tokens that the router losses are made of (host, float64). Additive over layers and ranks.
struct RouterLossStats {
  std::int64_t top_k = 0;          ///< experts per token of the load-balancing loss's mask
  std::vector<double> routed;      ///< [E] sum_t m_t [e in S_t]
  std::vector<double> prob_sum;    ///< [E] sum_t m_t p[t,e]
  double tokens = 0;               ///< N = sum_t m_t (the token count without weights)
  double z_sum = 0;                ///< sum_t m_t logsumexp(logits[t])^2

  std::int64_t num_experts() const { return static_cast<std::int64_t>(routed.size()); }
  bool empty() const { return routed.empty(); }

  /// Zero sums for E experts and top_k.
  static RouterLossStats zeros(std::int64_t experts, std::int64_t k) {
    RouterLossStats s;
    s.top_k = k;
    s.routed.assign(static_cast<std::size_t>(experts), 0.0);
    s.prob_sum.assign(static_cast<std::size_t>(experts), 0.0);
    return s;
  }

  /// Concatenation (of layers, or of ranks' tokens): the sums add. An empty object takes o's shape; InputError when
  /// the expert counts or top_k differ.
  RouterLossStats& operator+=(const RouterLossStats& o) {
    if (o.empty()) return *this;
    if (empty()) *this = zeros(o.num_experts(), o.top_k);
    KMOE_CHECK_INPUT(o.num_experts() == num_experts() && o.top_k == top_k,
                     "kmoe::core::RouterLossStats: adding statistics of ", o.num_experts(), " experts, top_k ",
                     o.top_k, " to those of ", num_experts(), " experts, top_k ", top_k);
    for (std::size_t e = 0; e < routed.size(); ++e) {
      routed[e] += o.routed[e];
      prob_sum[e] += o.prob_sum[e];
    }
    tokens += o.tokens;
    z_sum += o.z_sum;
    return *this;
  }

  /// E * sum_e f_e P_e; 0 without tokens (N = 0).
  double load_balancing_loss() const {
    if (!(tokens > 0)) return 0.0;
    double s = 0;
    for (std::size_t e = 0; e < routed.size(); ++e) s += routed[e] * prob_sum[e];
    return static_cast<double>(num_experts()) * s / (tokens * tokens);
  }

  /// Mean over the (weighted) tokens of logsumexp(logits)^2; 0 without tokens.
  double z_loss() const { return tokens > 0 ? z_sum / tokens : 0.0; }

  /// The sums as one array, [routed (E), prob_sum (E), tokens, z_sum]: what an allreduce adds.
  std::vector<double> pack() const {
    std::vector<double> v(routed);
    v.insert(v.end(), prob_sum.begin(), prob_sum.end());
    v.push_back(tokens);
    v.push_back(z_sum);
    return v;
  }
  /// Inverse of pack() for this object's E.
  void unpack(const std::vector<double>& v) {
    const std::size_t e = routed.size();
    KMOE_CHECK_INPUT(v.size() == 2 * e + 2, "kmoe::core::RouterLossStats::unpack: ", v.size(), " values for ", e,
                     " experts (expected ", 2 * e + 2, ")");
    for (std::size_t i = 0; i < e; ++i) {
      routed[i] = v[i];
      prob_sum[i] = v[e + i];
    }
    tokens = v[2 * e];
    z_sum = v[2 * e + 1];
  }
};

/// How much of each router loss the objective adds: coef_lb * load_balancing + coef_z * z-loss (transformers'
/// router_aux_loss_coef, ST-MoE's router_z_loss_coef).
struct RouterLossCoefficients {
  double load_balancing = 0;
  double z_loss = 0;
  bool any() const { return load_balancing != 0 || z_loss != 0; }
};

/// coef.load_balancing * stats.load_balancing_loss() + coef.z_loss * stats.z_loss().
inline double router_loss(const RouterLossStats& stats, const RouterLossCoefficients& coef) {
  return coef.load_balancing * stats.load_balancing_loss() + coef.z_loss * stats.z_loss();
}

namespace detail {

/// "No token weights": an empty rank-1 View (every token weighs 1).
template <class Space>
using no_token_weight_t = Kokkos::View<const double*, typename Space::memory_space>;

template <class LV, class MV>
void check_router_loss_args(const char* fn, const LV& logits, const MV& token_weight) {
  static_check_view<LV, 2>();
  static_assert(Kokkos::is_view<MV>::value && static_cast<int>(MV::rank) == 1, "token_weight is a rank-1 View");
  KMOE_CHECK_INPUT(logits.extent(1) >= 1, fn, ": logits are [", logits.extent(0), ",", logits.extent(1),
                   "], expected at least one expert");
  KMOE_CHECK_INPUT(token_weight.extent(0) == 0 || token_weight.extent(0) == logits.extent(0), fn,
                   ": token_weight has ", token_weight.extent(0), " entries for ", logits.extent(0),
                   " tokens (expected as many, or none for weights 1)");
}

}  // namespace detail

/// Adds the statistics of one layer's router logits to `stats` (layers add up: see the file comment).
/// \param space        [in] execution space instance (blocks: the sums are copied to the host)
/// \param logits       [in] [T,E] router logits (float or double; the layer's routing().logits)
/// \param top_k        [in] experts per token of the load-balancing mask (1 <= top_k <= E)
/// \param token_weight [in] [T] m_t (0/1 padding mask, or any weights), or an empty View: every token weighs 1
/// \param stats        [in,out] accumulated into; when empty, set to zeros of E and top_k first. InputError when its
///                     E or top_k differ
template <class ExecSpace, class LV, class MV>
void router_loss_statistics(const ExecSpace& space, const LV& logits, std::int64_t top_k, const MV& token_weight,
                            RouterLossStats& stats) {
  constexpr const char* fn = "kmoe::core::router_loss_statistics";
  detail::check_router_loss_args(fn, logits, token_weight);
  using T = typename LV::non_const_value_type;
  using A = accum_t<T>;
  using mem = typename ExecSpace::memory_space;
  const std::int64_t tokens = logits.extent(0), experts = logits.extent(1);
  KMOE_CHECK_INPUT(top_k >= 1 && top_k <= experts, fn, ": top_k = ", top_k, " outside [1, ", experts, "]");
  RouterLossStats add = RouterLossStats::zeros(experts, top_k);
  if (stats.empty()) stats = RouterLossStats::zeros(experts, top_k);
  KMOE_CHECK_INPUT(stats.num_experts() == experts && stats.top_k == top_k, fn, ": stats hold ", stats.num_experts(),
                   " experts, top_k ", stats.top_k, "; the logits have ", experts, " experts, top_k ", top_k);
  if (tokens == 0) return;
  Kokkos::Profiling::pushRegion("kmoe::router_loss_statistics[kokkos]");
  const bool weighted = token_weight.extent(0) != 0;
  // Per token: the softmax's max and denominator, and the chosen experts.
  Kokkos::View<A*, mem> mx(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::router_loss::max"), tokens);
  Kokkos::View<A*, mem> den(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::router_loss::den"), tokens);
  Kokkos::View<std::int32_t**, Kokkos::LayoutRight, mem> chosen(
      Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::router_loss::chosen"), tokens, top_k);
  Kokkos::parallel_for(
      "kmoe::router_loss::softmax_topk",
      Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t) {
        A m = A(logits(t, 0));
        for (std::int64_t e = 1; e < experts; ++e) m = A(logits(t, e)) > m ? A(logits(t, e)) : m;
        A sum = 0;
        for (std::int64_t e = 0; e < experts; ++e) sum += ::kmoe::detail::exp(A(logits(t, e)) - m);
        mx(t) = m;
        den(t) = sum;
        // k passes of argmax over the probabilities as routing_forward computes them (strict '>': lower index on
        // ties), so the mask is the layer's own selection.
        for (std::int64_t s = 0; s < top_k; ++s) {
          std::int64_t best = -1;
          A best_p = 0;
          for (std::int64_t e = 0; e < experts; ++e) {
            bool taken = false;
            for (std::int64_t j = 0; j < s; ++j) taken = taken || chosen(t, j) == e;
            if (taken) continue;
            const A p = T(::kmoe::detail::exp(A(logits(t, e)) - m) / sum);
            if (best < 0 || p > best_p) {
              best = e;
              best_p = p;
            }
          }
          chosen(t, s) = static_cast<std::int32_t>(best);
        }
      });
  // Per expert: one team sums over the tokens. sums(e) = routed, sums(E + e) = prob_sum.
  Kokkos::View<double*, mem> sums("kmoe::router_loss::sums", 2 * experts);
  using team_policy = Kokkos::TeamPolicy<ExecSpace>;
  using member = typename team_policy::member_type;
  Kokkos::parallel_for(
      "kmoe::router_loss::per_expert", team_policy(space, static_cast<int>(experts), Kokkos::AUTO),
      KOKKOS_LAMBDA(const member& team) {
        const std::int64_t e = team.league_rank();
        double routed = 0, prob = 0;
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(team, tokens),
            [&](const std::int64_t t, double& acc) {
              const double w = weighted ? double(token_weight(t)) : 1.0;
              bool in = false;
              for (std::int64_t s = 0; s < top_k; ++s) in = in || chosen(t, s) == e;
              acc += in ? w : 0.0;
            },
            routed);
        Kokkos::parallel_reduce(
            Kokkos::TeamThreadRange(team, tokens),
            [&](const std::int64_t t, double& acc) {
              const double w = weighted ? double(token_weight(t)) : 1.0;
              acc += w * double(T(::kmoe::detail::exp(A(logits(t, e)) - mx(t)) / den(t)));
            },
            prob);
        Kokkos::single(Kokkos::PerTeam(team), [&]() {
          sums(e) = routed;
          sums(experts + e) = prob;
        });
      });
  double n = 0, z = 0;
  Kokkos::parallel_reduce(
      "kmoe::router_loss::tokens", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t, double& acc) { acc += weighted ? double(token_weight(t)) : 1.0; }, n);
  Kokkos::parallel_reduce(
      "kmoe::router_loss::z", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t, double& acc) {
        const double lse = double(mx(t) + ::kmoe::detail::log(den(t)));
        acc += (weighted ? double(token_weight(t)) : 1.0) * lse * lse;
      },
      z);
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), sums);
  for (std::int64_t e = 0; e < experts; ++e) {
    add.routed[e] = h(e);
    add.prob_sum[e] = h(experts + e);
  }
  add.tokens = n;
  add.z_sum = z;
  stats += add;
  Kokkos::Profiling::popRegion();
}

/// router_loss_statistics with every token weighing 1.
template <class ExecSpace, class LV>
void router_loss_statistics(const ExecSpace& space, const LV& logits, std::int64_t top_k, RouterLossStats& stats) {
  router_loss_statistics(space, logits, top_k, detail::no_token_weight_t<ExecSpace>(), stats);
}

/// The gradient of coef.load_balancing * load_balancing + coef.z_loss * z-loss, both of `stats` (this layer's, or
/// the sum over layers and ranks that the loss was formed from), w.r.t. these logits (tokens counted in `stats`).
/// \param space        [in] execution space instance (blocks)
/// \param logits       [in] [T,E] the logits the statistics were taken from
/// \param token_weight [in] [T] the weights router_loss_statistics had, or an empty View (weights 1)
/// \param stats        [in] the statistics the loss is formed from (E experts); nothing is added when its N = 0
/// \param coef         [in] the coefficients
/// \param d_logits     [out] [T,E] (same value type as logits): overwritten, or added to when accumulate
template <class ExecSpace, class LV, class MV, class DV>
void router_loss_backward(const ExecSpace& space, const LV& logits, const MV& token_weight,
                          const RouterLossStats& stats, const RouterLossCoefficients& coef, const DV& d_logits,
                          bool accumulate = false) {
  constexpr const char* fn = "kmoe::core::router_loss_backward";
  detail::check_router_loss_args(fn, logits, token_weight);
  detail::static_check_view<DV, 2>();
  using T = typename DV::non_const_value_type;
  using A = accum_t<typename LV::non_const_value_type>;
  using mem = typename ExecSpace::memory_space;
  const std::int64_t tokens = logits.extent(0), experts = logits.extent(1);
  detail::check_extent(fn, "d_logits", d_logits, 0, tokens);
  detail::check_extent(fn, "d_logits", d_logits, 1, experts);
  KMOE_CHECK_INPUT(stats.num_experts() == experts, fn, ": stats hold ", stats.num_experts(), " experts, the logits ",
                   experts);
  if (tokens == 0) return;
  Kokkos::Profiling::pushRegion("kmoe::router_loss_backward[kokkos]");
  const bool weighted = token_weight.extent(0) != 0;
  const double n = stats.tokens;
  // dL/dp[t,e] = m_t g_e with g_e = coef_lb E f_e / N = coef_lb E routed_e / N^2; the z-loss adds zc lse_t to dL/dl.
  Kokkos::View<A*, mem> g(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::router_loss::g"), experts);
  {
    auto gh = Kokkos::create_mirror_view(g);
    for (std::int64_t e = 0; e < experts; ++e)
      gh(e) = n > 0 ? A(coef.load_balancing * double(experts) * stats.routed[e] / (n * n)) : A(0);
    Kokkos::deep_copy(space, g, gh);
  }
  const A zc = n > 0 ? A(2.0 * coef.z_loss / n) : A(0);
  Kokkos::parallel_for(
      "kmoe::router_loss_backward", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, tokens),
      KOKKOS_LAMBDA(const std::int64_t t) {
        A m = A(logits(t, 0));
        for (std::int64_t e = 1; e < experts; ++e) m = A(logits(t, e)) > m ? A(logits(t, e)) : m;
        A sum = 0;
        for (std::int64_t e = 0; e < experts; ++e) sum += ::kmoe::detail::exp(A(logits(t, e)) - m);
        A p_dot_g = 0;
        for (std::int64_t e = 0; e < experts; ++e) p_dot_g += ::kmoe::detail::exp(A(logits(t, e)) - m) / sum * g(e);
        const A w = weighted ? A(token_weight(t)) : A(1);
        const A z = zc * (m + ::kmoe::detail::log(sum));
        for (std::int64_t e = 0; e < experts; ++e) {
          const A p = ::kmoe::detail::exp(A(logits(t, e)) - m) / sum;
          const A d = w * p * (g(e) - p_dot_g + z);
          d_logits(t, e) = accumulate ? T(A(d_logits(t, e)) + d) : T(d);
        }
      });
  space.fence();
  Kokkos::Profiling::popRegion();
}

/// router_loss_backward with every token weighing 1.
template <class ExecSpace, class LV, class DV>
void router_loss_backward(const ExecSpace& space, const LV& logits, const RouterLossStats& stats,
                          const RouterLossCoefficients& coef, const DV& d_logits, bool accumulate = false) {
  router_loss_backward(space, logits, detail::no_token_weight_t<ExecSpace>(), stats, coef, d_logits, accumulate);
}

}  // namespace kmoe::core
