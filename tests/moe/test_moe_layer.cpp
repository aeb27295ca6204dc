// MoeLayer on random data: finite-difference gradient checks of every parameter and of x (E not a power of two,
// k = 1, k = E, experts without tokens, T = 1, a shared expert), both expert paths agreeing, Serial and OpenMP
// agreeing, float against double, the stages composing like forward(), and shape errors; the write-into overloads
// of forward/backward; how MoeOptions map onto the bf16 CUDA layer (testable without a GPU).
#include "kernel_test_util.hpp"

#include <kmoe/moe/detail/cuda_options.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <functional>
#include <vector>

namespace {

using namespace kmoe;
using kmoe::test::fill_normal;
using kmoe::test::max_abs_diff;
using kmoe::test::rel_l2;

struct Shape {
  std::int64_t tokens, hidden, ffn, experts, top_k, shared;
};

template <class T, class Space>
moe::MoeWeights<T, Space> random_weights(const Shape& s, std::uint64_t seed) {
  moe::MoeWeights<T, Space> w;
  using V = moe::MoeViews<T, Space>;
  w.router = typename V::matrix("router", s.experts, s.hidden);
  w.w1 = typename V::tensor3("w1", s.experts, s.ffn, s.hidden);
  w.w3 = typename V::tensor3("w3", s.experts, s.ffn, s.hidden);
  w.w2 = typename V::tensor3("w2", s.experts, s.hidden, s.ffn);
  w.shared_w1 = typename V::matrix("sw1", s.shared, s.hidden);
  w.shared_w3 = typename V::matrix("sw3", s.shared, s.hidden);
  w.shared_w2 = typename V::matrix("sw2", s.hidden, s.shared);
  fill_normal(w.router, seed + 1, 1.0);
  fill_normal(w.w1, seed + 2, 0.5);
  fill_normal(w.w3, seed + 3, 0.5);
  fill_normal(w.w2, seed + 4, 0.5);
  fill_normal(w.shared_w1, seed + 5, 0.5);
  fill_normal(w.shared_w3, seed + 6, 0.5);
  fill_normal(w.shared_w2, seed + 7, 0.5);
  return w;
}

template <class W>
std::vector<std::pair<const char*, std::function<double*(const W&)>>> tensors() {
  return {{"router", [](const W& w) { return w.router.data(); }},
          {"w1", [](const W& w) { return w.w1.data(); }},
          {"w3", [](const W& w) { return w.w3.data(); }},
          {"w2", [](const W& w) { return w.w2.data(); }},
          {"shared_w1", [](const W& w) { return w.shared_w1.data(); }},
          {"shared_w3", [](const W& w) { return w.shared_w3.data(); }},
          {"shared_w2", [](const W& w) { return w.shared_w2.data(); }},
          {"router_bias", [](const W& w) { return w.router_bias.data(); }},
          {"w1_bias", [](const W& w) { return w.w1_bias.data(); }},
          {"w3_bias", [](const W& w) { return w.w3_bias.data(); }},
          {"w2_bias", [](const W& w) { return w.w2_bias.data(); }},
          {"shared_gate", [](const W& w) { return w.shared_gate.data(); }}};
}

template <class W>
std::vector<std::size_t> sizes(const W& w) {
  return {w.router.span(),      w.w1.span(),      w.w3.span(),      w.w2.span(),      w.shared_w1.span(),
          w.shared_w3.span(),   w.shared_w2.span(), w.router_bias.span(), w.w1_bias.span(), w.w3_bias.span(),
          w.w2_bias.span(),     w.shared_gate.span()};
}

/// The families' variants on random weights (what check_gradients applies after random_weights).
using Variant = std::function<void(moe::MoeWeights<double, Kokkos::Serial>&)>;
using SV = moe::MoeViews<double, Kokkos::Serial>;

/// GPT-OSS: router bias, top-k of the logits with a softmax over the k, expert biases, the clamped SwiGLU with a
/// limit low enough that both clamps bite on a good share of the pre-activations.
void gpt_oss_variant(moe::MoeWeights<double, Kokkos::Serial>& w) {
  const std::int64_t e = w.num_experts(), f = w.ffn(), h = w.hidden();
  w.router_bias = SV::vector("router_bias", e);
  w.w1_bias = SV::matrix("w1_bias", e, f);
  w.w3_bias = SV::matrix("w3_bias", e, f);
  w.w2_bias = SV::matrix("w2_bias", e, h);
  fill_normal(w.router_bias, 31, 0.3);
  fill_normal(w.w1_bias, 32, 0.5);
  fill_normal(w.w3_bias, 33, 0.5);
  fill_normal(w.w2_bias, 34, 0.5);
  w.routing.softmax_over_topk = true;
  w.routing.renormalize = false;
  w.expert.activation = core::Activation::ClampedSwiGLU;
  w.expert.limit = 0.6;
}

/// DeepSeek-V3: sigmoid scores, a selection bias, group-limited top-k, renormalisation with an epsilon, scaling.
void deepseek_variant(moe::MoeWeights<double, Kokkos::Serial>& w) {
  w.score_bias = SV::vector("score_bias", w.num_experts());
  fill_normal(w.score_bias, 41, 0.3);
  w.routing.score = core::ScoreFunction::Sigmoid;
  w.routing.n_group = 3;
  w.routing.topk_group = 2;
  w.routing.group_score_topk = 2;
  w.routing.renorm_epsilon = 1e-20;
  w.routing.scaling_factor = 2.5;
}

/// Qwen2-MoE: no renormalisation, the shared expert scaled by sigmoid(x·g).
void qwen2_variant(moe::MoeWeights<double, Kokkos::Serial>& w) {
  w.shared_gate = SV::matrix("shared_gate", 1, w.hidden());
  fill_normal(w.shared_gate, 51, 0.5);
  w.routing.renormalize = false;
}

using Layer = moe::MoeLayer<double, Kokkos::Serial>;

double loss(Layer& layer, const Layer::matrix& x, const Layer::matrix& dy) {
  auto y = layer.forward(x);
  double L = 0;
  for (std::size_t i = 0; i < y.span(); ++i) L += y.data()[i] * dy.data()[i];
  return L;
}

void check_gradients(const Shape& s, moe::ExpertImpl impl, const Variant& variant = {}) {
  SCOPED_TRACE(::testing::Message() << "T=" << s.tokens << " E=" << s.experts << " k=" << s.top_k
                                    << " S=" << s.shared << (impl == moe::ExpertImpl::Scatter ? " scatter" : " padded"));
  auto w = random_weights<double, Kokkos::Serial>(s, 11);
  if (variant) variant(w);
  moe::MoeOptions opt;
  opt.top_k = s.top_k;
  opt.impl = impl;
  opt.block = 4;
  opt.tile_rows = 3;  // several tiles per expert in the scatter path
  Layer layer(w, opt);
  Layer::matrix x("x", s.tokens, s.hidden), dy("dy", s.tokens, s.hidden);
  fill_normal(x, 21);
  fill_normal(dy, 22);
  layer.forward(x);
  const auto selected = layer.routing().topk_idx;
  auto g = layer.backward(dy);
  const double eps = 1e-5;
  auto directional = [&](double* p, const double* grad, std::size_t n, std::uint64_t seed, const char* what) {
    if (n == 0) return;
    std::vector<double> v(n), keep(p, p + n);
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> d;
    double analytic = 0;
    for (std::size_t i = 0; i < n; ++i) {
      v[i] = d(rng);
      analytic += v[i] * grad[i];
    }
    for (std::size_t i = 0; i < n; ++i) p[i] = keep[i] + eps * v[i];
    const double lp = loss(layer, x, dy);
    for (std::size_t i = 0; i < n; ++i) p[i] = keep[i] - eps * v[i];
    const double lm = loss(layer, x, dy);
    std::copy(keep.begin(), keep.end(), p);
    const double fd = (lp - lm) / (2 * eps);
    EXPECT_NEAR(analytic, fd, 1e-6 * std::max(1.0, std::abs(fd))) << what;
  };
  const auto ts = tensors<moe::MoeWeights<double, Kokkos::Serial>>();
  const auto ns = sizes(w);
  for (std::size_t i = 0; i < ts.size(); ++i) directional(ts[i].second(w), ts[i].second(g.grads), ns[i], 100 + i, ts[i].first);
  directional(x.data(), g.dx.data(), x.span(), 99, "x");
  layer.forward(x);
  EXPECT_EQ(max_abs_diff(layer.routing().topk_idx, selected), 0.0) << "the selection moved during the check";
}

TEST(MoeLayer, GradientsMatchFiniteDifferences) {
  const std::vector<Shape> shapes = {
      {6, 5, 4, 5, 2, 0},   // E not a power of two
      {6, 5, 4, 5, 1, 0},   // k = 1: routing weights are all 1, router gradient exactly 0
      {5, 4, 3, 3, 3, 0},   // k = E
      {2, 5, 4, 7, 2, 0},   // at least 3 experts without a token
      {1, 4, 3, 6, 2, 3},   // T = 1, with a shared expert
      {9, 6, 5, 6, 2, 4},   // shared expert
  };
  for (const auto& s : shapes)
    for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) check_gradients(s, impl);
}

