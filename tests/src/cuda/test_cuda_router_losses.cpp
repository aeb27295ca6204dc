// Router losses (<kmoe/core/router_losses.hpp>) on Kokkos::Cuda: the portable kernels on device Views against the same
// kernels on host copies (the default host space; fp32 and fp64 logits), on the bf16 CUDA layer's fp32 routing().logits (its own top-k
// is the losses' mask: the routed counts are its expert counts), and d_logits through the portable
// MoeLayer<float, Kokkos::Cuda> backward (the router gradient gains d_logitsᵀ·x) and through the bf16 CUDA layer.
#include "cuda_test.hpp"

#include <kmoe/core/router_losses.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <cmath>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace kmoe;
using Cuda = Kokkos::Cuda;

template <class T>
Kokkos::View<T**, Kokkos::LayoutRight, Cuda::memory_space> random_device(std::int64_t n0, std::int64_t n1,
                                                                        unsigned seed, double scale) {
  Kokkos::View<T**, Kokkos::LayoutRight, Cuda::memory_space> v("v", n0, n1);
  auto h = Kokkos::create_mirror_view(v);
  std::mt19937 rng(seed);
  std::normal_distribution<double> n(0.0, scale);
  for (std::size_t i = 0; i < h.span(); ++i) {
    if constexpr (std::is_same<T, bf16>::value) h.data()[i] = bf16::from_float(float(n(rng)));
    else h.data()[i] = T(n(rng));
  }
  Kokkos::deep_copy(v, h);
  return v;
}

/// Stats and gradient on the device against the host (Serial) on a copy of the same logits.
template <class T>
void device_matches_host(std::int64_t tokens, std::int64_t E, std::int64_t k, double tol) {
  SCOPED_TRACE("T=" + std::to_string(tokens) + " E=" + std::to_string(E) + " k=" + std::to_string(k));
  const auto logits = random_device<T>(tokens, E, 7, 2.0);
  const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), logits);
  Kokkos::View<double*, Cuda::memory_space> w("w", tokens);
  Kokkos::deep_copy(w, 1.0);
  Kokkos::deep_copy(Kokkos::subview(w, Kokkos::make_pair(std::int64_t(0), tokens / 4)), 0.0);
  const auto wh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w);
  core::RouterLossStats sd, sh;
  core::router_loss_statistics(Cuda(), logits, k, w, sd);
  core::router_loss_statistics(Kokkos::DefaultHostExecutionSpace(), host, k, wh, sh);
  EXPECT_NEAR(sd.load_balancing_loss(), sh.load_balancing_loss(), tol * sh.load_balancing_loss());
  EXPECT_NEAR(sd.z_loss(), sh.z_loss(), tol * sh.z_loss());
  EXPECT_EQ(sd.tokens, sh.tokens);
  const core::RouterLossCoefficients c{0.02, 0.001};
  Kokkos::View<T**, Kokkos::LayoutRight, Cuda::memory_space> dd("dd", tokens, E);
  Kokkos::View<T**, Kokkos::LayoutRight, Kokkos::HostSpace> dh("dh", tokens, E);
  core::router_loss_backward(Cuda(), logits, w, sd, c, dd);
  core::router_loss_backward(Kokkos::DefaultHostExecutionSpace(), host, wh, sh, c, dh);
  const auto dd_h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dd);
  double num = 0, den = 0;
  for (std::size_t i = 0; i < dh.span(); ++i) {
    num += (double(dd_h.data()[i]) - double(dh.data()[i])) * (double(dd_h.data()[i]) - double(dh.data()[i]));
    den += double(dh.data()[i]) * double(dh.data()[i]);
  }
  EXPECT_LT(std::sqrt(num / den), tol);
}

TEST(CudaRouterLosses, DeviceKernelsMatchTheHostOnes) {
  KMOE_REQUIRE_GPU();
  device_matches_host<float>(4096, 8, 2, 1e-5);
  device_matches_host<float>(1000, 128, 8, 1e-5);
  device_matches_host<double>(3000, 64, 6, 1e-12);
}

template <class T>
moe::MoeWeights<T, Cuda> random_weights(std::int64_t E, std::int64_t H, std::int64_t F, unsigned seed) {
  using V = moe::MoeViews<T, Cuda>;
  moe::MoeWeights<T, Cuda> w;
  auto fill = [&](auto& v, unsigned s, float scale) {
    auto h = Kokkos::create_mirror_view(v);
    std::mt19937 rng(s);
    std::normal_distribution<float> n(0.f, scale);
    for (std::size_t i = 0; i < h.span(); ++i) {
      if constexpr (std::is_same<T, bf16>::value) h.data()[i] = bf16::from_float(n(rng));
      else h.data()[i] = n(rng);
    }
    Kokkos::deep_copy(v, h);
  };
  const float ws = 1.f / std::sqrt(float(H));
  w.router = typename V::matrix("router", E, H);
  w.w1 = typename V::tensor3("w1", E, F, H);
  w.w3 = typename V::tensor3("w3", E, F, H);
  w.w2 = typename V::tensor3("w2", E, H, F);
  w.shared_w1 = typename V::matrix("sw1", 0, H);
  w.shared_w3 = typename V::matrix("sw3", 0, H);
  w.shared_w2 = typename V::matrix("sw2", H, 0);
  fill(w.router, seed, 4.f * ws);  // spread logits: no near ties between the two top-k evaluations
  fill(w.w1, seed + 1, ws);
  fill(w.w3, seed + 2, ws);
  fill(w.w2, seed + 3, 1.f / std::sqrt(float(F)));
  return w;
}

