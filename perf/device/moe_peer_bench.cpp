// kmoe's half of the peer table: times kmoe's CUDA MoE block (MoeLayer<bf16, Kokkos::Cuda>) (forward + backward w.r.t. x and every weight, router
// included) on the shapes and prints one JSON line per (shape, path) in the schema of perf/device/peers.py, so
// `compare.py peers.jsonl kmoe.jsonl` puts kmoe next to the peers and the dense roofline of the same run.
//
//   moe_peer_bench [--shapes mixtral-T8192,mixtral-T2048,finegrained-T8192] [--paths scatter,padded]
//                  [--engine auto|kernel|cublas|cutlass] [--graph] [--swiglu default|fused|unfused|both]
//                  [--grads f32|bf16] [--warmup 5] [--reps 30] [--seed 0]
//
// Definitions (docs/perf.md, "Peers and the dense roofline"; the same as peers.py):
// - ms: CUDA events around each step after the warm-up steps; median (and min) of --reps steps. Also the medians
//   of the forward and backward halves (an event between them) and of the host time to enqueue the backward.
// - tflops = 18*T*k*H*F / median time (expert GEMM FLOPs only; the router is not counted).
// - extra_mem_bytes = the saved activations + scratch of one step = MoeLayer::workspace_bytes(): kmoe allocates
//   nothing else during a step (the workspace is allocated at the first step and carved per step). What the step returns and keeps
//   (y, dx, the weight gradients) and the weights, x and dy are excluded, as in peers.py. cuBLAS' own handle
//   workspace (allocated once per process at the first cuBLAS call, not per step) is reported apart as
//   cublas_handle_bytes (the device memory that disappeared across the warm-up besides our own allocations).
// Inputs: random (never zeros), made on the device; weights of standard deviation 1/sqrt(fan_in) as in peers.py.
// impl names: kmoe-scatter (ScatterMoE layout) / kmoe-padded (MegaBlocks layout); with --engine kernel|cublas|cutlass
// the impl gains the suffix "-kernel" / "-cublas" / "-cutlass" (no goal row; a variant for the tuning notes).
// --graph (engines kernel and cutlass only: they never wait for the host): one step (forward + backward) is captured
// into a CUDA graph after the warm-up and each timed step replays it (suffix "-graph"); ms_fwd/ms_bwd are then 0
// (one graph, no event between the halves) and host_bwd_enqueue_ms is the host time of cudaGraphLaunch. --swiglu fused|unfused
// sets MoeOptions::fuse_swiglu (default: fused) and adds "-fused" /
// "-unfused"; both runs each (shape, path) unfused then fused, one after the other in the same process.
// With --grads bf16 the expert weight gradients are stored in bf16 (MoeLayer's Bf16ExpertGrads, as the peers' .grad is) and
// the impl gains "-bf16grads". Shape finegrained-T2048 (not in the default list) is a small-expert shape where Auto picks the kernel engine
// (the CUTLASS engine in builds that have it).
// Exit code: 0 when every row is ok, 1 otherwise, 2 bad usage.
#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/kernels.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <Kokkos_Core.hpp>

#include "bench_util.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using namespace kmoe::core::cuda;
/// The block's two layouts (MoeOptions::impl).
enum class MoePath { Scattered, Padded };

struct Shape {
  const char* id;     // peers.py's shape id
  const char* model;  // peers.py's "shape" field
  std::int64_t tokens;
  int hidden, ffn, experts, k;
};

// peers.py MODELS / SHAPES (the peer table).
const Shape kShapes[] = {
    {"mixtral-T8192", "mixtral", 8192, 4096, 14336, 8, 2},
    {"mixtral-T2048", "mixtral", 2048, 4096, 14336, 8, 2},
    {"finegrained-T8192", "finegrained", 8192, 2048, 768, 64, 8},
    {"finegrained-T2048", "finegrained", 2048, 2048, 768, 64, 8},  // 256 rows per expert: Auto picks the kernel (CUTLASS if built)
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "moe_peer_bench: %s\n", why.c_str());
  std::exit(2);
}

std::size_t free_bytes() {
  std::size_t f = 0, t = 0;
  KMOE_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  return f;
}