TEST(MoeLayer, VariantGradientsMatchFiniteDifferences) {
  // Every gradient of each family's variant, the optional tensors' included (router bias, expert biases, shared
  // gate), both paths; E = 6 so that DeepSeek's 3 groups hold 2 experts each.
  const std::vector<std::pair<const char*, Variant>> variants = {
      {"gpt_oss", gpt_oss_variant}, {"deepseek_v3", deepseek_variant}, {"qwen2_moe", qwen2_variant}};
  const std::vector<Shape> shapes = {{9, 6, 5, 6, 2, 4}, {7, 5, 4, 6, 3, 3}, {1, 4, 3, 6, 2, 3}};
  for (const auto& [name, variant] : variants)
    for (const auto& s : shapes)
      for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) {
        SCOPED_TRACE(name);
        check_gradients(s, impl, variant);
      }
}

TEST(MoeLayer, ClampedSwigluGradientIsZeroWhereTheClampBitesAndMatchesFiniteDifferencesElsewhere) {
  // Elementwise, over a grid of pre-activations through both kinks (h1 = limit, h3 = ±limit) and beyond.
  using S = Kokkos::Serial;
  using M = Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  core::ExpertOptions o;
  o.activation = core::Activation::ClampedSwiGLU;  // alpha 1.702, limit 7, up + 1
  std::vector<double> grid;
  for (double v = -9.5; v <= 9.5; v += 0.25) grid.push_back(v);
  for (double d : {-1e-3, 1e-3}) {  // just inside and just outside each kink
    grid.push_back(7 + d);
    grid.push_back(-7 + d);
  }
  const std::int64_t n = grid.size();
  M h1("h1", n, n), h3("h3", n, n), act("act", n, n), dact("dact", n, n), dh1("dh1", n, n), dh3("dh3", n, n);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      h1(i, j) = grid[i];
      h3(i, j) = grid[j];
      dact(i, j) = 1;
    }
  core::swiglu_backward(S(), h1, h3, dact, dh1, dh3, o);
  auto f = [&](double a, double b) {
    M p1("p1", 1, 1), p3("p3", 1, 1), out("out", 1, 1);
    p1(0, 0) = a;
    p3(0, 0) = b;
    core::swiglu_forward(S(), p1, p3, out, o);
    return out(0, 0);
  };
  const double eps = 1e-6;
  int zero1 = 0, zero3 = 0;
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      const double a = grid[i], b = grid[j];
      // On a kink itself torch.clamp passes the gradient: the one-sided difference from inside the range.
      const double fd1 = a == 7 ? (f(a, b) - f(a - eps, b)) / eps : (f(a + eps, b) - f(a - eps, b)) / (2 * eps);
      const double fd3 = b == 7    ? (f(a, b) - f(a, b - eps)) / eps
                         : b == -7 ? (f(a, b + eps) - f(a, b)) / eps
                                   : (f(a, b + eps) - f(a, b - eps)) / (2 * eps);
      const double tol = a == 7 || std::abs(b) == 7 ? 1e-5 : 1e-6;
      EXPECT_NEAR(dh1(i, j), fd1, tol * std::max(1.0, std::abs(fd1))) << "h1 " << a << " h3 " << b;
      EXPECT_NEAR(dh3(i, j), fd3, tol * std::max(1.0, std::abs(fd3))) << "h1 " << a << " h3 " << b;
      if (a > 7) {
        EXPECT_EQ(dh1(i, j), 0.0);
        ++zero1;
      }
      if (std::abs(b) > 7) {
        EXPECT_EQ(dh3(i, j), 0.0);
        ++zero3;
      }
    }
  EXPECT_GT(zero1, 0);
  EXPECT_GT(zero3, 0);
  // The forward at the GPT-OSS formula, one point by hand: h1 = 2, h3 = -8 -> (-7 + 1) * 2 * sigmoid(3.404).
  EXPECT_NEAR(f(2, -8), -6 * 2 / (1 + std::exp(-3.404)), 1e-14);
  EXPECT_NEAR(f(8, 0.5), 1.5 * 7 / (1 + std::exp(-1.702 * 7)), 1e-14);
}

