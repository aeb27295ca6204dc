// CPU expert MLP forward+backward (fp32) against the roofline of the same BLAS: a dense sgemm loop of the same FLOPs.
//
//   BM_ExpertMlp/scatter : ScatterMoE-style path (rows read through the plan in staged tiles), fwd + bwd incl. combine
//   BM_ExpertMlp/padded  : MegaBlocks-style path (padded gather, grouped GEMMs, padded scatter), fwd + bwd
//   BM_DenseSgemm        : 9 sgemms [T*k, H] x [H, F] = the expert MLP's 18·(T*k)·F·H FLOPs as if one dense expert
// Args: T, H, F, E, k. Routing is a fixed random top-k (softmax of N(0,1) logits), so experts get uneven rows.
// Manual timing between fences; counters: FLOP/s (rate), rows. Results and the ratio: perf/RESULTS.md.
#include <benchmark/benchmark.h>

#include <kmoe/core/dispatch_plan.hpp>
#include <kmoe/core/expert_mlp.hpp>
#include <kmoe/core/gather_scatter.hpp>
#include <kmoe/core/grouped_gemm.hpp>
#include <kmoe/core/openmp_env.hpp>
#include <kmoe/core/routing.hpp>

#include <Kokkos_Core.hpp>
#include <chrono>
#include <cstdlib>
#include <unistd.h>
#include <random>
#include <string>

namespace {

using Space = Kokkos::DefaultExecutionSpace;
using M = Kokkos::View<float**, Kokkos::LayoutRight, Space::memory_space>;
using M3 = Kokkos::View<float***, Kokkos::LayoutRight, Space::memory_space>;
using I = Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Space::memory_space>;

template <class V>
void fill(const V& v, std::uint64_t seed, float scale) {
  auto h = Kokkos::create_mirror_view(v);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.f, scale);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = d(rng);
  Kokkos::deep_copy(v, h);
}

struct Problem {
  std::int64_t T, H, F, E, k;
  M x, dy, w, dw, y, dx;
  M3 w1, w3, w2, dw1, dw3, dw2;
  I idx;
  kmoe::core::DispatchPlan<Space::memory_space> plan;
  explicit Problem(const benchmark::State& s, std::int64_t block)
      : T(s.range(0)), H(s.range(1)), F(s.range(2)), E(s.range(3)), k(s.range(4)) {
    x = M("x", T, H);
    dy = M("dy", T, H);
    y = M("y", T, H);
    dx = M("dx", T, H);
    w = M("w", T, k);
    dw = M("dw", T, k);
    w1 = M3("w1", E, F, H);
    w3 = M3("w3", E, F, H);
    w2 = M3("w2", E, H, F);
    dw1 = M3("dw1", E, F, H);
    dw3 = M3("dw3", E, F, H);
    dw2 = M3("dw2", E, H, F);
    idx = I("idx", T, k);
    fill(x, 1, 1.f);
    fill(dy, 2, 1.f);
    fill(w1, 3, 0.03f);
    fill(w3, 4, 0.03f);
    fill(w2, 5, 0.03f);
    M gate("gate", E, H), logits("logits", T, E), probs("probs", T, E);
    fill(gate, 6, 0.03f);
    kmoe::core::routing_forward(Space(), x, gate, logits, probs, idx, w);
    plan = kmoe::core::make_dispatch_plan(Space(), idx, E, block);
  }
  double flops() const { return 18.0 * double(T * k) * double(F) * double(H); }
};

void set_counters(benchmark::State& state, double flops, std::int64_t rows) {
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["rows"] = double(rows);
}

