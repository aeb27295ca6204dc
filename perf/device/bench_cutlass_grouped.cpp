// Every expert GEMM of the MoE block on the peer-table shapes, three engines side by side in one process: the CUTLASS
// grouped engine (one launch per op, sizes on the device), the cuBLAS engine (cublasGemmEx per expert, exactly the
// code moe_block runs: detail::grouped_gemm_cublas) and kmoe's own grouped kernel. Plain main: a table on stdout,
// then one JSON line per (shape, op, engine).
//
//   bench_cutlass_grouped [--shapes mixtral-T8192,mixtral-T2048,finegrained-T8192] [--engines cutlass,cublas,kernel]
//                         [--warmup 3] [--reps 10]
//
// Timing: CUDA events around each call (host enqueue included: a launch-bound engine shows it), median of --reps
// after --warmup. Routing: each of the T·k rows picks an expert uniformly at random (fixed seed), so experts are
// uneven like real routing. Inputs random on the device (never zeros). TFLOP/s = 2·rows·N·K (or 2·M·N·rows) / time.
#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/cutlass_grouped.hpp>
#include <kmoe/core/cuda/kernels.hpp>

#include "bench_util.hpp"

#include "common.cuh"  // detail::grouped_gemm_cublas: the cuBLAS engine itself (src/cuda, on this target's path)

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kmoe::core::cuda;

struct Shape {
  const char* id;
  std::int64_t tokens;
  int hidden, ffn, experts, k;
};
const Shape kShapes[] = {
    {"mixtral-T8192", 8192, 4096, 14336, 8, 2},
    {"mixtral-T2048", 2048, 4096, 14336, 8, 2},
    {"finegrained-T8192", 8192, 2048, 768, 64, 8},
};


}  // namespace

