// Kernel tests on random data: routing (against a direct float64 evaluation, ties), the dispatch plan (a stable
// counting sort, padded offsets), padded gather/scatter (against their adjoint definitions), dense and grouped GEMM
// (BLAS vs the portable kernel, empty groups), SwiGLU MLP paths (scatter vs grouped vs a direct loop).
#include "kernel_test_util.hpp"

#include <kmoe/core/dispatch_plan.hpp>
#include <kmoe/core/expert_mlp.hpp>
#include <kmoe/core/gather_scatter.hpp>
#include <kmoe/core/grouped_gemm.hpp>
#include <kmoe/core/routing.hpp>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

using namespace kmoe;
using kmoe::test::fill_normal;
using kmoe::test::for_each_host_space;
using kmoe::test::max_abs_diff;
using M = Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>;
using MF = Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::HostSpace>;
using M3 = Kokkos::View<double***, Kokkos::LayoutRight, Kokkos::HostSpace>;
using I = Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Kokkos::HostSpace>;

TEST(Routing, MatchesDirectEvaluationAndTorchTopkOrder) {
  for_each_host_space([](auto space) {
    const std::int64_t T = 7, H = 5, E = 6, k = 3;
    M x("x", T, H), g("g", E, H), logits("l", T, E), probs("p", T, E), w("w", T, k);
    I idx("i", T, k);
    fill_normal(x, 1);
    fill_normal(g, 2);
    // Token 0: all logits equal (ties everywhere) -> experts 0,1,2 in that order, weights 1/3.
    for (std::int64_t h = 0; h < H; ++h) x(0, h) = 0;
    core::routing_forward(space, x, g, logits, probs, idx, w);
    for (std::int64_t t = 0; t < T; ++t) {
      std::vector<double> l(E), p(E);
      double mx = -1e300, sum = 0;
      for (std::int64_t e = 0; e < E; ++e) {
        for (std::int64_t h = 0; h < H; ++h) l[e] += x(t, h) * g(e, h);
        mx = std::max(mx, l[e]);
        EXPECT_NEAR(logits(t, e), l[e], 1e-14);
      }
      for (std::int64_t e = 0; e < E; ++e) sum += std::exp(l[e] - mx);
      for (std::int64_t e = 0; e < E; ++e) p[e] = std::exp(l[e] - mx) / sum;
      std::vector<std::int64_t> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return p[a] > p[b]; });
      double chosen = 0;
      for (std::int64_t s = 0; s < k; ++s) chosen += p[order[s]];
      for (std::int64_t s = 0; s < k; ++s) {
        EXPECT_EQ(idx(t, s), order[s]) << "token " << t << " slot " << s;
        EXPECT_NEAR(w(t, s), p[order[s]] / chosen, 1e-15);
      }
    }
    EXPECT_EQ(idx(0, 0), 0);
    EXPECT_EQ(idx(0, 1), 1);
    EXPECT_EQ(idx(0, 2), 2);
  });
}

TEST(Routing, BackwardMatchesFiniteDifferences) {
  const std::int64_t T = 4, H = 3, E = 5;
  for (std::int64_t k : {1, 2, 5}) {
    SCOPED_TRACE(k);
    M x("x", T, H), g("g", E, H), logits("l", T, E), probs("p", T, E), w("w", T, k), dw("dw", T, k);
    M dl("dl", T, E), dx("dx", T, H), dg("dg", E, H);
    I idx("i", T, k);
    fill_normal(x, 3);
    fill_normal(g, 4);
    fill_normal(dw, 5);
    Kokkos::Serial space;
    core::routing_forward(space, x, g, logits, probs, idx, w);
    core::routing_backward(space, x, g, probs, idx, w, dw, dl, dx, dg, false);
    // L = sum(w * dw) at fixed selection; central differences in every entry of G and x.
    auto loss = [&]() {
      M l2("l", T, E), p2("p", T, E), w2("w", T, k);
      I i2("i", T, k);
      core::routing_forward(space, x, g, l2, p2, i2, w2);
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t s = 0; s < k; ++s) EXPECT_EQ(i2(t, s), idx(t, s)) << "selection changed: shrink eps";
      double L = 0;
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t s = 0; s < k; ++s) L += w2(t, s) * dw(t, s);
      return L;
    };
    const double eps = 1e-6;
    auto check = [&](M v, M grad) {
      for (std::size_t i = 0; i < v.span(); ++i) {
        const double keep = v.data()[i];
        v.data()[i] = keep + eps;
        const double lp = loss();
        v.data()[i] = keep - eps;
        const double lm = loss();
        v.data()[i] = keep;
        EXPECT_NEAR(grad.data()[i], (lp - lm) / (2 * eps), 1e-8);
      }
    };
    check(g, dg);
    check(x, dx);
  }
}