TEST(CudaRouterLosses, OnTheBf16LayersRoutingLogits) {
  KMOE_REQUIRE_GPU();
  const std::int64_t T = 2048, E = 16, H = 128, F = 64, k = 2;
  moe::MoeOptions opt;
  opt.top_k = k;
  moe::MoeLayer<bf16, Cuda> layer(random_weights<bf16>(E, H, F, 3), opt);
  const auto x = random_device<bf16>(T, H, 5, 1.0);
  layer.forward(x);
  const auto& routing = layer.routing();  // fp32 device Views
  core::RouterLossStats s;
  core::router_loss_statistics(Cuda(), routing.logits, k, s);
  const auto counts = layer.expert_counts();
  double mismatched = 0;
  for (std::int64_t e = 0; e < E; ++e) mismatched += std::abs(s.routed[e] - double(counts[e]));
  EXPECT_LE(mismatched, 2.0) << "the losses' top-k is the layer's";
  EXPECT_GE(s.load_balancing_loss(), double(k) - 1e-6);
  // The load-balancing gradient w.r.t. the same fp32 logits, as a bf16 layer would take it.
  Kokkos::View<float**, Kokkos::LayoutRight, Cuda::memory_space> d("d_logits", T, E);
  core::router_loss_backward(Cuda(), layer.router_logits(), s, {0.02, 0.0}, d);
  const auto dh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), d);
  double sum = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    double row = 0;
    for (std::int64_t e = 0; e < E; ++e) row += dh(t, e);
    sum += std::abs(row);
  }
  EXPECT_LT(sum / T, 1e-8) << "each token's load-balancing d_logits sums to 0 (softmax)";
}

TEST(CudaRouterLosses, DLogitsThroughThePortableCudaLayer) {
  KMOE_REQUIRE_GPU();
  const std::int64_t T = 300, E = 8, H = 64, F = 32, k = 2;
  moe::MoeOptions opt;
  opt.top_k = k;
  moe::MoeLayer<float, Cuda> layer(random_weights<float>(E, H, F, 9), opt);
  const auto x = random_device<float>(T, H, 11, 1.0);
  const auto dy = random_device<float>(T, H, 12, 1.0);
  const auto d_logits = random_device<float>(T, E, 13, 1.0);
  layer.forward(x);
  const auto plain = layer.backward(dy);
  layer.forward(x);
  const auto with = layer.backward(dy, d_logits);
  const auto xh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), x);
  const auto dl = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), d_logits);
  const auto g0 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plain.grads.router);
  const auto g1 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), with.grads.router);
  double num = 0, den = 0;
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t h = 0; h < H; ++h) {
      double want = g0(e, h);
      for (std::int64_t t = 0; t < T; ++t) want += double(dl(t, e)) * double(xh(t, h));
      num += (g1(e, h) - want) * (g1(e, h) - want);
      den += want * want;
    }
  EXPECT_LT(std::sqrt(num / den), 1e-5);
}

// The bf16 CUDA layer takes the losses' gradient too: its router gradient gains d_logitsᵀ·x and dx gains d_logits·G,
// added in the router's backward kernel (the GEMM operand is bf16: within 1e-2 of the float64 terms).
TEST(CudaRouterLosses, DLogitsThroughTheBf16CudaLayer) {
  KMOE_REQUIRE_GPU();
  const std::int64_t T = 300, E = 8, H = 64, F = 32, k = 2;
  moe::MoeOptions opt;
  opt.top_k = k;
  const auto w = random_weights<bf16>(E, H, F, 9);
  moe::MoeLayer<bf16, Cuda> layer(w, opt);
  const auto x = random_device<bf16>(T, H, 11, 1.0);
  const auto dy = random_device<bf16>(T, H, 12, 1.0);
  const auto d_logits = random_device<float>(T, E, 13, 1.0);
  layer.forward(x);
  const auto plain = layer.backward(dy);
  layer.forward(x);
  const auto with = layer.backward(dy, d_logits);
  Kokkos::fence();
  const auto xh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), x);
  const auto gh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w.router);
  const auto dl = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), d_logits);
  const auto g0 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plain.grads.router);
  const auto g1 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), with.grads.router);
  const auto dx0 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plain.dx);
  const auto dx1 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), with.dx);
  double num = 0, den = 0;  // the change of the router gradient against d_logitsᵀ·x
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t h = 0; h < H; ++h) {
      double want = 0;
      for (std::int64_t t = 0; t < T; ++t) want += double(dl(t, e)) * double(float(xh(t, h)));
      num += (g1(e, h) - g0(e, h) - want) * (g1(e, h) - g0(e, h) - want);
      den += want * want;
    }
  EXPECT_LT(std::sqrt(num / den), 1e-2) << "router gradient";
  num = den = 0;  // the change of dx against d_logits·G
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t h = 0; h < H; ++h) {
      double want = 0;
      for (std::int64_t e = 0; e < E; ++e) want += double(dl(t, e)) * double(float(gh(e, h)));
      num += (dx1(t, h) - dx0(t, h) - want) * (dx1(t, h) - dx0(t, h) - want);
      den += want * want;
    }
  EXPECT_LT(std::sqrt(num / den), 1e-2) << "dx";
  // A d_logits of another shape is refused by name.
  layer.forward(x);
  EXPECT_THROW(layer.backward(dy, random_device<float>(T + 1, E, 14, 1.0)), InputError);
}

}  // namespace
