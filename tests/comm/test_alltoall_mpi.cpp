// Expert parallelism over MPI ranks on a synthetic MoE: dispatch/combine forward and backward, gradient reduction and
// the global norm, for every ep that divides the world (replicas x ep), against the single-rank reference.
#include <gtest/gtest.h>

#include "comm_fixture.hpp"

#include <kmoe/comm/gather.hpp>
#include <kmoe/comm/mpi_communicator.hpp>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace {

using namespace kmoe;
using kmoe::test::SyntheticMoe;

std::unique_ptr<comm::MpiCommunicator> world() { return comm::MpiCommunicator::world(); }

/// Counts the calls that reach the wrapped communicator (to show that the handle exchanges counts once).
class CountingCommunicator final : public comm::Communicator {
 public:
  explicit CountingCommunicator(comm::Communicator& inner) : inner_(inner) {}
  int count_exchanges = 0, row_exchanges = 0;
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const char* backend() const override { return inner_.backend(); }
  bool uses_device_memory() const override { return inner_.uses_device_memory(); }
  void barrier() override { inner_.barrier(); }
  void alltoall_counts(const std::int64_t* s, std::int64_t* r, int n) override {
    ++count_exchanges;
    inner_.alltoall_counts(s, r, n);
  }
  void alltoallv(const void* s, const std::int64_t* sc, const std::int64_t* so, void* r, const std::int64_t* rc,
                 const std::int64_t* ro, std::int64_t w, comm::DataType t) override {
    ++row_exchanges;
    inner_.alltoallv(s, sc, so, r, rc, ro, w, t);
  }
  void alltoallv_blocks(const void* s, const comm::RowBlock* sb, std::size_t ns, void* r, const comm::RowBlock* rb,
                        std::size_t nr, std::int64_t w, comm::DataType t) override {
    ++row_exchanges;
    inner_.alltoallv_blocks(s, sb, ns, r, rb, nr, w, t);
  }
  void allreduce_sum(void* d, std::int64_t n, comm::DataType t) override { inner_.allreduce_sum(d, n, t); }
  void allreduce_sum_host(double* d, std::int64_t n) override { inner_.allreduce_sum_host(d, n); }
  void broadcast(void* d, std::int64_t b, int root) override { inner_.broadcast(d, b, root); }
  void synchronize() override { inner_.synchronize(); }
  std::unique_ptr<comm::Communicator> split(int c, int k) override { return inner_.split(c, k); }
  [[noreturn]] void abort(int code, const std::string& m) override {
    inner_.abort(code, m);
    std::abort();
  }

 private:
  comm::Communicator& inner_;
};

template <class T>
T from_float(float f) {
  if constexpr (std::is_same_v<T, bf16>) return bf16::from_float(f);
  else return static_cast<T>(f);
}

double rel_diff_max(double a, double b) { return std::abs(a - b) / std::max(1.0, std::abs(b)); }

/// Runs the synthetic problem with `ep` and checks y, dx, dA, g and the norm against the reference.
void check_layout(const SyntheticMoe& p, int ep) {
  auto w = world();
  comm::ExpertParallel layout(*w, p.E, ep);
  CountingCommunicator counted(layout.ep_group());
  comm::GradientSet grads(layout);
  const auto got = kmoe::test::distributed(p, layout, counted, grads);
  const auto ref = kmoe::test::reference(p);
  const std::string where = "world " + std::to_string(w->size()) + ", ep " + std::to_string(ep) + ", rank " +
                            std::to_string(w->rank()) + ", T " + std::to_string(p.T);
  EXPECT_EQ(counted.count_exchanges, 1) << where;  // one count exchange for dispatch, combine and both backwards
  EXPECT_EQ(counted.row_exchanges, 4) << where;

  const auto mine = comm::contiguous_split(p.T, w->size(), w->rank());
  double worst = 0;
  for (std::int64_t t = 0; t < mine.count; ++t)
    for (int c = 0; c < p.H; ++c) {
      worst = std::max(worst, rel_diff_max(got.y(t, c), ref.y(mine.begin + t, c)));
      worst = std::max(worst, rel_diff_max(got.dx(t, c), ref.dx(mine.begin + t, c)));
    }
  const auto local = layout.local_experts();
  for (std::int64_t j = 0; j < local.count; ++j)
    for (int i = 0; i < p.H; ++i)
      for (int c = 0; c < p.H; ++c) worst = std::max(worst, rel_diff_max(got.dA(j, i, c), ref.dA(local.begin + j, i, c)));
  double ref_sumsq = 0;
  for (std::int64_t e = 0; e < p.E; ++e) {
    worst = std::max(worst, rel_diff_max(got.g(e), ref.g(e)));
    ref_sumsq += ref.g(e) * ref.g(e);
    for (int i = 0; i < p.H; ++i)
      for (int c = 0; c < p.H; ++c) ref_sumsq += ref.dA(e, i, c) * ref.dA(e, i, c);
  }
  EXPECT_LT(worst, 1e-12) << where;
  const double norm = grads.global_norm();
  EXPECT_NEAR(norm, std::sqrt(ref_sumsq), 1e-12 * std::sqrt(ref_sumsq)) << where;
}

TEST(AllToAll, EveryEpThatDividesTheWorldMatchesOneRank) {
  const int n = world()->size();
  for (std::int64_t T : {37, 3, 0}) {  // uneven token splits; with 3 or 0 tokens some ranks have none
    SyntheticMoe p;
    p.T = T;
    for (int ep = 1; ep <= n; ++ep)
      if (n % ep == 0 && ep <= p.E) check_layout(p, ep);
  }
}