TEST(DispatchPlan, StableCountingSortWithPaddedOffsets) {
  for_each_host_space([](auto space) {
    const std::int64_t T = 37, k = 2, E = 7, block = 4;
    I idx("i", T, k);
    std::mt19937 rng(7);
    for (std::int64_t t = 0; t < T; ++t) {
      // Expert 3 never chosen; distinct experts per token.
      std::int64_t a = rng() % E, b = rng() % E;
      if (a == 3) a = 4;
      while (b == a || b == 3) b = (b + 1) % E;
      idx(t, 0) = a;
      idx(t, 1) = b;
    }
    auto plan = core::make_dispatch_plan(space, idx, E, block);
    ASSERT_EQ(plan.counts_host.size(), std::size_t(E));
    EXPECT_EQ(plan.counts_host[3], 0);
    EXPECT_EQ(plan.offsets_host.back(), T * k);
    std::int64_t prev_pair = -1, prev_e = -1;
    for (std::int64_t r = 0; r < T * k; ++r) {
      const std::int64_t p = plan.row_pair(r), e = idx(p / k, p % k);
      EXPECT_EQ(plan.pair_row(p), r);
      EXPECT_GE(r, plan.offsets_host[e]);
      EXPECT_LT(r, plan.offsets_host[e + 1]);
      if (e == prev_e) EXPECT_GT(p, prev_pair) << "not stable";
      prev_e = e;
      prev_pair = p;
      EXPECT_EQ(plan.pair_padded_row(p), plan.padded_offsets_host[e] + r - plan.offsets_host[e]);
    }
    for (std::int64_t e = 0; e < E; ++e) {
      const std::int64_t padded = plan.padded_offsets_host[e + 1] - plan.padded_offsets_host[e];
      EXPECT_EQ(padded % block, 0);
      EXPECT_GE(padded, plan.counts_host[e]);
      EXPECT_LT(padded - plan.counts_host[e], block);
    }
  });
}

TEST(DispatchPlan, RejectsExpertOutOfRange) {
  I idx("i", 2, 1);
  idx(1, 0) = 5;
  EXPECT_THROW(core::make_dispatch_plan<Kokkos::Serial>(idx, 5), InputError);
}