TEST(MoeLayer, TopOneRoutingHasZeroRouterGradient) {
  const Shape s{6, 5, 4, 5, 1, 0};
  Layer layer(random_weights<double, Kokkos::Serial>(s, 3), moe::MoeOptions{1});
  Layer::matrix x("x", s.tokens, s.hidden), dy("dy", s.tokens, s.hidden);
  fill_normal(x, 1);
  fill_normal(dy, 2);
  layer.forward(x);
  auto g = layer.backward(dy);
  for (std::size_t i = 0; i < g.grads.router.span(); ++i) EXPECT_EQ(g.grads.router.data()[i], 0.0);
}

template <class T, class Space>
moe::MoeBackward<T, Space> run(const Shape& s, moe::ExpertImpl impl, typename moe::MoeViews<T, Space>::matrix* y_out,
                               core::GemmAlgo algo = core::GemmAlgo::Auto) {
  moe::MoeOptions opt;
  opt.top_k = s.top_k;
  opt.impl = impl;
  opt.gemm = algo;
  moe::MoeLayer<T, Space> layer(random_weights<T, Space>(s, 5), opt);
  typename moe::MoeViews<T, Space>::matrix x("x", s.tokens, s.hidden), dy("dy", s.tokens, s.hidden);
  fill_normal(x, 6);
  fill_normal(dy, 7);
  *y_out = layer.forward(x);
  return layer.backward(dy);
}