template <class F>
void timed_loop(benchmark::State& state, F&& body) {
  for (auto _ : state) {
    Space().fence();
    const auto t0 = std::chrono::steady_clock::now();
    body();
    Space().fence();
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
}

void BM_ExpertMlpScatter(benchmark::State& state) {
  Problem p(state, 1);
  const std::int64_t rows = p.plan.num_rows();
  M h1("h1", rows, p.F), h3("h3", rows, p.F), ye("ye", rows, p.H);
  const Space space;
  timed_loop(state, [&] {
    kmoe::core::scatter_mlp_forward(space, p.x, p.plan, p.w1, p.w3, p.w2, h1, h3, ye);
    kmoe::core::padded_scatter(space, ye, p.plan.pair_row, p.w, p.y);
    Kokkos::deep_copy(space, p.dx, 0.f);
    kmoe::core::scatter_mlp_backward(space, p.x, p.plan, p.w, p.dy, p.w1, p.w3, p.w2, h1, h3, ye, p.dx, p.dw1, p.dw3,
                                     p.dw2, p.dw);
  });
  set_counters(state, p.flops(), rows);
}

void BM_ExpertMlpPadded(benchmark::State& state) {
  Problem p(state, 64);
  const std::int64_t rows = p.plan.num_padded_rows();
  M xe("xe", rows, p.H), h1("h1", rows, p.F), h3("h3", rows, p.F), ye("ye", rows, p.H), dye("dye", rows, p.H),
      dxe("dxe", rows, p.H);
  const Space space;
  timed_loop(state, [&] {
    kmoe::core::padded_gather(space, p.x, p.plan.pair_padded_row, p.k, xe);
    kmoe::core::grouped_mlp_forward(space, xe, p.plan.padded_offsets_host, p.w1, p.w3, p.w2, h1, h3, ye);
    kmoe::core::padded_scatter(space, ye, p.plan.pair_padded_row, p.w, p.y);
    kmoe::core::padded_scatter_backward(space, p.dy, ye, p.plan.pair_padded_row, p.w, dye, p.dw);
    kmoe::core::grouped_mlp_backward(space, xe, p.plan.padded_offsets_host, p.w1, p.w3, p.w2, h1, h3, dye, dxe, p.dw1,
                                     p.dw3, p.dw2);
    kmoe::core::padded_gather_backward(space, dxe, p.plan.pair_padded_row, p.k, p.dx);
  });
  set_counters(state, p.flops(), rows);
}

void BM_DenseSgemm(benchmark::State& state) {
  const std::int64_t T = state.range(0), H = state.range(1), F = state.range(2), k = state.range(4), rows = T * k;
  M a("a", rows, H), b("b", F, H), c("c", rows, F);
  fill(a, 1, 1.f);
  fill(b, 2, 0.03f);
  const Space space;
  timed_loop(state, [&] {
    for (int i = 0; i < 9; ++i) kmoe::core::gemm(space, 'N', 'T', 1.f, a, b, 0.f, c);
  });
  set_counters(state, 18.0 * double(rows) * double(F) * double(H), rows);
}

// One grouped up-projection x·W1ᵀ over the plan's expert rows: BLAS (KokkosBlas::gemm per expert) vs the portable kernel.
void BM_GroupedGemm(benchmark::State& state) {
  Problem p(state, 1);
  const auto algo = state.range(5) == 0 ? kmoe::core::GemmAlgo::Blas : kmoe::core::GemmAlgo::Kokkos;
  const std::int64_t rows = p.plan.num_rows();
  M xe("xe", rows, p.H), h1("h1", rows, p.F);
  const Space space;
  kmoe::core::padded_gather(space, p.x, p.plan.pair_row, p.k, xe);
  timed_loop(state, [&] { kmoe::core::grouped_gemm(space, 'T', 1.f, xe, p.w1, p.plan.offsets_host, 0.f, h1, algo); });
  state.counters["FLOP/s"] =
      benchmark::Counter(2.0 * double(rows) * double(p.F) * double(p.H), benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(algo == kmoe::core::GemmAlgo::Blas ? "blas" : "kokkos");
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "H", "F", "E", "k"});
  b->Args({2048, 1024, 2816, 8, 2});  // the target shape
  b->Args({512, 512, 1408, 8, 2});    // a quick one
  b->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(2.0);
}

BENCHMARK(BM_DenseSgemm)->Apply(shapes);
BENCHMARK(BM_ExpertMlpScatter)->Apply(shapes);
BENCHMARK(BM_ExpertMlpPadded)->Apply(shapes);
BENCHMARK(BM_GroupedGemm)
    ->ArgNames({"T", "H", "F", "E", "k", "algo"})
    ->Args({512, 512, 1408, 8, 2, 0})
    ->Args({512, 512, 1408, 8, 2, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  // Idle OpenMP threads must sleep, not spin: the BLAS runs its own threads between Kokkos kernels (docs/kernels.md).
  kmoe::core::reexec_with_passive_openmp_wait(argv);
  Kokkos::ScopeGuard kokkos(argc, argv);
  benchmark::Initialize(&argc, argv);
  benchmark::AddCustomContext("kokkos_exec_space", Space::name());
  benchmark::AddCustomContext("kokkos_concurrency", std::to_string(Space().concurrency()));
  benchmark::AddCustomContext("gemm", "KokkosBlas::gemm -> BLAS TPL (OpenBLAS)");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
