// Router losses under expert (and data) parallelism, run with 1-4 ranks: each rank takes the statistics of its own
// tokens, comm::allreduce_router_loss_stats sums them over the world, and every rank then holds the single-process
// loss of the whole batch (1e-12 relative); DistributedMoe::backward(dy, d_logits) with each rank's share of the
// gradient, reduced by the GradientSet, gives the single-process gradients (router, experts, dx rows). Every ep that
// divides the world (replicas included), uneven splits and ranks without tokens, with and without token weights,
// over one layer and over two layers' concatenated statistics.
#include <gtest/gtest.h>

#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/comm/router_losses.hpp>
#include <kmoe/core/router_losses.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kmoe;
using Exec = Kokkos::DefaultHostExecutionSpace;  // host views: the MPI backend moves host memory
using Weights = moe::MoeWeights<double, Exec>;
using Matrix = Weights::views::matrix;
using Tensor3 = Weights::views::tensor3;
using W = Kokkos::View<double*, Exec::memory_space>;

template <class V>
void fill(const V& v, std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> n(0.0, scale);
  for (std::size_t i = 0; i < v.span(); ++i) v.data()[i] = n(rng);
}

Weights random_weights(std::int64_t E, std::int64_t H, std::int64_t F, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Weights w;
  w.router = Matrix("router", E, H);
  w.w1 = Tensor3("w1", E, F, H);
  w.w3 = Tensor3("w3", E, F, H);
  w.w2 = Tensor3("w2", E, H, F);
  w.shared_w1 = Matrix("sw1", 0, H);
  w.shared_w3 = Matrix("sw3", 0, H);
  w.shared_w2 = Matrix("sw2", H, 0);
  fill(w.router, rng, 1.0);
  fill(w.w1, rng, 0.2);
  fill(w.w3, rng, 0.2);
  fill(w.w2, rng, 0.2);
  return w;
}

/// max |a - b| / max|b|, a holding rows [row0, row0 + a.extent(0)) of b.
template <class A, class B>
double rel_err(const A& a, const B& b, std::int64_t row0 = 0) {
  const std::size_t inner = a.extent(0) == 0 ? 0 : a.span() / a.extent(0);
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.span(); ++i) den = std::max(den, std::abs(b.data()[i]));
  for (std::size_t i = 0; i < a.span(); ++i)
    num = std::max(num, std::abs(a.data()[i] - b.data()[static_cast<std::size_t>(row0) * inner + i]));
  return den == 0 ? num : num / den;
}

template <class V>
V rows_of(const V& m, std::int64_t begin, std::int64_t count) {
  V out(std::string(m.label()) + "_local", count, m.extent(1));
  Kokkos::deep_copy(out, Kokkos::subview(m, Kokkos::make_pair(begin, begin + count), Kokkos::ALL));
  return out;
}