template <class A, class B>
void expect_same(const A& a, const B& b, double tol) {
  EXPECT_LE(rel_l2(a.dx, b.dx), tol) << "dx";
  EXPECT_LE(rel_l2(a.grads.router, b.grads.router), tol) << "router";
  EXPECT_LE(rel_l2(a.grads.w1, b.grads.w1), tol) << "w1";
  EXPECT_LE(rel_l2(a.grads.w3, b.grads.w3), tol) << "w3";
  EXPECT_LE(rel_l2(a.grads.w2, b.grads.w2), tol) << "w2";
  EXPECT_LE(rel_l2(a.grads.shared_w1, b.grads.shared_w1), tol) << "shared_w1";
  EXPECT_LE(rel_l2(a.grads.shared_w2, b.grads.shared_w2), tol) << "shared_w2";
}

TEST(MoeLayer, PathsSpacesAlgorithmsAndPrecisionsAgree) {
  const Shape s{40, 16, 12, 6, 2, 8};
  using S = Kokkos::Serial;
  moe::MoeViews<double, S>::matrix y0, y1, y2;
  auto ref = run<double, S>(s, moe::ExpertImpl::Scatter, &y0);
  auto padded = run<double, S>(s, moe::ExpertImpl::Padded, &y1);
  EXPECT_LE(rel_l2(y1, y0), 1e-13);
  expect_same(padded, ref, 1e-13);
  auto portable = run<double, S>(s, moe::ExpertImpl::Scatter, &y2, core::GemmAlgo::Kokkos);
  EXPECT_LE(rel_l2(y2, y0), 1e-13);
  expect_same(portable, ref, 1e-13);
#ifdef KOKKOS_ENABLE_OPENMP
  for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) {
    moe::MoeViews<double, Kokkos::OpenMP>::matrix yo;
    auto omp = run<double, Kokkos::OpenMP>(s, impl, &yo);
    EXPECT_LE(rel_l2(yo, y0), 1e-13);
    expect_same(omp, ref, 1e-13);
  }
