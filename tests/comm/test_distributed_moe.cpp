// DistributedMoe (MoeLayer's stages + all-to-all) against the single-process MoeLayer on the same global batch:
// every ep that divides the world, uneven token splits (ranks without tokens too), with and without a shared expert,
// every testdata family's variants (their optional tensors sharded or replicated), float64 within 1e-12 relative, and
// the global gradient norm equal to the single-process one.
#include <gtest/gtest.h>

#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/checkpoint.hpp>

#include "kmoe_test.hpp"

#include <cmath>
#include <random>
#include <string>

namespace {

using namespace kmoe;
using Exec = Kokkos::DefaultHostExecutionSpace;  // host views: the MPI backend moves host memory
using Weights = moe::MoeWeights<double, Exec>;
using Matrix = Weights::views::matrix;
using Tensor3 = Weights::views::tensor3;

template <class V>
void fill(const V& v, std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> n(0.0, scale);
  auto h = Kokkos::create_mirror_view(v);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = n(rng);
  Kokkos::deep_copy(v, h);
}

Weights random_weights(std::int64_t E, std::int64_t H, std::int64_t F, std::int64_t S, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Weights w;
  w.router = Matrix("router", E, H);
  w.w1 = Tensor3("w1", E, F, H);
  w.w3 = Tensor3("w3", E, F, H);
  w.w2 = Tensor3("w2", E, H, F);
  w.shared_w1 = Matrix("sw1", S, H);
  w.shared_w3 = Matrix("sw3", S, H);
  w.shared_w2 = Matrix("sw2", H, S);
  fill(w.router, rng, 1.0);
  fill(w.w1, rng, 0.2);
  fill(w.w3, rng, 0.2);
  fill(w.w2, rng, 0.2);
  fill(w.shared_w1, rng, 0.2);
  fill(w.shared_w3, rng, 0.2);
  fill(w.shared_w2, rng, 0.2);
  return w;
}

/// max |a - b| / max|b| over the rows [row0, row0 + a.extent(0)) of b (b may be larger in its first extent).
template <class A, class B>
double rel_err(const A& a, const B& b, std::int64_t row0 = 0) {
  const std::size_t inner = a.extent(0) == 0 ? 0 : a.span() / a.extent(0);
  const std::size_t off = static_cast<std::size_t>(row0) * inner;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.span(); ++i) den = std::max(den, std::abs(b.data()[i]));
  for (std::size_t i = 0; i < a.span(); ++i) num = std::max(num, std::abs(a.data()[i] - b.data()[off + i]));
  return den == 0 ? num : num / den;
}

double sumsq(const Weights& g) {
  double s = 0;
  auto add = [&](const auto& v) {
    for (std::size_t i = 0; i < v.span(); ++i) s += v.data()[i] * v.data()[i];
  };
  moe::for_each_weight_pair(g, g, [&](const auto& v, const auto&, const char*) { add(v); });
  return s;
}

/// DistributedMoe with `ep` on this rank's share of x/dy against MoeLayer on all of them: outputs, gradients and the
/// global norm within 1e-12 relative.
void compare(const Weights& full, const Matrix& x, const Matrix& dy, int ep, int top_k, const std::string& what) {
  auto world = comm::MpiCommunicator::world();
  const std::int64_t E = full.num_experts(), H = full.hidden(), S = full.shared_ffn(), tokens = x.extent(0);
  moe::MoeOptions opt;
  opt.top_k = top_k;

  moe::MoeLayer<double, Exec> single(full, opt);
  const Matrix y_ref = single.forward(x);
  const auto b_ref = single.backward(dy);

  comm::ExpertParallel layout(*world, E, ep);
  comm::DistributedMoe<double, Exec> dist(layout, comm::local_slice(full, layout), opt);
  const auto mine = comm::contiguous_split(tokens, world->size(), world->rank());
  const auto rows = Kokkos::make_pair(mine.begin, mine.end());
  const Matrix x_local("x_local", mine.count, H), dy_local("dy_local", mine.count, H);
  Kokkos::deep_copy(x_local, Kokkos::subview(x, rows, Kokkos::ALL));
  Kokkos::deep_copy(dy_local, Kokkos::subview(dy, rows, Kokkos::ALL));
  const Matrix y = dist.forward(x_local);
  const auto b = dist.backward(dy_local);
  auto grads = dist.gradient_set(b);
  grads.reduce();

  const std::string where = what + ": world " + std::to_string(world->size()) + " ep " + std::to_string(ep) +
                            " rank " + std::to_string(world->rank()) + " tokens " + std::to_string(tokens) + " shared " +
                            std::to_string(S) + " k " + std::to_string(top_k);
  // The send order of the handle is the plan's row order (DistributedMoe relies on it).
  const auto sa = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dist.handle().send_assignment());
  const auto rp = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dist.routing().plan.row_pair);
  ASSERT_EQ(sa.extent(0), rp.extent(0)) << where;
  for (std::size_t i = 0; i < sa.extent(0); ++i) ASSERT_EQ(sa(i), rp(i)) << where;

  const double tol = 1e-12;
  EXPECT_LT(rel_err(y, y_ref, mine.begin), tol) << where;
  EXPECT_LT(rel_err(b.dx, b_ref.dx, mine.begin), tol) << where;
  EXPECT_LT(rel_err(b.grads.router, b_ref.grads.router), tol) << where;
  const auto ex = layout.local_experts();
  EXPECT_LT(rel_err(b.grads.w1, b_ref.grads.w1, ex.begin), tol) << where;
  EXPECT_LT(rel_err(b.grads.w3, b_ref.grads.w3, ex.begin), tol) << where;
  EXPECT_LT(rel_err(b.grads.w2, b_ref.grads.w2, ex.begin), tol) << where;
  // Every tensor, the optional ones (biases, shared gate) included: expert ones against the single-process rows of
  // this rank's experts, the others whole.
  int compared = 0;
  moe::for_each_weight_pair(b.grads, b_ref.grads, [&](const auto& got, const auto& want, const char* name) {
    ASSERT_EQ(got.span() == 0, want.span() == 0) << where << " " << name;
    if (want.span() == 0) return;
    ++compared;
    EXPECT_LT(rel_err(got, want, moe::is_expert_tensor(name) ? ex.begin : 0), tol) << where << " " << name;
  });
  const int optional = int(full.has_router_bias()) + 3 * int(full.has_expert_biases()) + int(full.has_shared_gate());
  EXPECT_EQ(compared, 4 + (S > 0 ? 3 : 0) + optional) << where;
  const double norm_ref = std::sqrt(sumsq(b_ref.grads));
  EXPECT_NEAR(grads.global_norm(), norm_ref, tol * norm_ref) << where;
}

