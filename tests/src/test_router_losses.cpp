// The router losses (<kmoe/core/router_losses.hpp>): values against a direct float64 evaluation (per layer,
// concatenated over layers, token weights; float logits within float rounding), against a line-by-line transcription
// of transformers' load_balancing_loss_func and ST-MoE's router z-loss on the oracle's router logits (mixtral-tiny and
// the fine-grained qwen3_moe-tiny; per layer and over the tuple of layers, with and without an attention mask), and
// their gradient w.r.t. the logits against central finite differences.
#include "kernel_test_util.hpp"
#include "kmoe_test.hpp"

#include <kmoe/core/router_losses.hpp>
#include <kmoe/io/safetensors.hpp>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace kmoe;
using kmoe::test::fill_normal;
using kmoe::test::for_each_host_space;
using M = Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>;
using Mf = Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::HostSpace>;
using W = Kokkos::View<double*, Kokkos::HostSpace>;

// ---- a direct evaluation: per token, std::exp and a stable sort (no code shared with the kernels) -------------

struct Direct {
  std::vector<double> routed, prob;  // [E]
  double n = 0, z = 0;
};

void direct_add(Direct& d, const M& logits, std::int64_t k, const std::vector<double>& weight) {
  const std::int64_t T = logits.extent(0), E = logits.extent(1);
  d.routed.resize(E, 0.0);
  d.prob.resize(E, 0.0);
  for (std::int64_t t = 0; t < T; ++t) {
    const double w = weight.empty() ? 1.0 : weight[t];
    double mx = logits(t, 0);
    for (std::int64_t e = 1; e < E; ++e) mx = std::max(mx, logits(t, e));
    std::vector<double> p(E);
    double s = 0;
    for (std::int64_t e = 0; e < E; ++e) s += (p[e] = std::exp(logits(t, e) - mx));
    for (auto& v : p) v /= s;
    std::vector<std::int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return p[a] > p[b]; });
    for (std::int64_t j = 0; j < k; ++j) d.routed[order[j]] += w;
    for (std::int64_t e = 0; e < E; ++e) d.prob[e] += w * p[e];
    const double lse = mx + std::log(s);
    d.n += w;
    d.z += w * lse * lse;
  }
}
double direct_lb(const Direct& d) {
  double s = 0;
  for (std::size_t e = 0; e < d.routed.size(); ++e) s += (d.routed[e] / d.n) * (d.prob[e] / d.n);
  return double(d.routed.size()) * s;
}

// ---- transformers' functions, transcribed tensor op by tensor op ---------------------------------------------