#endif
  moe::MoeViews<float, S>::matrix yf;
  auto f32 = run<float, S>(s, moe::ExpertImpl::Scatter, &yf);
  EXPECT_LE(rel_l2(yf, y0), 1e-5);
  expect_same(f32, ref, 1e-5);
}

TEST(MoeLayer, StagesComposeLikeForward) {
  const Shape s{12, 8, 6, 5, 2, 0};
  Layer layer(random_weights<double, Kokkos::Serial>(s, 9), moe::MoeOptions{2});
  Layer::matrix x("x", s.tokens, s.hidden);
  fill_normal(x, 10);
  auto y_ref = layer.forward(x);
  auto r = layer.route(x);
  auto rows = layer.dispatch(x, r);
  auto ctx = layer.expert_forward(rows, r.plan.offsets_host);
  Layer::matrix y("y", s.tokens, s.hidden);
  layer.combine(ctx.y, r, y);
  EXPECT_LE(rel_l2(y, y_ref), 1e-14);
  EXPECT_EQ(layer.expert_counts().size(), std::size_t(s.experts));
  std::int64_t total = 0;
  for (auto c : layer.expert_counts()) total += c;
  EXPECT_EQ(total, s.tokens * s.top_k);
  EXPECT_EQ(layer.router_logits().extent(1), std::size_t(s.experts));
}

TEST(MoeLayer, BadShapesAreInputErrors) {
  const Shape s{4, 8, 6, 5, 2, 0};
  auto w = random_weights<double, Kokkos::Serial>(s, 1);
  Layer layer(w, moe::MoeOptions{2});
  Layer::matrix x("x", 4, 7), dy("dy", 3, 8), good("x", 4, 8);
  EXPECT_THROW(layer.forward(x), InputError);
  EXPECT_THROW(layer.backward(good), InputError);  // no forward yet
  layer.forward(good);
  EXPECT_THROW(layer.backward(dy), InputError);
  EXPECT_THROW(Layer(w, moe::MoeOptions{6}), InputError);
  auto bad = w;
  bad.w2 = moe::MoeViews<double, Kokkos::Serial>::tensor3("w2", 5, 8, 5);
  EXPECT_THROW(Layer(bad, moe::MoeOptions{2}), InputError);
  EXPECT_THROW(moe::parse_expert_impl("dense"), UsageError);
}


// forward(x, y) / backward(dy, out) write every element of their outputs (poisoned first) and give forward(x) /
// backward(dy)'s values exactly.
TEST(MoeLayer, WriteIntoOverloadsMatchAndOverwrite) {
  const Shape s{11, 8, 6, 5, 2, 4};
  for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) {
    moe::MoeOptions opt;
    opt.top_k = 2;
    opt.impl = impl;
    Layer layer(random_weights<double, Kokkos::Serial>(s, 21), opt);
    Layer::matrix x("x", s.tokens, s.hidden), dy("dy", s.tokens, s.hidden);
    fill_normal(x, 22);
    fill_normal(dy, 23);
    const auto y_ref = layer.forward(x);
    const auto g_ref = layer.backward(dy);
    constexpr double poison = 1e300;
    Layer::matrix y("y", s.tokens, s.hidden);
    Kokkos::deep_copy(y, poison);
    moe::MoeBackward<double, Kokkos::Serial> out;
    out.dx = Layer::matrix("dx", s.tokens, s.hidden);
    out.grads = moe::uninitialized_like<double>(layer.weights());
    Kokkos::deep_copy(out.dx, poison);
    moe::for_each_weight_pair(out.grads, out.grads, [&](const auto& v, const auto&, const char*) {
      Kokkos::deep_copy(v, poison);
    });
    layer.forward(x, y);
    layer.backward(dy, out);
    EXPECT_EQ(max_abs_diff(y, y_ref), 0.0);
    EXPECT_EQ(max_abs_diff(out.dx, g_ref.dx), 0.0);
    moe::for_each_weight_pair(out.grads, g_ref.grads, [](const auto& a, const auto& b, const char* name) {
      EXPECT_EQ(max_abs_diff(a, b), 0.0) << name;
    });
    Layer::matrix short_y("y", s.tokens - 1, s.hidden);
    EXPECT_THROW(layer.forward(x, short_y), InputError);
    out.grads.w1 = moe::MoeViews<double, Kokkos::Serial>::tensor3("w1", s.experts, s.ffn + 1, s.hidden);
    EXPECT_THROW(layer.backward(dy, out), InputError);
  }
}

