// Router losses through MoeLayer: backward(dy, d_logits) with d_logits from core::router_loss_backward is the gradient
// of L = sum(y * dy) + coef_lb * load_balancing + coef_z * z-loss (finite differences of every parameter and of x,
// both expert paths, k = 1 and k = E, over one layer and over two layers' concatenated statistics); the stages
// (route_backward with d_logits_add) agree with backward(); an empty d_logits changes nothing; shape errors.
#include "kernel_test_util.hpp"

#include <kmoe/core/router_losses.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <functional>
#include <random>
#include <vector>

namespace {

using namespace kmoe;
using kmoe::test::fill_normal;
using kmoe::test::max_abs_diff;
using Space = Kokkos::Serial;
using Layer = moe::MoeLayer<double, Space>;
using Weights = moe::MoeWeights<double, Space>;
using Matrix = Layer::matrix;

Weights random_weights(std::int64_t E, std::int64_t H, std::int64_t F, std::uint64_t seed) {
  Weights w;
  w.router = Matrix("router", E, H);
  w.w1 = Weights::views::tensor3("w1", E, F, H);
  w.w3 = Weights::views::tensor3("w3", E, F, H);
  w.w2 = Weights::views::tensor3("w2", E, H, F);
  w.shared_w1 = Matrix("sw1", 0, H);
  w.shared_w3 = Matrix("sw3", 0, H);
  w.shared_w2 = Matrix("sw2", H, 0);
  fill_normal(w.router, seed + 1, 1.0);
  fill_normal(w.w1, seed + 2, 0.5);
  fill_normal(w.w3, seed + 3, 0.5);
  fill_normal(w.w2, seed + 4, 0.5);
  return w;
}

/// Two layers trained together: L = sum_l sum(y_l * dy_l) + router losses of the concatenated (or, with one layer,
/// the single) statistics.
struct Stack {
  std::vector<Layer> layers;
  std::vector<Matrix> x, dy;
  core::RouterLossCoefficients coef;
  std::int64_t top_k;

  double loss() {
    double L = 0;
    core::RouterLossStats s;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      auto y = layers[l].forward(x[l]);
      for (std::size_t i = 0; i < y.span(); ++i) L += y.data()[i] * dy[l].data()[i];
      core::router_loss_statistics(Space(), layers[l].router_logits(), top_k, s);
    }
    return L + core::router_loss(s, coef);
  }

  std::vector<moe::MoeBackward<double, Space>> gradients() {
    core::RouterLossStats s;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      layers[l].forward(x[l]);
      core::router_loss_statistics(Space(), layers[l].router_logits(), top_k, s);
    }
    std::vector<moe::MoeBackward<double, Space>> g;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const auto logits = layers[l].router_logits();
      Matrix d("d_logits", logits.extent(0), logits.extent(1));
      core::router_loss_backward(Space(), logits, s, coef, d);
      g.push_back(layers[l].backward(dy[l], d));
    }
    return g;
  }
};

void check(std::int64_t T, std::int64_t E, std::int64_t k, int num_layers, moe::ExpertImpl impl,
           core::RouterLossCoefficients coef) {
  SCOPED_TRACE(::testing::Message() << "T=" << T << " E=" << E << " k=" << k << " layers=" << num_layers
                                    << (impl == moe::ExpertImpl::Scatter ? " scatter" : " padded") << " coef "
                                    << coef.load_balancing << "/" << coef.z_loss);
  const std::int64_t H = 5, F = 4;
  moe::MoeOptions opt;
  opt.top_k = k;
  opt.impl = impl;
  opt.block = 4;
  Stack st;
  st.coef = coef;
  st.top_k = k;
  for (int l = 0; l < num_layers; ++l) {
    st.layers.emplace_back(random_weights(E, H, F, 10 * l + 1), opt);
    st.x.emplace_back("x", T, H);
    st.dy.emplace_back("dy", T, H);
    fill_normal(st.x.back(), 21 + l);
    fill_normal(st.dy.back(), 31 + l);
  }
  const auto g = st.gradients();
  std::vector<std::vector<std::int64_t>> selected;
  for (auto& l : st.layers) {
    const auto& idx = l.routing().topk_idx;
    selected.emplace_back(idx.data(), idx.data() + idx.span());
  }
  const double eps = 1e-5;
  auto directional = [&](double* p, const double* grad, std::size_t n, std::uint64_t seed, const std::string& what) {
    std::vector<double> v(n), keep(p, p + n);
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> d;
    double analytic = 0;
    for (std::size_t i = 0; i < n; ++i) {
      v[i] = d(rng);
      analytic += v[i] * grad[i];
    }
    for (std::size_t i = 0; i < n; ++i) p[i] = keep[i] + eps * v[i];
    const double lp = st.loss();
    for (std::size_t i = 0; i < n; ++i) p[i] = keep[i] - eps * v[i];
    const double lm = st.loss();
    std::copy(keep.begin(), keep.end(), p);
    const double fd = (lp - lm) / (2 * eps);
    EXPECT_NEAR(analytic, fd, 1e-6 * std::max(1.0, std::abs(fd))) << what;
  };
  for (int l = 0; l < num_layers; ++l) {
    const auto& w = st.layers[l].weights();
    const std::string n = "layer " + std::to_string(l) + " ";
    directional(w.router.data(), g[l].grads.router.data(), w.router.span(), 100 + l, n + "router");
    directional(w.w1.data(), g[l].grads.w1.data(), w.w1.span(), 110 + l, n + "w1");
    directional(w.w2.data(), g[l].grads.w2.data(), w.w2.span(), 120 + l, n + "w2");
    directional(st.x[l].data(), g[l].dx.data(), st.x[l].span(), 130 + l, n + "x");
  }
  for (int l = 0; l < num_layers; ++l) {
    st.layers[l].forward(st.x[l]);
    const auto& idx = st.layers[l].routing().topk_idx;
    EXPECT_EQ(std::vector<std::int64_t>(idx.data(), idx.data() + idx.span()), selected[l])
        << "the selection moved during the check";
  }
}