/// load_balancing_loss_func(gate_logits: tuple of [B*S, E], num_experts, top_k, attention_mask [B, S] or None):
///   concatenated = cat(gate_logits, dim=0); routing_weights = softmax(concatenated, -1);
///   selected = topk(routing_weights, top_k).indices; expert_mask = one_hot(selected, E)      [N, k, E]
///   no mask:   tokens_per_expert = mean(expert_mask, 0) [k, E]; router_prob = mean(routing_weights, 0) [E]
///   mask:      expert_attention_mask = mask[None,:,:,None,None].expand(L, B, S, k, E).reshape(-1, k, E)
///              tokens_per_expert = sum(expert_mask * it, 0) / sum(it, 0)
///              router_per_expert_attention_mask = mask[None,:,:,None].expand(L, B, S, E).reshape(-1, E)
///              router_prob = sum(routing_weights * it, 0) / sum(it, 0)
///   return sum(tokens_per_expert * router_prob.unsqueeze(0)) * E
double transformers_load_balancing(const std::vector<M>& gate_logits, std::int64_t E, std::int64_t k,
                                   const std::vector<std::vector<double>>& attention_mask /* [B][S] or empty */) {
  std::vector<std::vector<double>> cat;  // [N][E]
  for (const auto& l : gate_logits)
    for (std::size_t t = 0; t < l.extent(0); ++t) {
      std::vector<double> row(E);
      for (std::int64_t e = 0; e < E; ++e) row[e] = l(t, e);
      cat.push_back(row);
    }
  const std::size_t N = cat.size();
  std::vector<std::vector<double>> rw(N, std::vector<double>(E));
  for (std::size_t t = 0; t < N; ++t) {
    const double mx = *std::max_element(cat[t].begin(), cat[t].end());
    double s = 0;
    for (std::int64_t e = 0; e < E; ++e) s += std::exp(cat[t][e] - mx);
    for (std::int64_t e = 0; e < E; ++e) rw[t][e] = std::exp(cat[t][e] - mx) / s;
  }
  // expert_mask [N][k][E]
  std::vector<std::vector<std::vector<double>>> mask(N, std::vector<std::vector<double>>(k, std::vector<double>(E, 0)));
  for (std::size_t t = 0; t < N; ++t) {
    std::vector<std::int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) { return rw[t][a] > rw[t][b]; });
    for (std::int64_t s = 0; s < k; ++s) mask[t][s][order[s]] = 1;
  }
  std::vector<std::vector<double>> tpe(k, std::vector<double>(E, 0));
  std::vector<double> rpe(E, 0);
  if (attention_mask.empty()) {
    for (std::int64_t s = 0; s < k; ++s)
      for (std::int64_t e = 0; e < E; ++e) {
        for (std::size_t t = 0; t < N; ++t) tpe[s][e] += mask[t][s][e];
        tpe[s][e] /= double(N);
      }
    for (std::int64_t e = 0; e < E; ++e) {
      for (std::size_t t = 0; t < N; ++t) rpe[e] += rw[t][e];
      rpe[e] /= double(N);
    }
  } else {
    const std::size_t B = attention_mask.size(), S = attention_mask[0].size(), L = N / (B * S);
    std::vector<double> flat;  // the expanded mask, reshaped to [L*B*S]
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t b = 0; b < B; ++b)
        for (std::size_t q = 0; q < S; ++q) flat.push_back(attention_mask[b][q]);
    for (std::int64_t s = 0; s < k; ++s)
      for (std::int64_t e = 0; e < E; ++e) {
        double num = 0, den = 0;
        for (std::size_t t = 0; t < N; ++t) {
          num += mask[t][s][e] * flat[t];
          den += flat[t];
        }
        tpe[s][e] = num / den;
      }
    for (std::int64_t e = 0; e < E; ++e) {
      double num = 0, den = 0;
      for (std::size_t t = 0; t < N; ++t) {
        num += rw[t][e] * flat[t];
        den += flat[t];
      }
      rpe[e] = num / den;
    }
  }
  double overall = 0;
  for (std::int64_t s = 0; s < k; ++s)
    for (std::int64_t e = 0; e < E; ++e) overall += tpe[s][e] * rpe[e];
  return overall * double(E);
}

/// SwitchTransformers' router_z_loss_func over the concatenated logits: sum(logsumexp(logits, -1)^2) / tokens.
double st_moe_z_loss(const std::vector<M>& gate_logits) {
  double s = 0, n = 0;
  for (const auto& l : gate_logits)
    for (std::size_t t = 0; t < l.extent(0); ++t) {
      double mx = l(t, 0);
      for (std::size_t e = 1; e < l.extent(1); ++e) mx = std::max(mx, l(t, e));
      double sum = 0;
      for (std::size_t e = 0; e < l.extent(1); ++e) sum += std::exp(l(t, e) - mx);
      const double lse = mx + std::log(sum);
      s += lse * lse;
      n += 1;
    }
  return s / n;
}

M random_logits(std::int64_t T, std::int64_t E, std::uint64_t seed, double scale = 1.5) {
  M l("logits", T, E);
  fill_normal(l, seed, scale);
  return l;
}

W weights_view(const std::vector<double>& w) {
  W v("w", w.size());
  for (std::size_t i = 0; i < w.size(); ++i) v(i) = w[i];
  return v;
}