/// True when every float of the device array is finite.
bool finite_f32(const float* d, std::int64_t n) {
  std::vector<float> h(static_cast<std::size_t>(n));
  KMOE_CUDA_CHECK(cudaMemcpy(h.data(), d, std::size_t(n) * 4, cudaMemcpyDeviceToHost));
  return std::all_of(h.begin(), h.end(), [](float v) { return std::isfinite(v); });
}

bool finite_bf16(const bf16_t* d, std::int64_t n) {
  std::vector<bf16_t> h(static_cast<std::size_t>(n));
  KMOE_CUDA_CHECK(cudaMemcpy(h.data(), d, std::size_t(n) * 2, cudaMemcpyDeviceToHost));
  // bf16 exponent all ones = inf or NaN
  return std::none_of(h.begin(), h.end(), [](bf16_t v) { return (v & 0x7f80) == 0x7f80; });
}

struct Result {
  double ms_median = 0, ms_min = 0;
  double fwd_ms = 0, bwd_ms = 0;  ///< medians of the forward and backward halves (events between them)
  double host_bwd_ms = 0;         ///< median host time to enqueue the backward (no host sync inside it)
  std::size_t workspace = 0, cublas_handle = 0;
  const char* engine = "kernel";  ///< the engine the forward used
  bool finite = false;
  bool swiglu_fused = false;  ///< the routed experts' SwiGLU ran in the GEMM epilogues (kernel engine, fuse on)
};