int main(int argc, char** argv) {
  std::string shapes = "mixtral-T8192,mixtral-T2048,finegrained-T8192", engines_s = "cutlass,cublas,kernel";
  int warmup = 3, reps = 10;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "bench_cutlass_grouped: %s needs a value\n", a.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--shapes") shapes = v;
    else if (a == "--engines") engines_s = v;
    else if (a == "--warmup") warmup = std::atoi(v.c_str());
    else if (a == "--reps") reps = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "bench_cutlass_grouped: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (device_count() == 0) {
    std::fprintf(stderr, "bench_cutlass_grouped: no CUDA device\n");
    return 1;
  }
  const std::vector<std::string> engines = kmoe::perf::split_commas(engines_s);
  if (std::find(engines.begin(), engines.end(), "cutlass") != engines.end() && !cutlass_grouped_available()) {
    std::fprintf(stderr, "bench_cutlass_grouped: the CUTLASS engine is not available (build or device)\n");
    return 1;
  }
  std::printf("device %s; warmup %d, reps %d; ms = median per call (CUDA events, host enqueue included)\n",
              device_description().c_str(), warmup, reps);
  std::printf("%-18s %-22s %8s", "shape", "op", "GFLOP");
  for (const auto& e : engines) std::printf(" %16s", (e + " ms (TF/s)").c_str());
  std::printf("\n");
  std::vector<std::string> json;
  for (const std::string& id : kmoe::perf::split_commas(shapes)) {
    const Shape* s = nullptr;
    for (const Shape& c : kShapes)
      if (id == c.id) s = &c;
    if (!s) {
      std::fprintf(stderr, "bench_cutlass_grouped: unknown shape %s\n", id.c_str());
      return 2;
    }
    const std::int64_t E = s->experts, H = s->hidden, F = s->ffn, R = s->tokens * s->k;
    // Uneven experts: each row picks one at random.
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> pick(0, int(E) - 1);
    std::vector<std::int64_t> off(E + 1, 0), tiles(E + 1, 0);
    for (std::int64_t r = 0; r < R; ++r) ++off[pick(rng) + 1];
    for (int e = 0; e < E; ++e) {
      tiles[e + 1] = tiles[e] + (off[e + 1] + kGemmTileRows - 1) / kGemmTileRows;
      off[e + 1] += off[e];
    }
    kmoe::perf::DeviceArena pool;
    auto* d_off = pool.alloc<std::int64_t>(E + 1);
    auto* d_tiles = pool.alloc<std::int64_t>(E + 1);
    KMOE_CUDA_CHECK(cudaMemcpy(d_off, off.data(), sizeof(std::int64_t) * (E + 1), cudaMemcpyHostToDevice));
    KMOE_CUDA_CHECK(cudaMemcpy(d_tiles, tiles.data(), sizeof(std::int64_t) * (E + 1), cudaMemcpyHostToDevice));
    const float ws = 1.f / std::sqrt(float(H));
    bf16_t* xg = pool.random_bf16(R * H, 1.f, 1);
    bf16_t* w1 = pool.random_bf16(E * F * H, ws, 2);
    bf16_t* w3 = pool.random_bf16(E * F * H, ws, 3);
    bf16_t* w2 = pool.random_bf16(E * H * F, 1.f / std::sqrt(float(F)), 4);
    bf16_t* act = pool.random_bf16(R * F, 1.f, 5);
    bf16_t* dh13 = pool.random_bf16(R * 2 * F, 1.f, 6);
    bf16_t* d_out = pool.random_bf16(R * H, 1.f, 7);
    bf16_t* c_rows = pool.alloc<bf16_t>(R * std::max(2 * F, H));
    float* dw_a = pool.alloc<float>(E * F * H);
    float* dw_b = pool.alloc<float>(E * F * H);
    void* work = pool.alloc<unsigned char>(std::int64_t(cutlass_grouped_workspace_bytes(int(E))));

    GroupedGemmArgs base;
    base.groups = int(E);
    base.rows = R;
    base.offsets = d_off;
    base.tile_offsets = d_tiles;
    GroupedGemmArgs up = base, down = base, dact = base, dx = base;
    up.n = 2 * F, up.k = H, up.a = xg, up.lda = H, up.b_trans = true, up.b0 = w1, up.b1 = w3, up.b_split = F;
    up.c_bf16 = c_rows, up.ldc = 2 * F;
    down.n = H, down.k = F, down.a = act, down.lda = F, down.b_trans = true, down.b0 = w2, down.c_bf16 = c_rows;
    down.ldc = H;
    dact.n = F, dact.k = H, dact.a = d_out, dact.lda = H, dact.b_trans = false, dact.b0 = w2, dact.c_bf16 = c_rows;
    dact.ldc = F;
    dx.n = H, dx.k = 2 * F, dx.a = dh13, dx.lda = 2 * F, dx.b_trans = false, dx.b0 = w1, dx.b1 = w3, dx.b_split = F;
    dx.c_bf16 = c_rows, dx.ldc = H;
    GroupedGemmTNArgs w13, w2g;
    w13.groups = w2g.groups = int(E);
    w13.rows = w2g.rows = R;
    w13.offsets = w2g.offsets = d_off;
    w13.m = 2 * F, w13.n = H, w13.a = dh13, w13.lda = 2 * F, w13.b = xg, w13.ldb = H, w13.c0 = dw_a, w13.c1 = dw_b;
    w13.c_split = F;
    w2g.m = H, w2g.n = F, w2g.a = d_out, w2g.lda = H, w2g.b = act, w2g.ldb = F, w2g.c0 = dw_a;

    struct Op {
      const char* name;
      double flops;
      const GroupedGemmArgs* g;
      const GroupedGemmTNArgs* t;
    };
    const double f = 2.0 * R * H * F;
    const Op ops[] = {{"up xg·[W1;W3]T", 2 * f, &up, nullptr},   {"down act·W2T", f, &down, nullptr},
                      {"d_act d_out·W2", f, &dact, nullptr},     {"dx dh13·[W1;W3]", 2 * f, &dx, nullptr},
                      {"dW13 dh13T·xg", 2 * f, nullptr, &w13}, {"dW2 d_outT·act", f, nullptr, &w2g}};
    for (const Op& op : ops) {
      std::printf("%-18s %-22s %8.1f", s->id, op.name, op.flops / 1e9);
      for (const std::string& e : engines) {
        std::function<void()> call;
        if (e == "cutlass")
          call = op.g ? std::function<void()>([&] { grouped_gemm_cutlass(*op.g, work, nullptr); })
                      : std::function<void()>([&] { grouped_gemm_tn_cutlass(*op.t, work, nullptr); });
        else if (e == "cublas")
          call = op.g ? std::function<void()>([&] { detail::grouped_gemm_cublas(*op.g, off, nullptr); })
                      : std::function<void()>([&] { detail::grouped_gemm_tn_cublas(*op.t, off, nullptr); });
        else if (e == "kernel")
          call = op.g ? std::function<void()>([&] { grouped_gemm(*op.g, nullptr); })
                      : std::function<void()>([&] { grouped_gemm_tn(*op.t, nullptr); });
        else {
          std::fprintf(stderr, "bench_cutlass_grouped: unknown engine %s\n", e.c_str());
          return 2;
        }
        const double ms = kmoe::perf::median_event_ms(call, warmup, reps);
        const double tf = op.flops / (ms * 1e-3) / 1e12;
        std::printf(" %8.3f (%5.0f)", ms, tf);
        char buf[512];
        std::snprintf(buf, sizeof buf,
                      "{\"shape\": \"%s\", \"op\": \"%s\", \"engine\": \"%s\", \"ms_median\": %.6g, \"tflops\": %.6g, "
                      "\"flops\": %.6g, \"reps\": %d}",
                      s->id, op.name, e.c_str(), ms, tf, op.flops, reps);
        json.push_back(buf);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  for (const auto& j : json) std::printf("%s\n", j.c_str());
  return 0;
}