TEST(RouterLosses, ValuesMatchADirectFloat64EvaluationPerLayerAndConcatenated) {
  for_each_host_space([](auto space) {
    for (std::int64_t E : {1, 4, 8, 64}) {
      for (std::int64_t k : {std::int64_t(1), std::int64_t(2), E}) {
        if (k > E) continue;
        SCOPED_TRACE("E " + std::to_string(E) + " k " + std::to_string(k));
        const std::vector<std::int64_t> tokens = {37, 0, 5};  // a layer (or rank) without tokens too
        std::vector<double> mask37(37);
        for (std::size_t t = 0; t < mask37.size(); ++t) mask37[t] = (t % 5 == 3) ? 0.0 : 1.0;
        for (bool weighted : {false, true}) {
          core::RouterLossStats all;
          Direct dall;
          for (std::size_t l = 0; l < tokens.size(); ++l) {
            const M logits = random_logits(tokens[l], E, 100 + l + 7 * E);
            std::vector<double> w;
            if (weighted) w = tokens[l] == 37 ? mask37 : std::vector<double>(tokens[l], 0.5);
            core::RouterLossStats one;
            core::router_loss_statistics(space, logits, k, weights_view(w), one);
            core::router_loss_statistics(space, logits, k, weights_view(w), all);
            Direct d;
            direct_add(d, logits, k, w);
            direct_add(dall, logits, k, w);
            if (tokens[l] == 0) {
              EXPECT_EQ(one.tokens, 0.0);
              EXPECT_EQ(one.load_balancing_loss(), 0.0);
              EXPECT_EQ(one.z_loss(), 0.0);
              continue;
            }
            EXPECT_NEAR(one.load_balancing_loss(), direct_lb(d), 1e-13 * direct_lb(d));
            EXPECT_NEAR(one.z_loss(), d.z / d.n, 1e-13 * d.z / d.n);
            for (std::int64_t e = 0; e < E; ++e) EXPECT_EQ(one.routed[e], d.routed[e]) << "expert " << e;
          }
          EXPECT_NEAR(all.load_balancing_loss(), direct_lb(dall), 1e-13 * direct_lb(dall));
          EXPECT_NEAR(all.z_loss(), dall.z / dall.n, 1e-13 * dall.z / dall.n);
          // Sum over the routed mask is k per (weighted) token; with k = E every expert is routed every token.
          EXPECT_NEAR(std::accumulate(all.routed.begin(), all.routed.end(), 0.0), double(k) * all.tokens, 1e-12);
          if (k == E) EXPECT_NEAR(all.load_balancing_loss(), double(E), 1e-12);
        }
      }
    }
  });
}

TEST(RouterLosses, FloatLogitsAgreeWithinFloatRounding) {
  const std::int64_t T = 300, E = 16, k = 4;
  const M ld = random_logits(T, E, 5);
  Mf lf("lf", T, E);
  for (std::size_t i = 0; i < ld.span(); ++i) lf.data()[i] = float(ld.data()[i]);
  M lr("lr", T, E);  // the float values, widened: the same selection on both sides
  for (std::size_t i = 0; i < ld.span(); ++i) lr.data()[i] = double(lf.data()[i]);
  core::RouterLossStats sd, sf;
  core::router_loss_statistics(Kokkos::DefaultHostExecutionSpace(), lr, k, sd);
  core::router_loss_statistics(Kokkos::DefaultHostExecutionSpace(), lf, k, sf);
  EXPECT_NEAR(sf.load_balancing_loss(), sd.load_balancing_loss(), 1e-6 * sd.load_balancing_loss());
  EXPECT_NEAR(sf.z_loss(), sd.z_loss(), 1e-6 * sd.z_loss());
  // The gradient in float against the one in double.
  const core::RouterLossCoefficients c{0.7, 0.3};
  M gd("gd", T, E);
  Mf gf("gf", T, E);
  core::router_loss_backward(Kokkos::DefaultHostExecutionSpace(), lr, sd, c, gd);
  core::router_loss_backward(Kokkos::DefaultHostExecutionSpace(), lf, sf, c, gf);
  EXPECT_LT(test::rel_l2(gf, gd), 1e-5);
}