/// fuse: MoeOptions::fuse_swiglu, or -1 for its default.
Result run_one(const Shape& s, MoePath path, GemmEngine engine, bool graph, int fuse, bool bf16_grads, int warmup,
               int reps, std::uint64_t seed) {
  using Layer = kmoe::moe::MoeLayer<kmoe::bf16, Kokkos::Cuda>;
  using Grad = Layer::grad_matrix;
  using Grad3 = kmoe::moe::MoeViews<float, Kokkos::Cuda>::tensor3;
  const std::int64_t T = s.tokens, H = s.hidden, F = s.ffn, E = s.experts;
  kmoe::perf::DeviceArena dev;
  const std::uint64_t base = seed * 1000 + 17;
  auto b16 = [](bf16_t* p) { return reinterpret_cast<kmoe::bf16*>(p); };
  const Layer::matrix x(b16(dev.random_bf16(T * H, 1.f, base + 1)), T, H);
  const Layer::matrix dy(b16(dev.random_bf16(T * H, 1.f, base + 2)), T, H);
  kmoe::moe::MoeWeights<kmoe::bf16, Kokkos::Cuda> w;
  w.router = Layer::matrix(b16(dev.random_bf16(E * H, 1.f / std::sqrt(float(H)), base + 3)), E, H);
  w.w1 = Layer::views::tensor3(b16(dev.random_bf16(E * F * H, 1.f / std::sqrt(float(H)), base + 4)), E, F, H);
  w.w3 = Layer::views::tensor3(b16(dev.random_bf16(E * F * H, 1.f / std::sqrt(float(H)), base + 5)), E, F, H);
  w.w2 = Layer::views::tensor3(b16(dev.random_bf16(E * H * F, 1.f / std::sqrt(float(F)), base + 6)), E, H, F);
  const Layer::matrix y(b16(static_cast<bf16_t*>(dev.alloc(std::size_t(T * H) * sizeof(bf16_t)))), T, H);
  auto f32 = [&](std::int64_t n) { return static_cast<float*>(dev.alloc(std::size_t(n) * 4)); };
  kmoe::moe::MoeBackward<kmoe::bf16, Kokkos::Cuda> g;
  g.dx = Grad(f32(T * H), T, H);
  g.grads.router = Grad(f32(E * H), E, H);
  Layer::Bf16ExpertGrads g16;
  if (bf16_grads) {
    auto b = [&](std::int64_t n) { return b16(static_cast<bf16_t*>(dev.alloc(std::size_t(n) * 2))); };
    g16.w1 = Layer::views::tensor3(b(E * F * H), E, F, H);
    g16.w3 = Layer::views::tensor3(b(E * F * H), E, F, H);
    g16.w2 = Layer::views::tensor3(b(E * H * F), E, H, F);
  } else {
    g.grads.w1 = Grad3(f32(E * F * H), E, F, H);
    g.grads.w3 = Grad3(f32(E * F * H), E, F, H);
    g.grads.w2 = Grad3(f32(E * H * F), E, H, F);
  }
  kmoe::moe::MoeOptions o;
  o.top_k = s.k;
  o.impl = path == MoePath::Padded ? kmoe::moe::ExpertImpl::Padded : kmoe::moe::ExpertImpl::Scatter;
  o.gemm = engine == GemmEngine::Kernel    ? kmoe::core::GemmAlgo::Kokkos
           : engine == GemmEngine::Cublas  ? kmoe::core::GemmAlgo::Blas
           : engine == GemmEngine::Cutlass ? kmoe::core::GemmAlgo::Cutlass
                                           : kmoe::core::GemmAlgo::Auto;
  if (fuse >= 0) o.fuse_swiglu = fuse == 1;
  // The layer's stream: Kokkos' default instance, or with --graph one of its own (the legacy default stream cannot be
  // captured).
  cudaStream_t own = nullptr;
  if (graph) KMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&own, cudaStreamNonBlocking));
  Layer layer(w, o, graph ? Kokkos::Cuda(own) : Kokkos::Cuda());
  cudaStream_t gs = layer.space().cuda_stream();
  auto forward = [&] { layer.forward(x, y); };
  auto backward = [&] {
    if (bf16_grads) layer.backward(dy, g, g16);
    else layer.backward(dy, g);
  };
  Result r;
  KMOE_CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t free_before = free_bytes();
  for (int i = 0; i < std::max(warmup, 1); ++i) forward(), backward();
  KMOE_CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t free_after = free_bytes();
  r.workspace = layer.workspace_bytes();
  // cuBLAS' handle workspace: what disappeared across the warm-up besides the layer's own workspace.
  const std::size_t gone = free_before > free_after ? free_before - free_after : 0;
  r.cublas_handle = gone > r.workspace ? gone - r.workspace : 0;
  r.engine = layer.gemm_engine();
  r.swiglu_fused = o.fuse_swiglu && std::string(r.engine) == "kernel";
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t captured = nullptr;
    KMOE_CUDA_CHECK(cudaStreamBeginCapture(gs, cudaStreamCaptureModeRelaxed));
    forward(), backward();
    KMOE_CUDA_CHECK(cudaStreamEndCapture(gs, &captured));
    KMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, captured, 0));
    KMOE_CUDA_CHECK(cudaGraphDestroy(captured));
    KMOE_CUDA_CHECK(cudaGraphLaunch(exec, gs));
    KMOE_CUDA_CHECK(cudaStreamSynchronize(gs));
  }
  // Events before, between and after the two halves; the host clock around the backward's enqueue (a backward
  // whose enqueue takes as long as its GPU time is bound by launches, not by the GPU).
  std::vector<cudaEvent_t> ev(3 * std::size_t(reps));
  for (auto& e : ev) KMOE_CUDA_CHECK(cudaEventCreate(&e));
  std::vector<double> host_bwd(reps);
  for (int i = 0; i < reps && exec; ++i) {
    KMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i], gs));
    KMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i + 1], gs));
    const auto h0 = std::chrono::steady_clock::now();
    KMOE_CUDA_CHECK(cudaGraphLaunch(exec, gs));
    host_bwd[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - h0).count();
    KMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i + 2], gs));
  }
  for (int i = 0; i < reps && !exec; ++i) {
    KMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i], gs));
    forward();
    KMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i + 1], gs));
    const auto h0 = std::chrono::steady_clock::now();
    backward();
    host_bwd[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - h0).count();
    KMOE_CUDA_CHECK(cudaEventRecord(ev[3 * i + 2], gs));
  }
  KMOE_CUDA_CHECK(cudaDeviceSynchronize());
  if (exec) KMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  std::vector<double> ms(reps), fwd(reps), bwd(reps);
  for (int i = 0; i < reps; ++i) {
    float v = 0, f = 0, b = 0;
    KMOE_CUDA_CHECK(cudaEventElapsedTime(&v, ev[3 * i], ev[3 * i + 2]));
    KMOE_CUDA_CHECK(cudaEventElapsedTime(&f, ev[3 * i], ev[3 * i + 1]));
    KMOE_CUDA_CHECK(cudaEventElapsedTime(&b, ev[3 * i + 1], ev[3 * i + 2]));
    ms[i] = v, fwd[i] = f, bwd[i] = b;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  r.ms_median = median(ms);
  r.ms_min = *std::min_element(ms.begin(), ms.end());
  r.fwd_ms = median(fwd);
  r.bwd_ms = median(bwd);
  r.host_bwd_ms = median(host_bwd);
  r.finite = finite_bf16(reinterpret_cast<const bf16_t*>(y.data()), T * H) && finite_f32(g.dx.data(), T * H) &&
             finite_f32(g.grads.router.data(), E * H) &&
             (bf16_grads ? finite_bf16(reinterpret_cast<const bf16_t*>(g16.w2.data()), E * H * F)
                         : finite_f32(g.grads.w2.data(), E * H * F));
  if (own) KMOE_CUDA_CHECK(cudaStreamDestroy(own));
  return r;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) o += c;
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  std::string shapes = "mixtral-T8192,mixtral-T2048,finegrained-T8192", paths = "scatter,padded", engine_s = "auto",
              swiglu_s = "default", grads_s = "f32";
  int warmup = 5, reps = 30;
  bool graph = false;
  std::uint64_t seed = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--shapes") shapes = value();
    else if (a == "--paths") paths = value();
    else if (a == "--engine") engine_s = value();
    else if (a == "--graph") graph = true;
    else if (a == "--swiglu") swiglu_s = value();
    else if (a == "--grads") grads_s = value();
    else if (a == "--warmup") warmup = std::atoi(value().c_str());
    else if (a == "--reps") reps = std::atoi(value().c_str());
    else if (a == "--seed") seed = std::strtoull(value().c_str(), nullptr, 10);
    else usage("unknown argument '" + a + "' (see the header of perf/device/moe_peer_bench.cpp)");
  }
  if (reps < 1 || warmup < 0) usage("--reps must be >= 1 and --warmup >= 0");
  GemmEngine engine = GemmEngine::Auto;
  std::string suffix;
  if (engine_s == "kernel") engine = GemmEngine::Kernel, suffix = "-kernel";
  else if (engine_s == "cublas") engine = GemmEngine::Cublas, suffix = "-cublas";
  else if (engine_s == "cutlass") engine = GemmEngine::Cutlass, suffix = "-cutlass";
  else if (engine_s != "auto") usage("--engine must be auto, kernel, cublas or cutlass, not '" + engine_s + "'");
  if (graph && engine != GemmEngine::Kernel && engine != GemmEngine::Cutlass)
    usage("--graph needs --engine kernel or cutlass (the cuBLAS engine waits for the host once per forward)");
  if (graph) suffix += "-graph";
  if (grads_s != "f32" && grads_s != "bf16") usage("--grads must be f32 or bf16, not '" + grads_s + "'");
  const bool bf16_grads = grads_s == "bf16";
  if (bf16_grads) suffix += "-bf16grads";
  std::vector<int> fuse_list;  // MoeOptions::fuse_swiglu per run, -1: its default
  if (swiglu_s == "default") fuse_list = {-1};
  else if (swiglu_s == "fused") fuse_list = {1};
  else if (swiglu_s == "unfused") fuse_list = {0};
  else if (swiglu_s == "both") fuse_list = {0, 1};
  else usage("--swiglu must be default, fused, unfused or both, not '" + swiglu_s + "'");
  std::vector<const Shape*> todo;
  for (const std::string& id : kmoe::perf::split_commas(shapes)) {
    const Shape* found = nullptr;
    for (const Shape& s : kShapes)
      if (id == s.id) found = &s;
    if (!found)
      usage("unknown shape '" + id + "' (mixtral-T8192, mixtral-T2048, finegrained-T8192, finegrained-T2048)");
    todo.push_back(found);
  }
  std::vector<MoePath> path_list;
  for (const std::string& p : kmoe::perf::split_commas(paths)) {
    if (p == "scatter") path_list.push_back(MoePath::Scattered);
    else if (p == "padded") path_list.push_back(MoePath::Padded);
    else usage("unknown path '" + p + "' (scatter, padded)");
  }
  if (device_count() == 0) {
    std::fprintf(stderr, "moe_peer_bench: no CUDA device present, nothing to measure\n");
    return 1;
  }
  cudaDeviceProp prop{};
  KMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const std::string device = prop.name;
  std::fprintf(stderr, "moe_peer_bench: device %s; warmup %d, reps %d, engine %s\n",
               device_description().c_str(), warmup, reps, engine_s.c_str());
  int failures = 0;
  for (const Shape* s : todo) {
    for (MoePath path : path_list)
    for (int fuse : fuse_list) {
      const std::string impl = std::string(path == MoePath::Scattered ? "kmoe-scatter" : "kmoe-padded") + suffix +
                               (fuse < 0 ? "" : fuse ? "-fused" : "-unfused");
      const double flops = 18.0 * double(s->tokens) * s->k * double(s->hidden) * s->ffn;
      std::string body;
      bool ok = false;
      try {
        const Result r = run_one(*s, path, engine, graph, fuse, bf16_grads, warmup, reps, seed);
        ok = r.finite;
        char buf[1024];
        std::snprintf(buf, sizeof buf,
                      "\"ms_median\": %.6g, \"ms_min\": %.6g, \"tflops\": %.6g, \"extra_mem_bytes\": %zu, "
                      "\"workspace_bytes\": %zu, \"cublas_handle_bytes\": %zu, \"engine\": \"%s\", "
                      "\"swiglu\": \"%s\", "
                      "\"ms_fwd_median\": %.6g, \"ms_bwd_median\": %.6g, \"host_bwd_enqueue_ms_median\": %.6g, "
                      "\"dispatch\": \"kmoe::moe::MoeLayer<bf16, Kokkos::Cuda> (%s, %s engine)\"%s",
                      r.ms_median, r.ms_min, flops / (r.ms_median * 1e-3) / 1e12, r.workspace, r.workspace,
                      r.cublas_handle, r.engine, r.swiglu_fused ? "fused" : "separate",
                      r.fwd_ms, r.bwd_ms, r.host_bwd_ms,
                      path == MoePath::Scattered ? "scattered" : "padded", r.engine,
                      r.finite ? "" : ", \"error\": \"non-finite outputs\"");
        body = buf;
        std::fprintf(stderr,
                     "%-18s %-26s %9.3f ms (min %.3f; fwd %.3f bwd %.3f, bwd host enqueue %.3f)  %6.1f TFLOP/s  "
                     "workspace %.3f GiB  engine %s  swiglu %s\n",
                     s->id, impl.c_str(), r.ms_median, r.ms_min, r.fwd_ms, r.bwd_ms, r.host_bwd_ms,
                     flops / (r.ms_median * 1e-3) / 1e12, r.workspace / 1073741824.0, r.engine,
                     r.swiglu_fused ? "fused" : "separate");
      } catch (const std::exception& e) {
        body = "\"ms_median\": null, \"tflops\": null, \"extra_mem_bytes\": null, \"error\": \"" +
               json_escape(e.what()) + "\"";
        std::fprintf(stderr, "%-18s %-26s FAILED: %s\n", s->id, impl.c_str(), e.what());
        cudaGetLastError();
      }
      failures += ok ? 0 : 1;
      std::printf("{\"impl\": \"%s\", \"shape\": \"%s\", \"T\": %lld, \"H\": %d, \"F\": %d, \"E\": %d, \"k\": %d, "
                  "\"flops\": %.6g, %s, \"reps\": %d, \"warmup\": %d, \"ok\": %s, \"device\": \"%s\"}\n",
                  impl.c_str(), s->model, static_cast<long long>(s->tokens), s->hidden, s->ffn, s->experts, s->k,
                  flops, body.c_str(), reps, warmup, ok ? "true" : "false", json_escape(device).c_str());
      std::fflush(stdout);
    }
  }
  return failures ? 1 : 0;
}
