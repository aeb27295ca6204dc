// Routing variants (RoutingOptions): each against a direct, sort-based float64 evaluation; their backward against
// finite differences (into G, x and the router bias); ties in group selection; option checks. Then every family of the
// transformers oracle (KMOE_TESTDATA_DIR): logits, scores, top-k and weights in float64 (1e-10 of the *_f64 tensors)
// and float32 (1e-5), top-k exact, and the router gradient through routing_backward from the oracle's dL/dy.
#include "kernel_test_util.hpp"
#include "kmoe_test.hpp"

#include <kmoe/core/routing.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
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
using V = Kokkos::View<double*, Kokkos::LayoutRight, Kokkos::HostSpace>;
using I = Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Kokkos::HostSpace>;

/// What routing decides for one token, evaluated directly (stable sorts, no shared code with the kernel).
struct Direct {
  std::vector<double> logits, probs, weights;
  std::vector<std::int64_t> idx;
};

Direct direct(const std::vector<double>& xrow, const M& g, const V& rb, const V& sb, const core::RoutingOptions& o,
              std::int64_t k) {
  const std::int64_t E = g.extent(0), H = g.extent(1);
  Direct d;
  d.logits.assign(E, 0.0);
  for (std::int64_t e = 0; e < E; ++e) {
    for (std::int64_t h = 0; h < H; ++h) d.logits[e] += xrow[h] * g(e, h);
    if (rb.extent(0)) d.logits[e] += rb(e);
  }
  d.probs.resize(E);
  if (o.score == core::ScoreFunction::Sigmoid) {
    for (std::int64_t e = 0; e < E; ++e) d.probs[e] = 1.0 / (1.0 + std::exp(-d.logits[e]));
  } else {
    const double mx = *std::max_element(d.logits.begin(), d.logits.end());
    double sum = 0;
    for (std::int64_t e = 0; e < E; ++e) sum += std::exp(d.logits[e] - mx);
    for (std::int64_t e = 0; e < E; ++e) d.probs[e] = std::exp(d.logits[e] - mx) / sum;
  }
  std::vector<double> c(E);
  for (std::int64_t e = 0; e < E; ++e)
    c[e] = (o.softmax_over_topk ? d.logits[e] : d.probs[e]) + (sb.extent(0) ? sb(e) : 0.0);
  std::vector<bool> eligible(E, true);
  if (o.n_group > 1) {
    const std::int64_t size = E / o.n_group;
    std::vector<double> score(o.n_group);
    for (std::int64_t gi = 0; gi < o.n_group; ++gi) {
      std::vector<double> in(c.begin() + gi * size, c.begin() + (gi + 1) * size);
      std::sort(in.begin(), in.end(), std::greater<double>());
      score[gi] = std::accumulate(in.begin(), in.begin() + o.group_score_topk, 0.0);
    }
    std::vector<std::int64_t> order(o.n_group);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return score[a] > score[b]; });
    for (std::int64_t e = 0; e < E; ++e) eligible[e] = false;
    for (std::int64_t r = 0; r < o.topk_group; ++r)
      for (std::int64_t e = order[r] * size; e < (order[r] + 1) * size; ++e) eligible[e] = true;
  }
  std::vector<std::int64_t> order;
  for (std::int64_t e = 0; e < E; ++e)
    if (eligible[e]) order.push_back(e);
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return c[a] > c[b]; });
  d.idx.assign(order.begin(), order.begin() + k);
  std::vector<double> v(k);
  for (std::int64_t s = 0; s < k; ++s) v[s] = d.probs[d.idx[s]];
  if (o.softmax_over_topk) {
    double sum = 0;
    for (std::int64_t s = 0; s < k; ++s) sum += std::exp(d.logits[d.idx[s]]);
    for (std::int64_t s = 0; s < k; ++s) v[s] = std::exp(d.logits[d.idx[s]]) / sum;
  }
  double sum = 0;
  for (double a : v) sum += a;
  for (std::int64_t s = 0; s < k; ++s)
    d.weights.push_back((o.renormalize ? v[s] / (sum + o.renorm_epsilon) : v[s]) * o.scaling_factor);
  return d;
}

/// The variants the families need, plus the combinations in between.
struct Case {
  std::string name;
  core::RoutingOptions options;
  bool router_bias = false, selection_bias = false;
};