TEST(GatherScatter, AreAdjointsOfEachOther) {
  for_each_host_space([](auto space) {
    const std::int64_t T = 9, H = 4, k = 3, E = 5;
    I idx("i", T, k);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t s = 0; s < k; ++s) idx(t, s) = (t + 2 * s) % E;
    auto plan = core::make_dispatch_plan(space, idx, E, 4);
    const std::int64_t R = plan.num_padded_rows();
    M x("x", T, H), xe("xe", R, H), dxe("dxe", R, H), dx("dx", T, H), w("w", T, k), ye("ye", R, H), y("y", T, H);
    M dy("dy", T, H), dye("dye", R, H), dw("dw", T, k);
    fill_normal(x, 1);
    fill_normal(dxe, 2);
    fill_normal(w, 3);
    fill_normal(ye, 4);
    fill_normal(dy, 5);
    core::padded_gather(space, x, plan.pair_padded_row, k, xe);
    core::padded_gather_backward(space, dxe, plan.pair_padded_row, k, dx);
    // <gather(x), dxe> over real rows == <x, gather^T(dxe)>
    double lhs = 0, rhs = 0;
    for (std::int64_t p = 0; p < T * k; ++p)
      for (std::int64_t h = 0; h < H; ++h) lhs += xe(plan.pair_padded_row(p), h) * dxe(plan.pair_padded_row(p), h);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < H; ++h) rhs += x(t, h) * dx(t, h);
    EXPECT_NEAR(lhs, rhs, 1e-12);
    // Padding rows are zero.
    std::vector<bool> real(R, false);
    for (std::int64_t p = 0; p < T * k; ++p) real[plan.pair_padded_row(p)] = true;
    for (std::int64_t r = 0; r < R; ++r)
      if (!real[r])
        for (std::int64_t h = 0; h < H; ++h) EXPECT_EQ(xe(r, h), 0.0);
    core::padded_scatter(space, ye, plan.pair_padded_row, w, y);
    core::padded_scatter_backward(space, dy, ye, plan.pair_padded_row, w, dye, dw);
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t s = 0; s < k; ++s) {
        double dot = 0;
        const std::int64_t r = plan.pair_padded_row(t * k + s);
        for (std::int64_t h = 0; h < H; ++h) {
          dot += dy(t, h) * ye(r, h);
          EXPECT_DOUBLE_EQ(dye(r, h), w(t, s) * dy(t, h));
        }
        EXPECT_NEAR(dw(t, s), dot, 1e-13);
      }
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t h = 0; h < H; ++h) {
        double sum = 0;
        for (std::int64_t s = 0; s < k; ++s) sum += w(t, s) * ye(plan.pair_padded_row(t * k + s), h);
        EXPECT_NEAR(y(t, h), sum, 1e-13);
      }
  });
}

TEST(GroupedGemm, BlasAndPortableKernelAgreeIncludingEmptyGroups) {
  for_each_host_space([](auto space) {
    const std::int64_t R = 23, K = 6, N = 5, G = 4;
    const std::vector<std::int64_t> offsets = {0, 7, 7, 20, 23};  // group 1 empty
    M a("a", R, K), c1("c1", R, N), c2("c2", R, N), b2("b2", R, N);
    M3 b("b", G, N, K), bn("bn", G, K, N), w1("w1", G, K, N), w2("w2", G, K, N);
    fill_normal(a, 1);
    fill_normal(b, 2);
    fill_normal(bn, 3);
    fill_normal(b2, 4);
    fill_normal(w1, 5);  // garbage that beta = 0 must overwrite
    for (auto algo : {core::GemmAlgo::Blas, core::GemmAlgo::Kokkos}) {
      M c(algo == core::GemmAlgo::Blas ? c1 : c2);
      core::grouped_gemm(space, 'T', 1.0, a, b, offsets, 0.0, c, algo);
      core::grouped_gemm(space, 'N', 0.5, a, bn, offsets, 1.0, c, algo);
      M3 w(algo == core::GemmAlgo::Blas ? w1 : w2);
      core::grouped_gemm_tn(space, 1.0, a, b2, offsets, 0.0, w, algo);
    }
    EXPECT_LT(max_abs_diff(c1, c2), 1e-13);
    EXPECT_LT(max_abs_diff(w1, w2), 1e-13);
    for (std::int64_t i = 0; i < K; ++i)
      for (std::int64_t j = 0; j < N; ++j) EXPECT_EQ(w1(1, i, j), 0.0) << "empty group's gradient must be zero";
    // Spot check one entry against the definition.
    double ref = 0;
    for (std::int64_t l = 0; l < K; ++l) ref += a(9, l) * b(2, 3, l);
    for (std::int64_t l = 0; l < K; ++l) ref += 0.5 * a(9, l) * bn(2, l, 3);
    EXPECT_NEAR(c1(9, 3), ref, 1e-13);
  });
}

TEST(GroupedGemm, ShapeMismatchIsAnInputError) {
  M a("a", 4, 3), c("c", 4, 2);
  M3 b("b", 2, 2, 4);
  EXPECT_THROW(core::grouped_gemm<Kokkos::Serial>(Kokkos::Serial(), 'T', 1.0, a, b, {0, 2, 4}, 0.0, c), InputError);
  M3 b_ok("b", 2, 2, 3);
  EXPECT_THROW(core::grouped_gemm(Kokkos::Serial(), 'T', 1.0, a, b_ok, {0, 2}, 0.0, c), InputError);
}

}  // namespace