static_assert(std::is_same<moe::grad_value_t<double>, double>::value, "double layers keep double gradients");
static_assert(std::is_same<moe::grad_value_t<float>, float>::value, "float layers keep float gradients");
static_assert(std::is_same<moe::grad_value_t<bf16>, float>::value, "bf16 layers have fp32 gradients");
static_assert(std::is_same<moe::MoeBackward<bf16, Kokkos::Serial>::value_type, float>::value, "");
static_assert(std::is_same<moe::Routing<bf16, Kokkos::Serial>::value_matrix::value_type, float>::value, "");
static_assert(moe::MoeLayer<double, Kokkos::Serial>::backend == moe::LayerBackend::Portable, "");

// MoeOptions -> the hand-written CUDA block's settings (MoeLayer<bf16, Kokkos::Cuda>).
TEST(MoeLayer, CudaBlockOptionsMapping) {
  moe::MoeOptions o;
  auto c = moe::detail::cuda_block_options(o);
  EXPECT_FALSE(c.padded);
  EXPECT_EQ(c.engine, moe::detail::CudaEngine::Auto);
  o.impl = moe::ExpertImpl::Padded;
  o.gemm = core::GemmAlgo::Blas;
  c = moe::detail::cuda_block_options(o);
  EXPECT_TRUE(c.padded);
  EXPECT_EQ(c.engine, moe::detail::CudaEngine::Cublas);
  o.gemm = core::GemmAlgo::Kokkos;
  EXPECT_EQ(moe::detail::cuda_block_options(o).engine, moe::detail::CudaEngine::Kernel);
  o.gemm = core::GemmAlgo::Cutlass;
  EXPECT_EQ(moe::detail::cuda_block_options(o).engine, moe::detail::CudaEngine::Cutlass);
  // The former environment switches are options now.
  EXPECT_TRUE(moe::detail::cuda_block_options(o).fuse_swiglu);
  o.fuse_swiglu = false;
  o.cublas_streams = 4;
  o.cublas_grouped = true;
  c = moe::detail::cuda_block_options(o);
  EXPECT_FALSE(c.fuse_swiglu);
  EXPECT_EQ(c.cublas_streams, 4);
  EXPECT_TRUE(c.cublas_grouped);
  for (int n : {0, 9, -1}) {
    o.cublas_streams = n;
    EXPECT_THROW(moe::detail::cuda_block_options(o), UsageError) << n;
  }
  o.cublas_streams = 1;
  for (std::int64_t b : {1, 2, 32, 64, 128}) {
    o.block = b;
    EXPECT_NO_THROW(moe::detail::cuda_block_options(o)) << b;
  }
  for (std::int64_t b : {0, 3, 48, 96, 256}) {
    o.block = b;
    EXPECT_THROW(moe::detail::cuda_block_options(o), UsageError) << b;
  }
  o.block = 48;
  try {
    moe::detail::cuda_block_options(o);
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("block = 48 does not divide 128"), std::string::npos) << e.what();
  }
}

// The gradient tensors a bf16 layer hands out: fp32, shaped like the weights.
TEST(MoeLayer, UninitializedLikeShapesGradients) {
  const Shape s{3, 8, 6, 5, 2, 4};
  const auto w = random_weights<double, Kokkos::Serial>(s, 1);
  moe::MoeWeights<bf16, Kokkos::Serial> wb;
  moe::for_each_weight_pair(wb, w, [](auto& dst, const auto& src, const char*) {
    dst = std::decay_t<decltype(dst)>("wb", src.layout());
  });
  const auto g = moe::uninitialized_like<float>(wb);
  moe::for_each_weight_pair(g, w, [](const auto& a, const auto& b, const char* name) {
    for (unsigned r = 0; r < b.rank; ++r) EXPECT_EQ(a.extent(r), b.extent(r)) << name;
    EXPECT_NE(std::string(a.label()).find(name), std::string::npos) << a.label();
  });
}

}  // namespace