std::vector<Case> cases() {
  std::vector<Case> v;
  v.push_back({"default", {}});
  core::RoutingOptions o;
  o.renormalize = false;
  v.push_back({"softmax, no renormalisation (OLMoE)", o});
  o = {};
  o.softmax_over_topk = true;
  o.renormalize = false;
  v.push_back({"router bias, softmax over the k (GPT-OSS)", o, true});
  o = {};
  o.score = core::ScoreFunction::Sigmoid;
  o.renorm_epsilon = 1e-20;
  o.n_group = 4;
  o.topk_group = 2;
  o.scaling_factor = 2.5;
  v.push_back({"sigmoid, selection bias, groups, renorm eps, scaling (DeepSeek-V3)", o, false, true});
  o.renormalize = false;
  v.push_back({"sigmoid, groups, no renormalisation", o, true, true});
  o = {};
  o.n_group = 2;
  o.topk_group = 1;
  o.group_score_topk = 1;
  o.scaling_factor = 0.5;
  v.push_back({"softmax, group score = max, selection bias, scaling", o, false, true});
  return v;
}

TEST(RoutingVariants, MatchDirectEvaluation) {
  for_each_host_space([](auto space) {
    const std::int64_t T = 9, H = 6, E = 8, k = 3;
    for (const auto& c : cases()) {
      SCOPED_TRACE(c.name);
      M x("x", T, H), g("g", E, H), logits("l", T, E), probs("p", T, E), w("w", T, k);
      V rb("rb", c.router_bias ? E : 0), sb("sb", c.selection_bias ? E : 0);
      I idx("i", T, k);
      fill_normal(x, 1);
      fill_normal(g, 2);
      fill_normal(rb, 3, 0.3);
      fill_normal(sb, 4, 0.2);
      core::routing_forward(space, x, g, rb, sb, logits, probs, idx, w, c.options);
      for (std::int64_t t = 0; t < T; ++t) {
        const Direct d = direct(std::vector<double>(&x(t, 0), &x(t, 0) + H), g, rb, sb, c.options, k);
        for (std::int64_t e = 0; e < E; ++e) {
          EXPECT_NEAR(logits(t, e), d.logits[e], 1e-13);
          EXPECT_NEAR(probs(t, e), d.probs[e], 1e-14);
        }
        for (std::int64_t s = 0; s < k; ++s) {
          EXPECT_EQ(idx(t, s), d.idx[s]) << "token " << t << " slot " << s;
          EXPECT_NEAR(w(t, s), d.weights[s], 1e-14) << "token " << t << " slot " << s;
        }
      }
    }
  });
}

TEST(RoutingVariants, DefaultOptionsAreTheOverloadWithoutOptions) {
  const std::int64_t T = 11, H = 5, E = 7, k = 2;
  M x("x", T, H), g("g", E, H), l1("l", T, E), p1("p", T, E), w1("w", T, k), l2("l", T, E), p2("p", T, E),
      w2("w", T, k);
  I i1("i", T, k), i2("i", T, k);
  fill_normal(x, 5);
  fill_normal(g, 6);
  Kokkos::Serial space;
  core::routing_forward(space, x, g, l1, p1, i1, w1);
  core::routing_forward(space, x, g, V(), V(), l2, p2, i2, w2, core::RoutingOptions());
  for (std::size_t i = 0; i < w1.span(); ++i) {
    EXPECT_EQ(w1.data()[i], w2.data()[i]);
    EXPECT_EQ(i1.data()[i], i2.data()[i]);
  }
  for (std::size_t i = 0; i < p1.span(); ++i) EXPECT_EQ(p1.data()[i], p2.data()[i]);
}

