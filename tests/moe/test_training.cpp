// The training pieces of kmoe finetune: AdamW against torch.optim.AdamW's update written out in scalars, and the
// synthetic task's counter-based randomness (N(0,1) moments, independence from how experts are split).
#include <gtest/gtest.h>

#include <cmath>
#include <kmoe/moe/adamw.hpp>
#include <kmoe/moe/synthetic_task.hpp>

namespace {

using Space = Kokkos::DefaultHostExecutionSpace;
using W = kmoe::moe::MoeWeights<double, Space>;

W make_weights(std::int64_t E, std::int64_t H, std::int64_t F, std::int64_t S, std::int64_t first, std::int64_t local) {
  W w;
  w.router = W::views::matrix("router", E, H);
  w.w1 = W::views::tensor3("w1", local, F, H);
  w.w3 = W::views::tensor3("w3", local, F, H);
  w.w2 = W::views::tensor3("w2", local, H, F);
  w.shared_w1 = W::views::matrix("s1", S, H);
  w.shared_w3 = W::views::matrix("s3", S, H);
  w.shared_w2 = W::views::matrix("s2", H, S);
  w.first_expert = first;
  return w;
}

template <class F>
void for_each_view(const W& w, F&& f) {
  f(w.router), f(w.w1), f(w.w3), f(w.w2), f(w.shared_w1), f(w.shared_w3), f(w.shared_w2);
}

TEST(AdamW, MatchesTorchUpdateRule) {
  const W p = make_weights(3, 4, 5, 2, 0, 3), g = make_weights(3, 4, 5, 2, 0, 3);
  double seed = 0.1;
  for_each_view(p, [&](const auto& v) {
    for (std::size_t i = 0; i < v.span(); ++i) v.data()[i] = std::sin(seed += 0.37);
  });
  kmoe::moe::AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0.1;
  kmoe::moe::AdamW<double, Space> opt(p, o);
  // Reference state for one element of each view, evolved with torch.optim.AdamW's formulas.
  std::vector<double> ref_p, ref_m, ref_v;
  for_each_view(p, [&](const auto& v) {
    ref_p.push_back(v.data()[1]);
    ref_m.push_back(0);
    ref_v.push_back(0);
  });
  for (int t = 1; t <= 5; ++t) {
    std::size_t k = 0;
    for_each_view(g, [&](const auto& v) {
      for (std::size_t i = 0; i < v.span(); ++i) v.data()[i] = std::cos(0.3 * t + 0.1 * double(i) + double(k));
      const double grad = v.data()[1];
      ref_p[k] *= 1 - o.lr * o.weight_decay;
      ref_m[k] = o.beta1 * ref_m[k] + (1 - o.beta1) * grad;
      ref_v[k] = o.beta2 * ref_v[k] + (1 - o.beta2) * grad * grad;
      const double bc1 = 1 - std::pow(o.beta1, t), bc2 = 1 - std::pow(o.beta2, t);
      ref_p[k] -= (o.lr / bc1) * ref_m[k] / (std::sqrt(ref_v[k]) / std::sqrt(bc2) + o.eps);
      ++k;
    });
    opt.step(p, g);
  }
  EXPECT_EQ(opt.step_count(), 5);
  std::size_t k = 0;
  for_each_view(p, [&](const auto& v) {
    EXPECT_NEAR(v.data()[1], ref_p[k], 1e-14) << "view " << k;
    ++k;
  });
  k = 0;
  for_each_view(opt.exp_avg(), [&](const auto& v) { EXPECT_NEAR(v.data()[1], ref_m[k++], 1e-15); });
}

TEST(SyntheticTask, NormalNumbersHaveUnitMomentsAndAreDeterministic) {
  double sum = 0, sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double x = kmoe::moe::synthetic::normal_at(7, 3, static_cast<std::uint64_t>(i));
    sum += x;
    sq += x * x;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sq / n, 1.0, 0.01);
  EXPECT_EQ(kmoe::moe::synthetic::normal_at(7, 3, 12345), kmoe::moe::synthetic::normal_at(7, 3, 12345));
  EXPECT_NE(kmoe::moe::synthetic::normal_at(7, 3, 12345), kmoe::moe::synthetic::normal_at(8, 3, 12345));
  EXPECT_NE(kmoe::moe::synthetic::input_stream(1, 0), kmoe::moe::synthetic::input_stream(0, 1));
}

// The teacher of a rank's expert slice is the slice of the teacher of the whole layer (same for any rank count).
TEST(SyntheticTask, PerturbationIsIndependentOfTheExpertSplit) {
  const std::int64_t E = 5, H = 3, F = 4, S = 2;
  const W full = make_weights(E, H, F, S, 0, E);
  double x = 0;
  for_each_view(full, [&](const auto& v) {
    for (std::size_t i = 0; i < v.span(); ++i) v.data()[i] = 1 + (x += 0.01);
  });
  const double before = full.w1(0, 0, 0);
  const W teacher = kmoe::moe::synthetic::perturbed_copy(full, 42, 1, 0.1);
  EXPECT_NE(teacher.w1(0, 0, 0), full.w1(0, 0, 0));
  EXPECT_EQ(full.w1(0, 0, 0), before);  // the original is untouched
  for (std::int64_t first : {1, 3}) {
    const std::int64_t local = 2;
    W part = make_weights(E, H, F, S, first, local);
    Kokkos::deep_copy(part.router, full.router);
    Kokkos::deep_copy(part.shared_w1, full.shared_w1);
    Kokkos::deep_copy(part.shared_w3, full.shared_w3);
    Kokkos::deep_copy(part.shared_w2, full.shared_w2);
    for (std::int64_t e = 0; e < local; ++e)
      for (std::int64_t i = 0; i < F; ++i)
        for (std::int64_t j = 0; j < H; ++j) {
          part.w1(e, i, j) = full.w1(first + e, i, j);
          part.w3(e, i, j) = full.w3(first + e, i, j);
          part.w2(e, j, i) = full.w2(first + e, j, i);
        }
    const W t = kmoe::moe::synthetic::perturbed_copy(part, 42, 1, 0.1);
    for (std::int64_t e = 0; e < local; ++e)
      for (std::int64_t i = 0; i < F; ++i)
        for (std::int64_t j = 0; j < H; ++j) {
          EXPECT_EQ(t.w1(e, i, j), teacher.w1(first + e, i, j));
          EXPECT_EQ(t.w3(e, i, j), teacher.w3(first + e, i, j));
          EXPECT_EQ(t.w2(e, j, i), teacher.w2(first + e, j, i));
        }
    EXPECT_EQ(t.router(4, 2), teacher.router(4, 2));
    EXPECT_EQ(t.shared_w2(2, 1), teacher.shared_w2(2, 1));
  }
}

}  // namespace
