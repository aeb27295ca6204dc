// The bandwidth goal: kmoe's row-movement kernels (gather, combine, ⟨dy, out⟩) against a device-to-device
// copy of the same bytes measured in the same benchmark (the goal: >= 90% of the copy rate).
// Bytes = what the kernel must read + write once (index/weight arrays included); the copy moves the same total
// (half read, half written). CUDA events, median of the iterations; random data; the row order is a random
// permutation as a router produces (each token's k slots land in k different places).
// Counters: GB/s of the kernel, copy_GB/s of the copy of the same bytes, of_copy = their ratio.
#include <benchmark/benchmark.h>

#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/kernels.hpp>

#include "bench_util.hpp"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kmoe::core::cuda;

struct Shape {
  const char* name;
  std::int64_t tokens;
  int hidden, k;
};
// the peer-table shapes (rows of H values; the expert ffn does not enter these kernels)
const Shape kShapes[] = {
    {"mixtral_T8192", 8192, 4096, 2},
    {"mixtral_T2048", 2048, 4096, 2},
    {"finegrained_T8192", 8192, 2048, 8},
};

/// A random permutation of the P = T·k pairs: row r of the expert-ordered buffer holds pair perm[r].
std::vector<std::int64_t> random_perm(std::int64_t n, unsigned seed) {
  std::vector<std::int64_t> p(n);
  std::iota(p.begin(), p.end(), 0);
  std::shuffle(p.begin(), p.end(), std::mt19937_64(seed));
  return p;
}

enum class Op { Gather, GatherWeighted, CombineBf16, CombineF32, PairDot };

void BM_Rows(benchmark::State& state, Shape s, Op op) {
  kmoe::perf::DeviceArena dev;
  const std::int64_t T = s.tokens, H = s.hidden, k = s.k, P = T * k;
  const auto perm = random_perm(P, 7);  // sorted row -> pair
  std::vector<std::int64_t> inv(P);     // pair -> sorted row
  for (std::int64_t r = 0; r < P; ++r) inv[perm[r]] = r;
  const std::int64_t* d_perm = dev.upload(perm);
  const std::int64_t* d_inv = dev.upload(inv);
  std::vector<float> w(P);
  std::mt19937 rng(3);
  for (auto& v : w) v = std::uniform_real_distribution<float>(0.1f, 1.f)(rng);
  const float* d_w = dev.upload(w);
  const bf16_t* x = dev.random_bf16(T * H, 1.f, 1);   // token rows
  const bf16_t* rows = dev.random_bf16(P * H, 1.f, 2);  // expert rows
  auto* rows_out = static_cast<bf16_t*>(dev.alloc(std::size_t(P * H) * 2));
  auto* tok_bf16 = static_cast<bf16_t*>(dev.alloc(std::size_t(T * H) * 2));
  auto* tok_f32 = static_cast<float*>(dev.alloc(std::size_t(T * H) * 4));
  auto* d_pair = static_cast<float*>(dev.alloc(std::size_t(P) * 4));
  double bytes = 0;
  std::function<void()> run;
  const double bf = 2.0;
  switch (op) {
    case Op::Gather:  // x -> expert order (each token row read k times: P rows read, P written)
      bytes = 2.0 * P * H * bf + P * 8.0;
      run = [&] { gather_rows(x, H, d_perm, int(k), nullptr, rows_out, P, nullptr); };
      break;
    case Op::GatherWeighted:  // the backward's w·dy in expert order
      bytes = 2.0 * P * H * bf + P * 12.0;
      run = [&] { gather_rows(x, H, d_perm, int(k), d_w, rows_out, P, nullptr); };
      break;
    case Op::CombineBf16:  // y = Σ_s w_s rows[row(t,s)]
      bytes = (P + T) * H * bf + P * 12.0;
      run = [&] { combine_rows(rows, H, d_inv, d_w, T, int(k), tok_bf16, nullptr, false, nullptr); };
      break;
    case Op::CombineF32:  // dx = Σ_s rows[row(t,s)] (fp32 out)
      bytes = P * H * bf + T * H * 4.0 + P * 8.0;
      run = [&] { combine_rows(rows, H, d_inv, nullptr, T, int(k), nullptr, tok_f32, false, nullptr); };
      break;
    case Op::PairDot:  // d w = <dy[t], rows[row(t,s)]> (dy read once per token if the k slots hit the cache)
      bytes = (P + T) * H * bf + P * 12.0;
      run = [&] { pair_dot(x, rows, H, d_inv, T, int(k), d_pair, nullptr); };
      break;
  }
  // The copy of the same bytes: half read, half written.
  const std::size_t copy_bytes = std::size_t(bytes / 2) / 16 * 16;
  void* c_src = dev.alloc(copy_bytes);
  void* c_dst = dev.alloc(copy_bytes);
  KMOE_CUDA_CHECK(cudaMemset(c_src, 1, copy_bytes));
  const double copy_ms =
      kmoe::perf::median_event_ms([&] { KMOE_CUDA_CHECK(cudaMemcpyAsync(c_dst, c_src, copy_bytes, cudaMemcpyDeviceToDevice)); }, 1, 21);
  double kernel_ms = 0;
  for (auto _ : state) {
    kernel_ms = kmoe::perf::median_event_ms(run, 1, 21);
    state.SetIterationTime(kernel_ms / 1e3);
  }
  const double gbs = bytes / (kernel_ms * 1e-3) / 1e9, copy_gbs = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  state.counters["GB/s"] = gbs;
  state.counters["copy_GB/s"] = copy_gbs;
  state.counters["of_copy"] = gbs / copy_gbs;
  state.counters["MB"] = bytes / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  if (device_count() == 0) {
    std::printf("bench_cuda_rows: no CUDA device present, nothing to measure\n");
    return 0;
  }
  std::printf("device: %s\n", device_description().c_str());
  benchmark::Initialize(&argc, argv);
  const std::pair<Op, const char*> ops[] = {{Op::Gather, "gather"},
                                            {Op::GatherWeighted, "gather_weighted"},
                                            {Op::CombineBf16, "combine_bf16"},
                                            {Op::CombineF32, "combine_f32"},
                                            {Op::PairDot, "pair_dot"}};
  for (const Shape& s : kShapes)
    for (const auto& [op, name] : ops)
      benchmark::RegisterBenchmark(("rows/" + std::string(name) + "/" + s.name).c_str(), BM_Rows, s, op)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond)
          ->Iterations(3);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