TEST(RoutingVariants, BackwardMatchesFiniteDifferences) {
  const std::int64_t T = 5, H = 4, E = 8;
  for (const auto& c : cases())
    for (std::int64_t k : {1, 2, 4}) {
      SCOPED_TRACE(c.name + ", k = " + std::to_string(k));
      M x("x", T, H), g("g", E, H), logits("l", T, E), probs("p", T, E), w("w", T, k), dw("dw", T, k);
      M dl("dl", T, E), dx("dx", T, H), dg("dg", E, H);
      V rb("rb", c.router_bias ? E : 0), sb("sb", c.selection_bias ? E : 0), drb("drb", rb.extent(0));
      I idx("i", T, k);
      fill_normal(x, 7);
      fill_normal(g, 8);
      fill_normal(rb, 9, 0.3);
      fill_normal(sb, 10, 0.2);
      fill_normal(dw, 11);
      Kokkos::Serial space;
      core::routing_forward(space, x, g, rb, sb, logits, probs, idx, w, c.options);
      core::routing_backward(space, x, g, probs, idx, w, dw, dl, dx, dg, drb, c.options, false);
      // L = sum(w * dw) at fixed selection; central differences in every entry of G, x and the router bias.
      auto loss = [&]() {
        M l2("l", T, E), p2("p", T, E), w2("w", T, k);
        I i2("i", T, k);
        core::routing_forward(space, x, g, rb, sb, l2, p2, i2, w2, c.options);
        for (std::int64_t t = 0; t < T; ++t)
          for (std::int64_t s = 0; s < k; ++s) EXPECT_EQ(i2(t, s), idx(t, s)) << "selection changed: shrink eps";
        double L = 0;
        for (std::int64_t t = 0; t < T; ++t)
          for (std::int64_t s = 0; s < k; ++s) L += w2(t, s) * dw(t, s);
        return L;
      };
      const double eps = 1e-6;
      int nonzero = 0;
      auto check = [&](auto v, auto grad) {
        for (std::size_t i = 0; i < v.span(); ++i) {
          const double keep = v.data()[i];
          v.data()[i] = keep + eps;
          const double lp = loss();
          v.data()[i] = keep - eps;
          const double lm = loss();
          v.data()[i] = keep;
          EXPECT_NEAR(grad.data()[i], (lp - lm) / (2 * eps), 1e-8) << "entry " << i;
          nonzero += std::abs(grad.data()[i]) > 1e-6;
        }
      };
      check(g, dg);
      check(x, dx);
      check(rb, drb);
      // k = 1 with renormalisation makes every weight 1 (a zero gradient); elsewhere the check is not vacuous.
      if (!(k == 1 && (c.options.renormalize || c.options.softmax_over_topk))) EXPECT_GT(nonzero, 0);
    }
}

TEST(RoutingVariants, GroupTiesKeepTheLowerGroupAndTheSelectionBiasOnlySteers) {
  // Four experts in two groups; sigmoid scores of the logits 0: every score is 1/2. The selection bias makes groups
  // 0 and 1 tie (scores 0.6 + 0.5 each): the lower group wins, and expert 0 (bias 0.1) leads within it. The weights
  // are the unbiased scores, renormalised.
  M x("x", 1, 1), g("g", 4, 1), logits("l", 1, 4), probs("p", 1, 4), w("w", 1, 2);
  V sb("sb", 4);
  I idx("i", 1, 2);
  sb(0) = 0.1;
  sb(1) = 0.0;
  sb(2) = 0.0;
  sb(3) = 0.1;
  core::RoutingOptions o;
  o.score = core::ScoreFunction::Sigmoid;
  o.n_group = 2;
  o.topk_group = 1;
  core::routing_forward(Kokkos::Serial(), x, g, V(), sb, logits, probs, idx, w, o);
  EXPECT_EQ(idx(0, 0), 0);
  EXPECT_EQ(idx(0, 1), 1);
  EXPECT_EQ(w(0, 0), 0.5);
  EXPECT_EQ(w(0, 1), 0.5);
  // Group 1 ahead by a hair: it alone is eligible.
  sb(3) = 0.1 + 1e-12;
  core::routing_forward(Kokkos::Serial(), x, g, V(), sb, logits, probs, idx, w, o);
  EXPECT_EQ(idx(0, 0), 3);
  EXPECT_EQ(idx(0, 1), 2);
}