TEST(RouterLossLayer, GradientsIntoTheRouterAndXMatchFiniteDifferences) {
  for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) {
    check(7, 5, 2, 1, impl, {0.5, 0.0});
    check(7, 5, 2, 1, impl, {0.0, 0.2});
    check(6, 4, 1, 1, impl, {0.5, 0.1});  // k = 1: the block's router gradient is 0, the losses' is not
    check(5, 3, 3, 1, impl, {0.5, 0.1});  // k = E: load balancing is constant (E), only its softmax term moves
    check(6, 5, 2, 2, impl, {0.4, 0.1});  // two layers, concatenated statistics
  }
}

TEST(RouterLossLayer, StagesAndEmptyDLogitsAgreeWithBackward) {
  const std::int64_t T = 9, E = 6, H = 5, F = 4, k = 2;
  moe::MoeOptions opt;
  opt.top_k = k;
  Layer layer(random_weights(E, H, F, 3), opt);
  Matrix x("x", T, H), dy("dy", T, H), d_logits("d_logits", T, E);
  fill_normal(x, 1);
  fill_normal(dy, 2);
  fill_normal(d_logits, 3);
  layer.forward(x);
  const auto plain = layer.backward(dy);
  layer.forward(x);
  const auto empty = layer.backward(dy, Matrix());
  EXPECT_EQ(max_abs_diff(empty.dx, plain.dx), 0.0);
  EXPECT_EQ(max_abs_diff(empty.grads.router, plain.grads.router), 0.0);
  layer.forward(x);
  const auto with = layer.backward(dy, d_logits);
  // The extra term is linear: router gradient + d_logitsᵀ·x, dx + d_logits·G.
  Matrix dr("dr", E, H), dx("dx", T, H);
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t h = 0; h < H; ++h) {
      double s = plain.grads.router(e, h);
      for (std::int64_t t = 0; t < T; ++t) s += d_logits(t, e) * x(t, h);
      dr(e, h) = s;
    }
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      double s = plain.dx(t, h);
      for (std::int64_t e = 0; e < E; ++e) s += d_logits(t, e) * layer.weights().router(e, h);
      dx(t, h) = s;
    }
  EXPECT_LT(max_abs_diff(with.grads.router, dr), 1e-12);
  EXPECT_LT(max_abs_diff(with.dx, dx), 1e-12);
  EXPECT_EQ(max_abs_diff(with.grads.w1, plain.grads.w1), 0.0);
  // The write-into overload takes it too.
  layer.forward(x);
  moe::MoeBackward<double, Space> into;
  into.grads = moe::zeros_like(layer.weights());
  into.dx = Matrix("dx", T, H);
  layer.backward(dy, into, d_logits);
  EXPECT_EQ(max_abs_diff(into.grads.router, with.grads.router), 0.0);
  EXPECT_EQ(max_abs_diff(into.dx, with.dx), 0.0);
  // The stages: route_backward with d_logits_add.
  const auto r = layer.route(x);
  Matrix dw("dw", T, k), dx0("dx0", T, H), dg("dg", E, H);
  fill_normal(dw, 4);
  layer.route_backward(x, r, dw, dx0, dg);
  Matrix dx1("dx1", T, H), dg1("dg1", E, H);
  layer.route_backward(x, r, dw, dx1, dg1, {}, d_logits);
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t h = 0; h < H; ++h) {
      double s = dg(e, h);
      for (std::int64_t t = 0; t < T; ++t) s += d_logits(t, e) * x(t, h);
      EXPECT_NEAR(dg1(e, h), s, 1e-12);
    }
  // Shapes.
  layer.forward(x);
  EXPECT_THROW(layer.backward(dy, Matrix("bad", T, E + 1)), InputError);
  EXPECT_THROW(layer.route_backward(x, r, dw, dx1, dg1, {}, Matrix("bad", T + 1, E)), InputError);
}

}  // namespace