TEST(AllToAll, TopOneAndOneExpertPerRank) {
  SyntheticMoe p;
  p.k = 1;
  p.E = std::max(2, world()->size());
  check_layout(p, world()->size());
}

TEST(AllToAll, RoundTripIsExactForEveryType) {
  auto w = world();
  comm::ExpertParallel layout(*w, 5);
  SyntheticMoe p;
  const auto mine = comm::contiguous_split(p.T, w->size(), w->rank());
  kmoe::test::Idx topk("topk", mine.count, p.k);
  for (std::int64_t t = 0; t < mine.count; ++t)
    for (int s = 0; s < p.k; ++s) topk(t, s) = p.expert(mine.begin + t, s);
  const comm::DispatchHandle h(layout, topk);
  auto round_trip = [&](auto zero) {
    using T = decltype(zero);
    Kokkos::View<T**, Kokkos::LayoutRight, Kokkos::HostSpace> z("z", h.num_assignments(), 3);
    for (std::size_t a = 0; a < z.extent(0); ++a)
      for (int c = 0; c < 3; ++c) z(a, c) = from_float<T>(static_cast<float>(1000 * w->rank() + 10 * a + c));
    const auto back = comm::combine_forward(h, comm::dispatch_forward(h, z));
    ASSERT_EQ(back.extent(0), z.extent(0));
    for (std::size_t a = 0; a < z.extent(0); ++a)
      for (int c = 0; c < 3; ++c)
        EXPECT_EQ(static_cast<float>(back(a, c)), static_cast<float>(z(a, c))) << "row " << a;
  };
  round_trip(0.0);
  round_trip(0.0f);
  round_trip(std::int32_t{0});
  round_trip(std::int64_t{0});
  round_trip(bf16{});
}

TEST(AllToAll, ExpertIdOutOfRangeIsAnInputError) {
  auto w = world();
  comm::ExpertParallel layout(*w, 5);
  kmoe::test::Idx topk("topk", 2, 2);
  topk(1, 1) = 5;
  try {
    comm::DispatchHandle h(layout, topk);
    FAIL() << "accepted expert 5 of 5";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("topk_idx[1][1] = 5 is outside [0, 5)"), std::string::npos) << e.what();
  }
  w->barrier();  // the check happens before any communication: every rank is still in step
}

TEST(ExpertParallel, ImpossibleLayoutFailsOnEveryRankWithoutHanging) {
  auto w = world();
  const int n = w->size();
  // ep > E
  EXPECT_THROW(comm::ExpertParallel(*w, n > 1 ? n - 1 : 1, n > 1 ? n : 2), UsageError);
  // world not a multiple of ep
  EXPECT_THROW(comm::ExpertParallel(*w, 8, n + 1), UsageError);
  w->barrier();
}

TEST(ExpertParallel, GroupsAreReplicasTimesEp) {
  auto w = world();
  const int n = w->size();
  for (int ep = 1; ep <= n; ++ep) {
    if (n % ep) continue;
    comm::ExpertParallel layout(*w, 8, ep);
    EXPECT_EQ(layout.ep_group().size(), ep);
    EXPECT_EQ(layout.replica_group().size(), n / ep);
    EXPECT_EQ(layout.ep_rank(), w->rank() % ep);
    EXPECT_EQ(layout.replica(), w->rank() / ep);
    // Ranks of one replica group own the same experts: the sum of their expert ranges' begins is replicas * begin.
    std::int64_t begin = layout.local_experts().begin;
    layout.replica_group().allreduce_sum(&begin, 1, comm::DataType::i64);
    EXPECT_EQ(begin, layout.replica_group().size() * layout.local_experts().begin);
  }
}

TEST(GradientSet, ClipScalesToTheMaxNorm) {
  auto w = world();
  comm::ExpertParallel layout(*w, 4);
  comm::GradientSet grads(layout);
  kmoe::test::Vec rep("rep", 3);
  kmoe::test::Vec exp("exp", layout.local_experts().count);
  for (int i = 0; i < 3; ++i) rep(i) = 1.0 / w->size();  // sums to 1 over the world
  for (std::size_t j = 0; j < exp.extent(0); ++j) exp(j) = 2.0 / layout.replica_group().size();
  grads.add("rep", rep, comm::GradKind::replicated);
  grads.add("exp", exp, comm::GradKind::expert);
  grads.reduce();
  const double norm = std::sqrt(3.0 + 4 * 4.0);
  EXPECT_NEAR(grads.global_norm(), norm, 1e-12);
  EXPECT_NEAR(grads.clip(1.0), norm, 1e-12);
  EXPECT_NEAR(grads.global_norm(), 1.0, 1e-6);
}

TEST(Gather, RowsOfEveryRankInRankOrderOnRoot) {
  auto w = world();
  const int n = w->size(), me = w->rank();
  for (int root = 0; root < n; ++root) {
    // Rank r has r rows (rank 0 none), row i of rank r holds (r, i, c).
    Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Kokkos::HostSpace> mine("mine", me, 3);
    for (int i = 0; i < me; ++i)
      for (int c = 0; c < 3; ++c) mine(i, c) = 100 * me + 10 * i + c;
    const auto all = comm::gather_rows(*w, mine, root);
    if (me != root) {
      EXPECT_EQ(all.extent(0), 0u);
      continue;
    }
    ASSERT_EQ(all.extent(0), static_cast<std::size_t>(n * (n - 1) / 2));
    std::size_t row = 0;
    for (int r = 0; r < n; ++r)
      for (int i = 0; i < r; ++i, ++row)
        for (int c = 0; c < 3; ++c) EXPECT_EQ(all(row, c), 100 * r + 10 * i + c);
  }
}

}  // namespace