void compare(std::int64_t tokens, int ep, int top_k, int num_layers, bool weighted) {
  auto world = comm::MpiCommunicator::world();
  const std::int64_t E = 5, H = 8, F = 6;
  const core::RouterLossCoefficients coef{0.3, 0.02};
  const std::string where = "world " + std::to_string(world->size()) + " ep " + std::to_string(ep) + " rank " +
                            std::to_string(world->rank()) + " tokens " + std::to_string(tokens) + " k " +
                            std::to_string(top_k) + " layers " + std::to_string(num_layers) +
                            (weighted ? " weighted" : "");
  moe::MoeOptions opt;
  opt.top_k = top_k;
  comm::ExpertParallel layout(*world, E, ep);
  const auto mine = comm::contiguous_split(tokens, world->size(), world->rank());
  W weight("w", weighted ? tokens : 0);
  for (std::int64_t t = 0; t < std::int64_t(weight.extent(0)); ++t) weight(t) = t % 3 == 1 ? 0.0 : 1.0;
  const W weight_local = weighted ? W("wl", mine.count) : W();
  for (std::int64_t t = 0; weighted && t < mine.count; ++t) weight_local(t) = weight(mine.begin + t);

  std::vector<Weights> full;
  std::vector<Matrix> x, dy;
  std::vector<moe::MoeLayer<double, Exec>> single;
  std::vector<comm::DistributedMoe<double, Exec>> dist;
  std::mt19937_64 rng(5);
  core::RouterLossStats s_single, s_dist;
  for (int l = 0; l < num_layers; ++l) {
    full.push_back(random_weights(E, H, F, 7 + l));
    x.emplace_back("x", tokens, H);
    dy.emplace_back("dy", tokens, H);
    fill(x.back(), rng, 1.0);
    fill(dy.back(), rng, 1.0);
    single.emplace_back(full.back(), opt);
    single.back().forward(x.back());
    core::router_loss_statistics(Exec(), single.back().router_logits(), top_k, weight, s_single);
    dist.emplace_back(layout, comm::local_slice(full.back(), layout), opt);
  }
  std::vector<Matrix> x_local, dy_local;
  for (int l = 0; l < num_layers; ++l) {
    x_local.push_back(rows_of(x[l], mine.begin, mine.count));
    dy_local.push_back(rows_of(dy[l], mine.begin, mine.count));
    dist[l].forward(x_local[l]);
    core::router_loss_statistics(Exec(), dist[l].routing().logits, top_k, weight_local, s_dist);
  }
  comm::allreduce_router_loss_stats(*world, s_dist);
  const double lb = s_single.load_balancing_loss(), z = s_single.z_loss();
  EXPECT_NEAR(s_dist.load_balancing_loss(), lb, 1e-12 * lb) << where;
  EXPECT_NEAR(s_dist.z_loss(), z, 1e-12 * z) << where;
  EXPECT_EQ(s_dist.tokens, s_single.tokens) << where;

  for (int l = 0; l < num_layers; ++l) {
    const auto logits = single[l].router_logits();
    Matrix d("d", logits.extent(0), logits.extent(1));
    core::router_loss_backward(Exec(), logits, weight, s_single, coef, d);
    const auto ref = single[l].backward(dy[l], d);

    const auto ll = dist[l].routing().logits;
    Matrix dl("dl", ll.extent(0), ll.extent(1));
    core::router_loss_backward(Exec(), ll, weight_local, s_dist, coef, dl);
    const auto b = dist[l].backward(dy_local[l], dl);
    auto grads = dist[l].gradient_set(b);
    grads.reduce();
    const double tol = 1e-12;
    const std::string at = where + " layer " + std::to_string(l);
    EXPECT_LT(rel_err(b.dx, ref.dx, mine.begin), tol) << at;
    EXPECT_LT(rel_err(b.grads.router, ref.grads.router), tol) << at;
    const auto ex = layout.local_experts();
    EXPECT_LT(rel_err(b.grads.w1, ref.grads.w1, ex.begin), tol) << at;
    EXPECT_LT(rel_err(b.grads.w2, ref.grads.w2, ex.begin), tol) << at;
  }
}

TEST(RouterLossesMpi, GlobalLossAndGradientsEqualTheSingleProcessOnes) {
  const int n = comm::MpiCommunicator::world()->size();
  for (int ep = 1; ep <= n; ++ep) {
    if (n % ep) continue;
    for (bool weighted : {false, true}) {
      compare(37, ep, 2, 1, weighted);
      compare(29, ep, 2, 2, weighted);
    }
  }
  compare(3, n, 2, 2, true);  // ranks without tokens
  compare(23, n, 1, 1, false);
}

TEST(RouterLossesMpi, EmptyStatisticsAreAUsageError) {
  auto world = comm::MpiCommunicator::world();
  core::RouterLossStats s;
  EXPECT_THROW(comm::allreduce_router_loss_stats(*world, s), UsageError);
}

}  // namespace