void check(std::int64_t tokens, int ep, std::int64_t S, int top_k) {
  const std::int64_t E = 5, H = 16, F = 12;
  const Weights full = random_weights(E, H, F, S, 7);
  Matrix x("x", tokens, H), dy("dy", tokens, H);
  std::mt19937_64 rng(11);
  fill(x, rng, 1.0);
  fill(dy, rng, 1.0);
  compare(full, x, dy, ep, top_k, "random weights");
}

TEST(DistributedMoe, EveryTestdataLayerMatchesTheSingleProcessLayer) {
  const int n = comm::MpiCommunicator::world()->size();
  // Besides the Mixtral/Granite sets, the families with the other variants: DeepSeek-V3 (sigmoid, selection bias,
  // group-limited top-k, scaling, a plain shared expert), GPT-OSS (router bias, softmax over the k, expert biases
  // sharded with their experts, the clamped SwiGLU), Qwen2-MoE (the gated shared expert), OLMoE (no renormalisation).
  for (const std::string set : {"mixtral-tiny", "granitemoe-tiny", "granitemoeshared-tiny", "deepseek_v3-tiny",
                                "gpt_oss-tiny", "qwen2_moe-tiny", "olmoe-tiny"}) {
    const auto ckpt = io::HfCheckpoint::open(kmoe::test::testdata_dir() / set / "hf_save_pretrained");
    const auto ref = io::SafetensorsFile::open(kmoe::test::testdata_dir() / set / (set + "-ref.safetensors"));
    for (int layer : ckpt.config().moe_layers) {
      const Weights full = moe::load_weights<double, Exec>(ckpt, layer);
      const std::string p = "layers." + std::to_string(layer) + ".";
      auto rows = [&](const std::string& name) {
        const auto v = io::to_host_view<double>(ref.tensor(p + name));
        Matrix m(name, v.extent(0) / full.hidden(), full.hidden());
        std::copy(v.data(), v.data() + v.extent(0), m.data());
        return m;
      };
      const auto x = rows("x"), dy = rows("dy");
      // Every ep that divides the world (2 replicas x ep 2 on 4 ranks included).
      for (int ep = 1; ep <= n; ++ep)
        if (n % ep == 0) compare(full, x, dy, ep, static_cast<int>(ckpt.config().top_k), set + " layer " + std::to_string(layer));
    }
  }
}

TEST(DistributedMoe, EveryLayoutMatchesTheSingleProcessLayer) {
  const int n = comm::MpiCommunicator::world()->size();
  for (int ep = 1; ep <= n; ++ep) {
    if (n % ep) continue;
    check(37, ep, 0, 2);
    check(37, ep, 8, 2);
  }
}

// Every optional tensor at once (router bias, expert biases, a gated shared expert) with sigmoid group-limited routing
// and a selection bias and the clamped SwiGLU: not one family, all the variants' code, including ranks with no token.
TEST(DistributedMoe, AllVariantsTogetherAndRanksWithoutTokens) {
  const int n = comm::MpiCommunicator::world()->size();
  const std::int64_t E = 6, H = 16, F = 12, S = 8;
  Weights full = random_weights(E, H, F, S, 13);
  std::mt19937_64 rng(17);
  full.router_bias = Weights::views::vector("router_bias", E);
  full.score_bias = Weights::views::vector("score_bias", E);
  full.w1_bias = Matrix("w1_bias", E, F);
  full.w3_bias = Matrix("w3_bias", E, F);
  full.w2_bias = Matrix("w2_bias", E, H);
  full.shared_gate = Matrix("shared_gate", 1, H);
  for (const auto& v : {full.w1_bias, full.w3_bias, full.w2_bias, full.shared_gate}) fill(v, rng, 0.5);
  fill(full.router_bias, rng, 0.3);
  fill(full.score_bias, rng, 0.3);
  full.routing.score = core::ScoreFunction::Sigmoid;
  full.routing.n_group = 3;
  full.routing.topk_group = 2;
  full.routing.scaling_factor = 1.5;
  full.expert.activation = core::Activation::ClampedSwiGLU;
  full.expert.limit = 0.8;
  for (std::int64_t tokens : {3, 29}) {
    Matrix x("x", tokens, H), dy("dy", tokens, H);
    fill(x, rng, 1.0);
    fill(dy, rng, 1.0);
    for (int ep = 1; ep <= n; ++ep)
      if (n % ep == 0) compare(full, x, dy, ep, 2, "all variants");
  }
}

TEST(DistributedMoe, FewTokensLeaveRanksEmpty) { check(3, comm::MpiCommunicator::world()->size(), 0, 2); }

TEST(DistributedMoe, TopOne) { check(23, comm::MpiCommunicator::world()->size(), 0, 1); }

}  // namespace