/// The oracle's router logits of one layer [T, E] and its top-k [T, k].
struct OracleLayer {
  M logits;
  std::vector<std::int64_t> topk;
  std::int64_t k = 0;
};
OracleLayer oracle_layer(const std::string& set, int layer) {
  const auto ref = io::SafetensorsFile::open(test::testdata_dir() / set / (set + "-ref.safetensors"));
  const std::string p = "layers." + std::to_string(layer) + ".";
  const auto& lt = ref.tensor(p + "router_logits");
  const auto lv = io::to_host_view<double>(lt);
  OracleLayer o;
  o.logits = M("logits", lt.shape[0], lt.shape[1]);
  for (std::size_t i = 0; i < o.logits.span(); ++i) o.logits.data()[i] = lv(i);
  const auto& it = ref.tensor(p + "topk_idx");
  const auto iv = io::to_host_view<std::int64_t>(it);
  o.topk.assign(iv.data(), iv.data() + iv.extent(0));
  o.k = it.shape[1];
  return o;
}

TEST(RouterLosses, MatchTransformersLoadBalancingLossFuncOnTheOracleLogits) {
  for (const std::string set : {"mixtral-tiny", "qwen3_moe-tiny"}) {
    SCOPED_TRACE(set);
    const OracleLayer l0 = oracle_layer(set, 0), l1 = oracle_layer(set, 1);
    const std::int64_t E = l0.logits.extent(1), k = l0.k, T = l0.logits.extent(0);
    ASSERT_EQ(T, 10);  // x is [2, 5, hidden]: batch 2, sequence 5
    // The mask of the loss is the layer's own top-k (the oracle's topk_idx).
    for (const OracleLayer* l : {&l0, &l1}) {
      core::RouterLossStats s;
      core::router_loss_statistics(Kokkos::DefaultHostExecutionSpace(), l->logits, k, s);
      std::vector<double> routed(E, 0.0);
      for (auto e : l->topk) routed[e] += 1;
      for (std::int64_t e = 0; e < E; ++e) EXPECT_EQ(s.routed[e], routed[e]) << "expert " << e;
    }
    const std::vector<std::vector<double>> no_mask;
    const std::vector<std::vector<double>> attention = {{1, 1, 1, 1, 1}, {0, 0, 1, 1, 1}};  // left padding
    for (const auto* am : {&no_mask, &attention}) {
      SCOPED_TRACE(am->empty() ? "no attention mask" : "attention mask");
      std::vector<double> w;
      for (const auto& row : *am) w.insert(w.end(), row.begin(), row.end());
      const W wv = weights_view(w);
      core::RouterLossStats s0, s1, both;
      core::router_loss_statistics(Kokkos::DefaultHostExecutionSpace(), l0.logits, k, wv, s0);
      core::router_loss_statistics(Kokkos::DefaultHostExecutionSpace(), l1.logits, k, wv, s1);
      both += s0;
      both += s1;
      const double hf0 = transformers_load_balancing({l0.logits}, E, k, *am);
      const double hf1 = transformers_load_balancing({l1.logits}, E, k, *am);
      const double hf = transformers_load_balancing({l0.logits, l1.logits}, E, k, *am);
      EXPECT_NEAR(s0.load_balancing_loss(), hf0, 1e-14 * hf0);
      EXPECT_NEAR(s1.load_balancing_loss(), hf1, 1e-14 * hf1);
      EXPECT_NEAR(both.load_balancing_loss(), hf, 1e-14 * hf);
      // Concatenation is not the mean of the per-layer losses (the products of means differ).
      EXPECT_GT(std::abs(hf - 0.5 * (hf0 + hf1)), 1e-6);
      if (am->empty()) {
        EXPECT_NEAR(s0.z_loss(), st_moe_z_loss({l0.logits}), 1e-14 * s0.z_loss());
        EXPECT_NEAR(both.z_loss(), st_moe_z_loss({l0.logits, l1.logits}), 1e-14 * both.z_loss());
      }
      std::printf("%s %s: load balancing layer 0 %.15f, layer 1 %.15f, both layers %.15f; z-loss both %.15f\n",
                  set.c_str(), am->empty() ? "no mask" : "mask", s0.load_balancing_loss(), s1.load_balancing_loss(),
                  both.load_balancing_loss(), both.z_loss());
    }
  }
}

