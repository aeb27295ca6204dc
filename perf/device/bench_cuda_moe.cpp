// GPU benchmark of kmoe's grouped GEMM kernel (bf16 storage, fp32 accumulation) on MoE-shaped problems against cuBLAS
// (per-expert cublasGemmEx, and one dense GEMM of the same rows = the ceiling). The whole block is timed by
// moe_peer_bench (beside the peers, same schema).
// Timing: CUDA events around the region after warm-up (manual time); random data (never zeros).
// Counters: TFLOP/s of the up-projection (2·P·H·2F).
#include <benchmark/benchmark.h>

#include <kmoe/config.hpp>
#include <kmoe/core/bf16.hpp>
#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/kernels.hpp>

#include <cstdio>
#include <vector>

namespace {

using namespace kmoe::core::cuda;

struct Shape {
  const char* name;
  std::int64_t tokens;
  int hidden, ffn, experts, k;
};

// Mixtral-8x7B-like and fine-grained (DeepSeek/Qwen-MoE-like) layers; tokens = one training micro-batch.
// The last three are the peer-table shapes (peers.py times transformers on the same ones).
const Shape kShapes[] = {
    {"mixtral_T4096", 4096, 4096, 14336, 8, 2},
    {"finegrained_T8192", 8192, 2048, 1536, 64, 8},
    {"small_T2048", 2048, 1024, 512, 16, 2},
    {"mixtral_T8192", 8192, 4096, 14336, 8, 2},
    {"mixtral_T2048", 2048, 4096, 14336, 8, 2},
    {"finegrained_F768_T8192", 8192, 2048, 768, 64, 8},
};

void* dalloc(std::size_t bytes) {
  void* p = nullptr;
  KMOE_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

/// n random bf16 values of standard deviation `scale`, made on the device.
bf16_t* random_bf16(std::int64_t n, float scale, unsigned seed) {
  auto* p = static_cast<bf16_t*>(dalloc(n * sizeof(bf16_t)));
  fill_random_bf16(p, n, scale, seed, nullptr);
  return p;
}

template <class F>
double time_ms(F&& f, int reps) {
  cudaEvent_t a, b;
  KMOE_CUDA_CHECK(cudaEventCreate(&a));
  KMOE_CUDA_CHECK(cudaEventCreate(&b));
  KMOE_CUDA_CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) f();
  KMOE_CUDA_CHECK(cudaEventRecord(b));
  KMOE_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  KMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / reps;
}

/// The up-projection alone (rows · [W1;W3]ᵀ, N = 2F) with balanced experts: kmoe's grouped kernel (offsets on the
/// device) vs cuBLAS per expert (offsets on the host) vs one dense cuBLAS GEMM over all rows (the ceiling).
void BM_UpProjection(benchmark::State& state, Shape s, int engine) {
  const std::int64_t P = s.tokens * s.k, H = s.hidden, F = s.ffn, E = s.experts, N = 2 * F;
  bf16_t* a = random_bf16(P * H, 1.f, 11);
  bf16_t* w13 = random_bf16(E * N * H, 1.f / std::sqrt(float(H)), 12);  // [E,2F,H]
  auto* c = static_cast<bf16_t*>(dalloc(P * N * sizeof(bf16_t)));
  std::vector<std::int64_t> off(E + 1), tiles(E + 1);
  for (std::int64_t e = 0; e <= E; ++e) off[e] = P * e / E;
  for (std::int64_t e = 0; e < E; ++e)
    tiles[e + 1] = tiles[e] + (off[e + 1] - off[e] + kGemmTileRows - 1) / kGemmTileRows;
  auto* d_off = static_cast<std::int64_t*>(dalloc((E + 1) * 8));
  auto* d_tiles = static_cast<std::int64_t*>(dalloc((E + 1) * 8));
  KMOE_CUDA_CHECK(cudaMemcpy(d_off, off.data(), (E + 1) * 8, cudaMemcpyHostToDevice));
  KMOE_CUDA_CHECK(cudaMemcpy(d_tiles, tiles.data(), (E + 1) * 8, cudaMemcpyHostToDevice));
  cublasHandle_t h;
  KMOE_CUBLAS_CHECK(cublasCreate(&h));
  const float one = 1.f, zero = 0.f;
  // cuBLAS is column-major: C [rows,N] row-major = Cᵀ [N,rows] col-major = W (N x H, col-major view of [N,H]
  // row-major is H x N, so op T) · Aᵀ.
  auto cublas_rows = [&](const bf16_t* wptr, const bf16_t* aptr, bf16_t* cptr, int rows) {
    KMOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(N), rows, int(H), &one, wptr, CUDA_R_16BF, int(H),
                                   aptr, CUDA_R_16BF, int(H), &zero, cptr, CUDA_R_16BF, int(N), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  };
  auto step = [&] {
    if (engine == 0) {
      GroupedGemmArgs g;
      g.groups = int(E);
      g.rows = P;
      g.n = N;
      g.k = H;
      g.offsets = d_off;
      g.tile_offsets = d_tiles;
      g.a = a;
      g.lda = H;
      g.b_trans = true;
      g.b0 = w13;
      g.c_bf16 = c;
      g.ldc = N;
      grouped_gemm(g, nullptr);
    } else if (engine == 1) {
      for (std::int64_t e = 0; e < E; ++e)
        cublas_rows(w13 + e * N * H, a + off[e] * H, c + off[e] * N, int(off[e + 1] - off[e]));
    } else {
      cublas_rows(w13, a, c, int(P));
    }
  };
  step();
  KMOE_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto _ : state) state.SetIterationTime(time_ms(step, 5) / 1e3);
  state.counters["TFLOP/s"] =
      benchmark::Counter(2.0 * P * N * H / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  cublasDestroy(h);
  for (void* p : {(void*)a, (void*)w13, (void*)c, (void*)d_off, (void*)d_tiles}) cudaFree(p);
}

void register_all() {
  for (const Shape& s : kShapes) {
    const char* engines[] = {"kmoe_grouped", "cublas_per_expert", "cublas_dense_same_rows"};
    for (int e = 0; e < 3; ++e)
      benchmark::RegisterBenchmark(("up_proj/" + std::string(s.name) + "/" + engines[e]).c_str(), BM_UpProjection, s,
                                   e)
          ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (device_count() == 0) {
    std::printf("bench_cuda_moe: no CUDA device present, nothing to measure\n");
    return 0;
  }
  std::printf("device: %s\n", device_description().c_str());
  benchmark::Initialize(&argc, argv);
  register_all();
  benchmark::AddCustomContext("kmoe_version", KMOE_VERSION_STRING);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