TEST(RoutingVariants, BadOptionsAreInputErrorsNamingTheValue) {
  M x("x", 2, 3), g("g", 6, 3), logits("l", 2, 6), probs("p", 2, 6), w("w", 2, 2);
  I idx("i", 2, 2);
  auto expect = [&](const core::RoutingOptions& o, const std::string& part, V rb = V(), V sb = V()) {
    try {
      core::routing_forward(Kokkos::Serial(), x, g, rb, sb, logits, probs, idx, w, o);
      ADD_FAILURE() << "no error for " << part;
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  core::RoutingOptions o;
  o.n_group = 4;
  expect(o, "n_group = 4");
  o.n_group = 3;
  o.topk_group = 4;
  expect(o, "topk_group = 4");
  o.topk_group = 1;
  o.group_score_topk = 3;
  expect(o, "group_score_topk = 3");
  o = {};
  o.score = core::ScoreFunction::Sigmoid;
  o.softmax_over_topk = true;
  expect(o, "softmax_over_topk");
  o = {};
  o.n_group = 6;
  o.topk_group = 1;
  o.group_score_topk = 1;
  expect(o, "top_k = 2 exceeds");
  expect({}, "router_bias has extent(0) = 5", V("rb", 5));
  expect({}, "selection_bias has extent(0) = 2", V(), V("sb", 2));
}

// ---- the oracle --------------------------------------------------------------------------------------------------

const std::vector<std::string>& sets() {
  static const std::vector<std::string> s = {"mixtral-tiny",   "granitemoe-tiny",  "granitemoeshared-tiny",
                                             "qwen2_moe-tiny", "qwen3_moe-tiny",   "olmoe-tiny",
                                             "deepseek_v3-tiny", "gpt_oss-tiny",   "granitemoehybrid-tiny"};
  return s;
}

double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

template <class View>
std::vector<double> values(const View& v) {
  std::vector<double> out(v.span());
  for (std::size_t i = 0; i < v.span(); ++i) out[i] = double(v.data()[i]);
  return out;
}

std::vector<double> ref_values(const io::SafetensorsFile& ref, const std::string& name) {
  return values(io::to_host_view<double>(ref.tensor(name)));
}

/// dL/d(topk_weight) of L = sum(y * dy): <dy_t, out_{e}(x_t)> for each chosen expert, out from the loaded weights
/// (the family's expert MLP, evaluated directly in float64).
M d_topk_weight(const io::ModelSpec& spec, const io::ModelConfig& config, const io::MoeLayerWeights<double>& w,
                const std::vector<double>& x, const std::vector<double>& dy, const std::vector<std::int64_t>& idx,
                std::int64_t k) {
  const std::int64_t H = w.router.extent(1), F = w.w1.extent(1), T = static_cast<std::int64_t>(x.size()) / H;
  const bool clamped = spec.expert == io::ExpertVariant::ClampedSwiGLU;
  const double limit = config.swiglu_limit;
  M out("dw", T, k);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t s = 0; s < k; ++s) {
      const std::int64_t e = idx[t * k + s];
      double dot = 0;
      for (std::int64_t f = 0; f < F; ++f) {
        double a = clamped ? w.w1_bias(e, f) : 0.0, b = clamped ? w.w3_bias(e, f) : 0.0;
        for (std::int64_t h = 0; h < H; ++h) {
          a += w.w1(e, f, h) * x[t * H + h];
          b += w.w3(e, f, h) * x[t * H + h];
        }
        double act;
        if (clamped) {
          a = std::min(a, limit);
          b = std::max(-limit, std::min(b, limit));
          act = (b + 1.0) * a / (1.0 + std::exp(-1.702 * a));
        } else {
          act = a / (1.0 + std::exp(-a)) * b;
        }
        for (std::int64_t h = 0; h < H; ++h) dot += dy[t * H + h] * w.w2(e, h, f) * act;
      }
      if (clamped)
        for (std::int64_t h = 0; h < H; ++h) dot += dy[t * H + h] * w.w2_bias(e, h);
      out(t, s) = dot;
    }
  return out;
}

/// Largest errors seen against the *_f64 twins, per precision (printed for the record).
double worst[2] = {0, 0};

template <class T>
void check_set_layer(const std::string& set, int layer) {
  constexpr bool f64 = std::is_same<T, double>::value;
  SCOPED_TRACE(set + " layer " + std::to_string(layer) + (f64 ? " float64" : " float32"));
  using MT = Kokkos::View<T**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  using VT = Kokkos::View<T*, Kokkos::LayoutRight, Kokkos::HostSpace>;
  const auto ck = io::HfCheckpoint::open(test::testdata_dir() / set / "hf_save_pretrained");
  const auto ref = io::SafetensorsFile::open(test::testdata_dir() / set / (set + "-ref.safetensors"));
  const auto& config = ck.config();
  const auto& spec = io::spec_for(config.architecture);
  const auto w = io::load_moe_layer<double>(ck, layer);
  const std::string p = "layers." + std::to_string(layer) + ".";
  const auto x = ref_values(ref, p + "x");
  const std::int64_t E = config.num_experts, H = config.hidden_size, k = config.top_k;
  const std::int64_t N = static_cast<std::int64_t>(x.size()) / H;
  MT xt("x", N, H), g("g", E, H), logits("l", N, E), probs("p", N, E), tw("w", N, k);
  VT rb("rb", w.router_bias.extent(0)), sb("sb", w.score_bias.extent(0));
  I idx("i", N, k);
  for (std::size_t i = 0; i < x.size(); ++i) xt.data()[i] = T(x[i]);
  for (std::size_t i = 0; i < g.span(); ++i) g.data()[i] = T(w.router.data()[i]);
  for (std::size_t i = 0; i < rb.span(); ++i) rb(i) = T(w.router_bias(i));
  for (std::size_t i = 0; i < sb.span(); ++i) sb(i) = T(w.score_bias(i));
  core::routing_forward(Kokkos::Serial(), xt, g, rb, sb, logits, probs, idx, tw, config.routing);

  const auto idx_ref = io::to_host_view<std::int64_t>(ref.tensor(p + "topk_idx"));
  ASSERT_EQ(idx.span(), idx_ref.extent(0));
  for (std::size_t i = 0; i < idx.span(); ++i) EXPECT_EQ(idx.data()[i], idx_ref(i)) << "topk_idx entry " << i;
  const double tol = f64 ? 1e-10 : 1e-5;
  // router_logits and router_probs are float64 evaluations of the loaded weights; topk_weight_f64 is the twin.
  const double e_logits = rel_err(values(logits), ref_values(ref, p + "router_logits"));
  const double e_probs = rel_err(values(probs), ref_values(ref, p + "router_probs"));
  const double e_w = rel_err(values(tw), ref_values(ref, p + "topk_weight_f64"));
  EXPECT_LT(e_logits, tol);
  EXPECT_LT(e_probs, tol);
  EXPECT_LT(e_w, tol);
  EXPECT_LT(rel_err(values(tw), ref_values(ref, p + "topk_weight")), f64 ? 1e-6 : 1e-5);  // transformers' own
  worst[f64 ? 0 : 1] = std::max({worst[f64 ? 0 : 1], e_logits, e_probs, e_w});

  // The router gradient: dL/dw from the oracle's dy through the family's experts, then routing_backward.
  const auto dy = ref_values(ref, p + "dy");
  const std::vector<std::int64_t> idx_v(idx.data(), idx.data() + idx.span());
  const M dw64 = d_topk_weight(spec, config, w, x, dy, idx_v, k);
  MT dw("dw", N, k), dl("dl", N, E), dx("dx", N, H), dg("dg", E, H);
  VT drb("drb", rb.extent(0));
  for (std::size_t i = 0; i < dw.span(); ++i) dw.data()[i] = T(dw64.data()[i]);
  core::routing_backward(Kokkos::Serial(), xt, g, probs, idx, tw, dw, dl, dx, dg, drb, config.routing, false);
  const auto gate_ref = ref_values(ref, p + "grad.gate_f64");
  double gate_norm = 0;
  for (double v : gate_ref) gate_norm += v * v;
  const double e_gate = rel_err(values(dg), gate_ref);
  EXPECT_GT(gate_norm, 1e-12);  // no family of the oracle routes top-1 with renormalisation
  EXPECT_LT(e_gate, f64 ? 1e-10 : 1e-5);
  EXPECT_LT(rel_err(values(dg), ref_values(ref, p + "grad.gate")), f64 ? 1e-6 : 1e-5);
  worst[f64 ? 0 : 1] = std::max(worst[f64 ? 0 : 1], e_gate);
  if (ref.has(p + "grad.router_bias_f64")) {
    ASSERT_EQ(drb.extent(0), static_cast<std::size_t>(E));
    const double e_rb = rel_err(values(drb), ref_values(ref, p + "grad.router_bias_f64"));
    EXPECT_LT(e_rb, f64 ? 1e-10 : 1e-5);
    worst[f64 ? 0 : 1] = std::max(worst[f64 ? 0 : 1], e_rb);
  } else {
    EXPECT_EQ(drb.extent(0), 0u) << "a router bias the oracle has no gradient for";
  }
}

TEST(RoutingOracle, EveryFamilyEveryLayerFloat64AndFloat32) {
  int layers = 0;
  for (const auto& set : sets()) {
    const auto config = io::read_model_config(test::testdata_dir() / set / "hf_save_pretrained" / "config.json");
    for (int layer : config.moe_layers) {
      check_set_layer<double>(set, layer);
      check_set_layer<float>(set, layer);
      ++layers;
    }
  }
  EXPECT_EQ(layers, 18);
  std::printf("routing vs the *_f64 twins, worst relative error: float64 %.3g, float32 %.3g\n", worst[0], worst[1]);
}

}  // namespace