/// L(logits of every layer) = coef . (load balancing, z) over the concatenation, mask fixed at `base`'s top-k.
double loss_of(const std::vector<M>& layers, std::int64_t k, const std::vector<double>& w,
               const core::RouterLossCoefficients& c) {
  core::RouterLossStats s;
  for (const auto& l : layers)
    core::router_loss_statistics(Kokkos::DefaultHostExecutionSpace(), l, k, weights_view(w), s);
  return core::router_loss(s, c);
}

TEST(RouterLosses, GradientMatchesFiniteDifferences) {
  for_each_host_space([](auto space) {
    const std::int64_t T = 12, E = 6, k = 2;
    for (const core::RouterLossCoefficients c :
         {core::RouterLossCoefficients{1, 0}, core::RouterLossCoefficients{0, 1}, core::RouterLossCoefficients{0.3, 0.05}}) {
      for (bool weighted : {false, true}) {
        SCOPED_TRACE("coef " + std::to_string(c.load_balancing) + "/" + std::to_string(c.z_loss) +
                     (weighted ? " weighted" : ""));
        std::vector<M> layers = {random_logits(T, E, 11), random_logits(T, E, 12)};
        std::vector<double> w;
        if (weighted)
          for (std::int64_t t = 0; t < T; ++t) w.push_back(t % 4 == 0 ? 0.0 : 1.0);
        core::RouterLossStats s;
        for (const auto& l : layers) core::router_loss_statistics(space, l, k, weights_view(w), s);
        for (std::size_t li = 0; li < layers.size(); ++li) {
          M d("d", T, E);
          Kokkos::deep_copy(d, 1.0);
          M d_acc("d_acc", T, E);
          Kokkos::deep_copy(d_acc, 1.0);
          core::router_loss_backward(space, layers[li], weights_view(w), s, c, d);
          core::router_loss_backward(space, layers[li], weights_view(w), s, c, d_acc, true);
          const double h = 1e-6;
          double worst = 0, scale = 0;
          for (std::int64_t t = 0; t < T; ++t)
            for (std::int64_t e = 0; e < E; ++e) {
              const double keep = layers[li](t, e);
              layers[li](t, e) = keep + h;
              const double up = loss_of(layers, k, w, c);
              layers[li](t, e) = keep - h;
              const double down = loss_of(layers, k, w, c);
              layers[li](t, e) = keep;
              const double fd = (up - down) / (2 * h);
              worst = std::max(worst, std::abs(fd - d(t, e)));
              scale = std::max(scale, std::abs(fd));
              EXPECT_NEAR(d_acc(t, e), d(t, e) + 1.0, 1e-14);
              if (weighted && w[t] == 0) EXPECT_EQ(d(t, e), 0.0);
            }
          EXPECT_LT(worst, 1e-7 * std::max(scale, 1e-3)) << "layer " << li << " scale " << scale;
        }
      }
    }
  });
}

TEST(RouterLosses, MismatchedStatisticsAndShapesAreInputErrors) {
  const auto space = Kokkos::DefaultHostExecutionSpace();
  core::RouterLossStats s;
  core::router_loss_statistics(space, random_logits(4, 8, 1), 2, s);
  EXPECT_THROW(core::router_loss_statistics(space, random_logits(4, 6, 1), 2, s), InputError);
  EXPECT_THROW(core::router_loss_statistics(space, random_logits(4, 8, 1), 3, s), InputError);
  EXPECT_THROW(core::router_loss_statistics(space, random_logits(4, 8, 1), 9, s), InputError);
  EXPECT_THROW(core::router_loss_statistics(space, random_logits(4, 8, 1), 2, W("w", 3), s), InputError);
  M d("d", 4, 6);
  EXPECT_THROW(core::router_loss_backward(space, random_logits(4, 8, 1), s, {1, 0}, d), InputError);
  core::RouterLossStats other = core::RouterLossStats::zeros(8, 1);
  EXPECT_THROW(s += other, InputError);
  EXPECT_THROW(s.unpack(std::vector<double>(3)), InputError);
}

}  // namespace
