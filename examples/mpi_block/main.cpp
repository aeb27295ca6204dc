// mpi_block: one MoE block under expert parallelism, as a user's training step would run it.
//   mpirun -np N mpi_block [EP]      (EP divides N; default N)
// Every rank holds the router and its slice of the experts, processes its share of a batch of tokens (split
// contiguously), exchanges rows with the all-to-all, reduces gradients and clips them by the global norm. Rank 0 then
// checks the result against the single-process layer on the whole batch and exits non-zero on a mismatch.
#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/mpi_communicator.hpp>

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace {

using Exec = Kokkos::DefaultHostExecutionSpace;  // CPU ranks: MPI moves host memory
using Weights = kmoe::moe::MoeWeights<double, Exec>;
using Matrix = Weights::views::matrix;

template <class V>
void randomize(const V& v, std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> n(0.0, scale);
  auto h = Kokkos::create_mirror_view(v);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = n(rng);
  Kokkos::deep_copy(v, h);
}

/// The same weights on every rank (same seed): 6 experts, hidden 32, ffn 24, a shared expert of 16.
Weights make_weights() {
  const std::int64_t E = 6, H = 32, F = 24, S = 16;
  std::mt19937_64 rng(2026);
  Weights w;
  w.router = Matrix("router", E, H);
  w.w1 = Weights::views::tensor3("w1", E, F, H);
  w.w3 = Weights::views::tensor3("w3", E, F, H);
  w.w2 = Weights::views::tensor3("w2", E, H, F);
  w.shared_w1 = Matrix("shared_w1", S, H);
  w.shared_w3 = Matrix("shared_w3", S, H);
  w.shared_w2 = Matrix("shared_w2", H, S);
  randomize(w.router, rng, 1.0);
  for (auto* v : {&w.w1, &w.w3, &w.w2}) randomize(*v, rng, 0.1);
  for (auto* v : {&w.shared_w1, &w.shared_w3, &w.shared_w2}) randomize(*v, rng, 0.1);
  return w;
}

int run(kmoe::comm::MpiCommunicator& world, int ep) {
  const Weights full = make_weights();
  kmoe::moe::MoeOptions options;
  options.top_k = 2;

  // The layout: ep ranks per expert-parallel group, world / ep replicas. Throws UsageError (on every rank alike) for
  // an impossible one.
  kmoe::comm::ExpertParallel layout(world, full.num_experts(), ep);
  kmoe::comm::DistributedMoe<double, Exec> block(layout, kmoe::comm::local_slice(full, layout), options);

  // A global batch of 50 tokens; this rank takes its contiguous share.
  const std::int64_t tokens = 50, hidden = full.hidden();
  Matrix x("x", tokens, hidden), dy("dy", tokens, hidden);
  std::mt19937_64 rng(7);
  randomize(x, rng, 1.0);
  randomize(dy, rng, 1.0);
  const auto mine = kmoe::comm::contiguous_split(tokens, world.size(), world.rank());
  const auto rows = Kokkos::make_pair(mine.begin, mine.end());
  Matrix x_local("x_local", mine.count, hidden), dy_local("dy_local", mine.count, hidden);
  Kokkos::deep_copy(x_local, Kokkos::subview(x, rows, Kokkos::ALL));
  Kokkos::deep_copy(dy_local, Kokkos::subview(dy, rows, Kokkos::ALL));

  // The training step: forward, backward, gradients made whole, global norm for clipping.
  const Matrix y = block.forward(x_local);
  const auto back = block.backward(dy_local);
  auto grads = block.gradient_set(back);
  grads.reduce();
  const double norm = grads.global_norm();

  // Check: the single-process layer on the whole batch.
  kmoe::moe::MoeLayer<double, Exec> single(full, options);
  const Matrix y_ref = single.forward(x);
  const auto back_ref = single.backward(dy);
  double worst = 0, scale = 0;
  for (std::int64_t t = 0; t < mine.count; ++t)
    for (std::int64_t c = 0; c < hidden; ++c) {
      worst = std::max(worst, std::abs(y(t, c) - y_ref(mine.begin + t, c)));
      scale = std::max(scale, std::abs(y_ref(mine.begin + t, c)));
    }
  double rel = scale > 0 ? worst / scale : worst;
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &rel, 1, MPI_DOUBLE, MPI_MAX, world.native()));
  double sumsq = 0;
  for (const auto& v : {back_ref.grads.router, back_ref.grads.shared_w1, back_ref.grads.shared_w3,
                        back_ref.grads.shared_w2})
    for (std::size_t i = 0; i < v.span(); ++i) sumsq += v.data()[i] * v.data()[i];
  for (const auto& v : {back_ref.grads.w1, back_ref.grads.w3, back_ref.grads.w2})
    for (std::size_t i = 0; i < v.span(); ++i) sumsq += v.data()[i] * v.data()[i];
  const double norm_ref = std::sqrt(sumsq);
  const bool ok = rel < 1e-12 && std::abs(norm - norm_ref) <= 1e-12 * norm_ref;
  if (world.rank() == 0)
    std::printf("mpi_block: %d ranks = %d replicas x ep %d; max rel. difference of y vs one process %.2e; "
                "global grad norm %.15g (one process %.15g): %s\n",
                world.size(), layout.placement().replicas(), layout.placement().ep(), rel, norm, norm_ref,
                ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 0;
  {
    setenv("OMP_PROC_BIND", "spread", 0);  // what Kokkos' OpenMP backend asks for
    setenv("OMP_PLACES", "threads", 0);
    Kokkos::ScopeGuard kokkos(argc, argv);
    auto world = kmoe::comm::MpiCommunicator::world();
    const int ep = argc > 1 ? std::atoi(argv[1]) : 0;
    // A rank that throws takes the job down with its message (MPI_Abort) rather than leaving the others waiting;
    // with one rank the exception comes back here.
    try {
      code = kmoe::comm::run_or_abort(*world, "mpi_block", [&] { return run(*world, ep); });
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mpi_block: %s\n", e.what());
      code = kmoe::comm::exit_code_for(e);
    }
  }
  MPI_Finalize();
  return code;
}
