// The CUDA MoE block (bf16 storage, fp32 accumulation), both layouts, against float64 references:
//  - the transformers oracle (KMOE_TESTDATA_DIR): every layer of every set, within 1e-2 relative L2 of *_f64,
//    top-k identical wherever the oracle's probability gap exceeds bf16 resolution;
//  - random shapes (E = 8 and 64, k = 1, 2, 8, experts with no tokens, T not a multiple of any tile) against a
//    float64 host reference computed from the same bf16-rounded inputs.
// Outputs and the whole workspace are poisoned (NaN bytes) before each run, so an unwritten element fails.
#include "cuda_test.hpp"
#include "kmoe_test.hpp"
#include "layer_util.hpp"
#include "moe_reference.hpp"

#include <kmoe/core/cuda/cutlass_grouped.hpp>

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/checkpoint.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <cfenv>
#include <cstdio>
#include <algorithm>
#include <numeric>
#include <random>
#include <string>

namespace {

using namespace kmoe;
using core::cuda::GemmEngine;
using test::DeviceBuffer;
/// The block's two layouts (MoeOptions::impl): scattered rows (ScatterMoE) or padded expert blocks (MegaBlocks).
enum class MoePath { Scattered, Padded };

const char* path_name(MoePath p) { return p == MoePath::Scattered ? "scattered" : "padded"; }
const char* engine_name(GemmEngine e) {
  return e == GemmEngine::Cublas ? "cublas" : e == GemmEngine::Cutlass ? "cutlass" : "kernel";
}
/// Every engine this build and device can run: every case below runs with each.
std::vector<GemmEngine> engines() {
  std::vector<GemmEngine> out = {GemmEngine::Kernel, GemmEngine::Cublas};
  if (core::cuda::cutlass_grouped_available()) out.push_back(GemmEngine::Cutlass);
  return out;
}

/// Everything one GPU run returns, as float64.
struct GpuRun {
  std::vector<double> logits, topk_weight, y, dx, d_gate, dw1, dw3, dw2, dsw1, dsw3, dsw2;
  std::vector<std::int64_t> topk_idx;
};

/// The block on the GPU through MoeLayer<bf16, Kokkos::Cuda>, forward then backward, into outputs poisoned with NaN.
/// fuse_swiglu: MoeOptions::fuse_swiglu; bf16_grads: the expert weight gradients in bf16 storage (the layer's
/// Bf16ExpertGrads overload) instead of fp32.
GpuRun run_gpu(const test::MoeProblem& p, MoePath path, GemmEngine engine = GemmEngine::Kernel,
               bool fuse_swiglu = true, bool bf16_grads = false) {
  using Layer = moe::MoeLayer<bf16, Kokkos::Cuda>;
  moe::MoeOptions o;
  o.top_k = p.k;
  o.impl = path == MoePath::Padded ? moe::ExpertImpl::Padded : moe::ExpertImpl::Scatter;
  o.gemm = engine == GemmEngine::Cublas    ? core::GemmAlgo::Blas
           : engine == GemmEngine::Cutlass ? core::GemmAlgo::Cutlass
                                           : core::GemmAlgo::Kokkos;
  o.fuse_swiglu = fuse_swiglu;
  Layer layer(test::weights_of<bf16>(p), o);
  const auto x = test::device_view<Layer::matrix>("x", p.x, p.tokens, p.hidden);
  const auto dy = test::device_view<Layer::matrix>("dy", p.dy, p.tokens, p.hidden);
  Layer::matrix y("y", p.tokens, p.hidden);
  Kokkos::deep_copy(y, test::nan_value<bf16>());
  moe::MoeBackward<bf16, Kokkos::Cuda> out;
  out.dx = Layer::grad_matrix("dx", p.tokens, p.hidden);
  out.grads = moe::uninitialized_like<float>(layer.weights());
  Layer::Bf16ExpertGrads g16;
  if (bf16_grads) {
    g16.w1 = Layer::views::tensor3("dw1_bf16", p.experts, p.ffn, p.hidden);
    g16.w3 = Layer::views::tensor3("dw3_bf16", p.experts, p.ffn, p.hidden);
    g16.w2 = Layer::views::tensor3("dw2_bf16", p.experts, p.hidden, p.ffn);
    for (const auto& v : {g16.w1, g16.w3, g16.w2}) Kokkos::deep_copy(v, test::nan_value<bf16>());
  }
  Kokkos::deep_copy(out.dx, test::nan_value<float>());
  moe::for_each_weight_pair(out.grads, out.grads, [](const auto& v, const auto&, const char*) {
    Kokkos::deep_copy(v, test::nan_value<float>());
  });
  layer.forward(x, y);
  if (bf16_grads) layer.backward(dy, out, g16);
  else layer.backward(dy, out);
  Kokkos::fence();
  EXPECT_STREQ(layer.gemm_engine(), engine_name(engine)) << "the engine asked for is the one that ran";
  GpuRun r;
  r.logits = test::host_f64(layer.router_logits());
  r.topk_weight = test::host_f64(layer.routing().topk_weight);
  auto idx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().topk_idx);
  r.topk_idx.assign(idx.data(), idx.data() + idx.span());
  r.y = test::host_f64(y);
  r.dx = test::host_f64(out.dx);
  r.d_gate = test::host_f64(out.grads.router);
  r.dw1 = bf16_grads ? test::host_f64(g16.w1) : test::host_f64(out.grads.w1);
  r.dw3 = bf16_grads ? test::host_f64(g16.w3) : test::host_f64(out.grads.w3);
  r.dw2 = bf16_grads ? test::host_f64(g16.w2) : test::host_f64(out.grads.w2);
  r.dsw1 = test::host_f64(out.grads.shared_w1);
  r.dsw3 = test::host_f64(out.grads.shared_w3);
  r.dsw2 = test::host_f64(out.grads.shared_w2);
  return r;
}

struct Check {
  const char* name;
  const std::vector<double>* got;
  const std::vector<double>* want;
};

/// Expects rel L2 <= tol for each pair and prints one line of errors (the device log keeps them).
void expect_close(const std::string& label, const std::vector<Check>& checks, double tol) {
  std::string line = label + ":";
  for (const auto& c : checks) {
    ASSERT_EQ(c.got->size(), c.want->size()) << label << " " << c.name;
    const double err = test::rel_l2(*c.got, *c.want);
    char buf[64];
    std::snprintf(buf, sizeof buf, " %s %.2e", c.name, err);
    line += buf;
    EXPECT_TRUE(std::isfinite(err)) << label << " " << c.name << ": non-finite values (an unwritten element?)";
    if (std::isfinite(err)) EXPECT_LE(err, tol) << label << " " << c.name;
  }
  std::printf("%s\n", line.c_str());
}

// ---- random shapes ------------------------------------------------------------------------------------------------

struct RandomCase {
  std::int64_t tokens;
  int hidden, ffn, experts, k, dead_experts, shared_ffn;
};

test::MoeProblem random_problem(const RandomCase& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  test::MoeProblem p;
  p.tokens = c.tokens;
  p.hidden = c.hidden;
  p.ffn = c.ffn;
  p.experts = c.experts;
  p.k = c.k;
  p.shared_ffn = c.shared_ffn;
  auto fill = [&](std::vector<float>& v, std::int64_t n, float scale) {
    v.resize(n);
    for (auto& f : v) f = scale * n01(rng);
    v = test::round_bf16(std::move(v));
  };
  const float ws = 1.f / std::sqrt(float(c.hidden)), fs = 1.f / std::sqrt(float(c.ffn));
  fill(p.x, c.tokens * c.hidden, 1.f);
  fill(p.dy, c.tokens * c.hidden, 1.f);
  fill(p.gate, std::int64_t(c.experts) * c.hidden, 2.f * ws);
  fill(p.w1, std::int64_t(c.experts) * c.ffn * c.hidden, ws);
  fill(p.w3, std::int64_t(c.experts) * c.ffn * c.hidden, ws);
  fill(p.w2, std::int64_t(c.experts) * c.hidden * c.ffn, fs);
  if (c.shared_ffn) {
    const float ss = 1.f / std::sqrt(float(c.shared_ffn));
    fill(p.sw1, std::int64_t(c.shared_ffn) * c.hidden, ws);
    fill(p.sw3, std::int64_t(c.shared_ffn) * c.hidden, ws);
    fill(p.sw2, std::int64_t(c.hidden) * c.shared_ffn, ss);
  }
  // Experts nobody picks: every token gets x[:,0] ~ 4, and the last dead_experts gate rows weigh it by -8.
  for (std::int64_t t = 0; c.dead_experts > 0 && t < c.tokens; ++t) p.x[t * c.hidden] = 4.f;
  for (int e = c.experts - c.dead_experts; e < c.experts; ++e) p.gate[std::int64_t(e) * c.hidden] = -8.f;
  return p;
}

/// Every path x engine (bf16_grads: the engines that write bf16 weight gradients, with them).
void check_random(const RandomCase& c, unsigned seed, bool bf16_grads = false) {
  const auto p = random_problem(c, seed);
  for (MoePath path : {MoePath::Scattered, MoePath::Padded})
  for (GemmEngine engine : engines()) {
    char label[160];
    std::snprintf(label, sizeof label, "T=%lld H=%d F=%d E=%d k=%d dead=%d S=%d %s %s%s", (long long)c.tokens,
                  c.hidden, c.ffn, c.experts, c.k, c.dead_experts, c.shared_ffn, path_name(path), engine_name(engine),
                  bf16_grads ? " bf16-grads" : "");
    SCOPED_TRACE(label);
    const GpuRun g = run_gpu(p, path, engine, true, bf16_grads);
    const auto ref = test::moe_reference(p, g.topk_idx, 2e-3);
    EXPECT_EQ(ref.routing_mismatches, 0) << "tokens whose top-k differs beyond a near tie";
    for (int e = c.experts - c.dead_experts; e < c.experts; ++e)
      for (std::int64_t i = 0; i < std::int64_t(p.tokens) * p.k; ++i) ASSERT_NE(g.topk_idx[i], e) << "dead expert";
    std::vector<Check> checks = {{"logits", &g.logits, &ref.logits}, {"topk_w", &g.topk_weight, &ref.topk_weight},
                                 {"y", &g.y, &ref.y},                {"dx", &g.dx, &ref.dx},
                                 {"dgate", &g.d_gate, &ref.d_gate},  {"dw1", &g.dw1, &ref.dw1},
                                 {"dw3", &g.dw3, &ref.dw3},          {"dw2", &g.dw2, &ref.dw2}};
    if (c.shared_ffn) {
      checks.push_back({"dsw1", &g.dsw1, &ref.dsw1});
      checks.push_back({"dsw3", &g.dsw3, &ref.dsw3});
      checks.push_back({"dsw2", &g.dsw2, &ref.dsw2});
    }
    expect_close(label, checks, 1e-2);
    std::printf("  (near ties adopted from the GPU: %d)\n", ref.routing_adopted);
  }
}

const std::vector<RandomCase> kRandomCases = {
    {1000, 128, 96, 8, 2, 0, 0},   // Mixtral-like routing, T not a multiple of the 128-row tile
      {777, 256, 64, 64, 8, 8, 0},   // fine-grained: 64 experts, k = 8, 8 experts with no tokens
      {333, 128, 64, 64, 1, 4, 0},   // top-1 (every weight 1), empty experts
      {129, 64, 40, 8, 8, 0, 72},    // k = E, with a shared expert
      {1, 64, 48, 6, 2, 0, 0},       // one token
      {2100, 64, 48, 8, 2, 2, 0},    // several row tiles per expert, 2 empty experts
};
constexpr unsigned kRandomSeed = 1234;  // case i uses kRandomSeed + i

TEST(CudaMoe, RandomShapesAgainstHostReference) {
  KMOE_REQUIRE_GPU();
  unsigned seed = kRandomSeed;
  for (const auto& c : kRandomCases) check_random(c, seed++);
}

// bf16 weight gradients (the layer's Bf16ExpertGrads), every engine: the same reference and tolerance, so the only change
// is the rounding of the stored gradient.
TEST(CudaMoe, Bf16WeightGradientsAgainstHostReference) {
  KMOE_REQUIRE_GPU();
  check_random({1000, 128, 96, 8, 2, 0, 0}, 2234, true);
  check_random({777, 256, 64, 64, 8, 8, 0}, 2235, true);
  check_random({129, 64, 40, 8, 8, 0, 72}, 2236, true);
}

// Asking for both or neither storage of a weight gradient is an InputError, not garbage.
TEST(CudaMoe, Bf16AndFp32WeightGradientTogetherIsAnInputError) {
  KMOE_REQUIRE_GPU();
  core::cuda::GroupedGemmTNArgs t;
  t.m = t.n = 16;
  t.rows = 16;
  DeviceBuffer<std::uint16_t> a(256), b(256), cb(256);
  DeviceBuffer<float> c(256);
  t.a = a.get(), t.b = b.get(), t.lda = t.ldb = 16;
  t.c0 = c.get();
  t.c0_bf16 = cb.get();
  EXPECT_THROW(core::cuda::grouped_gemm_tn(t, nullptr), kmoe::InputError);
  t.c0 = nullptr;
  t.c0_bf16 = nullptr;
  EXPECT_THROW(core::cuda::grouped_gemm_tn(t, nullptr), kmoe::InputError);
}

// The backward's [R,·] intermediates reuse the forward's saved buffers: the layer's workspace is the saved activations
// (h13 [R,2F], act [R,F], out and the gathered x [R,H], bf16) plus O(T·E + R) of routing state — not twice that.
TEST(CudaMoe, WorkspaceIsTheSavedActivations) {
  KMOE_REQUIRE_GPU();
  const RandomCase c{4096, 512, 1024, 8, 2, 0, 0};
  const auto p = random_problem(c, 77);
  for (MoePath path : {MoePath::Scattered, MoePath::Padded}) {
    moe::MoeOptions o;
    o.top_k = c.k;
    o.impl = path == MoePath::Padded ? moe::ExpertImpl::Padded : moe::ExpertImpl::Scatter;
    moe::MoeLayer<bf16, Kokkos::Cuda> layer(test::weights_of<bf16>(p), o);
    const auto x = test::device_view<moe::MoeLayer<bf16, Kokkos::Cuda>::matrix>("x", p.x, p.tokens, p.hidden);
    layer.forward(x);
    Kokkos::fence();
    const std::int64_t rows = c.tokens * c.k + (path == MoePath::Padded ? c.experts * 127 : 0);
    const double saved = 2.0 * rows * (3.0 * c.ffn + 2.0 * c.hidden);
    const double bytes = double(layer.workspace_bytes());
    EXPECT_GE(bytes, saved) << path_name(path);
    EXPECT_LE(bytes, saved * 1.05) << path_name(path) << ": more than the saved activations";
  }
}

// ---- the transformers oracle -------------------------------------------------------------------------------------

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

/// Layer `layer` of an oracle checkpoint as a MoeProblem: the weights (bf16 on disk: exact in float), x and dy
/// (the reference file's float64 values) rounded to bf16.
test::MoeProblem oracle_problem(const io::HfCheckpoint& ckpt, int layer, const std::vector<double>& x,
                                const std::vector<double>& dy) {
  test::MoeProblem p = test::problem_from_weights(io::load_moe_layer<float>(ckpt, layer), int(ckpt.config().top_k));
  p.x = test::round_bf16(to_float(x));
  p.dy = test::round_bf16(to_float(dy));
  p.tokens = std::int64_t(p.x.size()) / p.hidden;
  return p;
}

/// Reads a reference tensor as float64 (the *_f64 twin when the file has one).
std::vector<double> oracle_tensor(const io::SafetensorsFile& ref, const std::string& name) {
  const std::string twin = name + "_f64";
  auto v = io::to_host_view<double>(ref.tensor(ref.has(twin) ? twin : name));
  return std::vector<double>(v.data(), v.data() + v.extent(0));
}

const char* const kOracleSets[] = {"mixtral-tiny", "granitemoe-tiny", "granitemoeshared-tiny"};

TEST(CudaMoe, OracleEveryLayerEverySetBothPaths) {
  KMOE_REQUIRE_GPU();
  for (const std::string set : kOracleSets) {
    const auto ckpt = io::HfCheckpoint::open(test::testdata_dir() / set / "hf_save_pretrained");
    const auto ref = io::SafetensorsFile::open(test::testdata_dir() / set / (set + "-ref.safetensors"));
    auto want = [&](const std::string& name) { return oracle_tensor(ref, name); };
    for (int layer = 0; layer < ckpt.config().num_layers; ++layer) {
      const std::string pre = "layers." + std::to_string(layer) + ".";
      const test::MoeProblem p = oracle_problem(ckpt, layer, want(pre + "x"), want(pre + "dy"));
      const auto probs = want(pre + "router_probs");
      auto idx_view = io::to_host_view<std::int64_t>(ref.tensor(pre + "topk_idx"));
      const std::vector<std::int64_t> idx_ref(idx_view.data(), idx_view.data() + idx_view.extent(0));
      const std::vector<double> y = want(pre + "y"), dx = want(pre + "dx"), dgate = want(pre + "grad.gate"),
                                dw1 = want(pre + "grad.w1"), dw3 = want(pre + "grad.w3"), dw2 = want(pre + "grad.w2"),
                                logits = want(pre + "router_logits"), tw = want(pre + "topk_weight");
      for (MoePath path : {MoePath::Scattered, MoePath::Padded})
      for (GemmEngine engine : engines()) {
        const std::string label =
            set + " layer " + std::to_string(layer) + " " + path_name(path) + " " + engine_name(engine);
        SCOPED_TRACE(label);
        const GpuRun g = run_gpu(p, path, engine);
        // Top-k must match wherever the oracle's k-th / (k+1)-th probability gap exceeds bf16 resolution.
        for (std::int64_t t = 0; t < p.tokens; ++t) {
          std::vector<double> pr(probs.begin() + t * p.experts, probs.begin() + (t + 1) * p.experts);
          std::vector<double> sorted = pr;
          std::sort(sorted.rbegin(), sorted.rend());
          const double gap = p.k < p.experts ? sorted[p.k - 1] - sorted[p.k] : 1.0;
          if (gap < 1e-2 * sorted[0]) continue;
          for (int s = 0; s < p.k; ++s)
            EXPECT_EQ(g.topk_idx[t * p.k + s], idx_ref[t * p.k + s]) << "token " << t << " slot " << s;
        }
        // d gate against the oracle gets 2e-2: rounding x and dy to bf16 alone (everything else exact, float64)
        // already moves granitemoe-tiny layer 0's router gradient by 1.02e-2 (docs/gpu.md); the kernels' own error
        // on that gradient is checked at 1e-2 against the float64 reference of the same bf16 inputs below.
        std::vector<Check> checks = {{"logits", &g.logits, &logits}, {"topk_w", &g.topk_weight, &tw},
                                     {"y", &g.y, &y},                {"dx", &g.dx, &dx},
                                     {"dw1", &g.dw1, &dw1},          {"dw3", &g.dw3, &dw3},
                                     {"dw2", &g.dw2, &dw2}};
        std::vector<double> dsw1, dsw3, dsw2;
        if (p.shared_ffn) {
          dsw1 = want(pre + "grad.shared_w1");
          dsw3 = want(pre + "grad.shared_w3");
          dsw2 = want(pre + "grad.shared_w2");
          checks.push_back({"dsw1", &g.dsw1, &dsw1});
          checks.push_back({"dsw3", &g.dsw3, &dsw3});
          checks.push_back({"dsw2", &g.dsw2, &dsw2});
        }
        expect_close(label, checks, 1e-2);
        expect_close(label + " (router grad)", {{"dgate", &g.d_gate, &dgate}}, 2e-2);
        const auto same_inputs = test::moe_reference(p, g.topk_idx, 2e-3);
        expect_close(label + " vs f64 of the bf16 inputs", {{"y", &g.y, &same_inputs.y}, {"dx", &g.dx, &same_inputs.dx},
                                                             {"dgate", &g.d_gate, &same_inputs.d_gate},
                                                             {"dw1", &g.dw1, &same_inputs.dw1}},
                     1e-2);
      }
    }
  }
}

// ---- SwiGLU fused into the kernel engine's GEMM epilogues ---------------------------------------------------------

/// Counts the elements that differ (NaN counts: a poisoned, unwritten element) and the relative L2 difference.
void expect_same_values(std::string& line, const char* name, const std::vector<double>& got,
                        const std::vector<double>& want, double tol) {
  ASSERT_EQ(got.size(), want.size()) << name;
  if (got.empty()) return;
  std::int64_t differ = 0;
  for (std::size_t i = 0; i < got.size(); ++i) differ += !(got[i] == want[i]);
  const double err = test::rel_l2(got, want);
  char buf[96];
  std::snprintf(buf, sizeof buf, " %s %.1e (%lld of %zu differ)", name, err, (long long)differ, got.size());
  line += buf;
  EXPECT_TRUE(std::isfinite(err)) << name << ": non-finite values (an unwritten element?)";
  if (std::isfinite(err)) EXPECT_LE(err, tol) << name;
}

/// The kernel engine with SwiGLU fused into its GEMMs against the same engine with the separate SwiGLU passes, both
/// paths. Expected bit-identical (one SwiGLU formula in common.cuh, the same accumulation order per element, SwiGLU
/// from the bf16-rounded GEMM outputs); checked at 1e-3 relative (L2), a tenth of the block's bf16 tolerance, with
/// the number of differing elements printed.
void expect_fused_matches_unfused(const std::string& label, const test::MoeProblem& p) {
  using Field = std::vector<double> GpuRun::*;
  const std::pair<const char*, Field> fields[] = {
      {"logits", &GpuRun::logits}, {"topk_w", &GpuRun::topk_weight}, {"y", &GpuRun::y},
      {"dx", &GpuRun::dx},         {"dgate", &GpuRun::d_gate},       {"dw1", &GpuRun::dw1},
      {"dw3", &GpuRun::dw3},       {"dw2", &GpuRun::dw2},            {"dsw1", &GpuRun::dsw1},
      {"dsw3", &GpuRun::dsw3},     {"dsw2", &GpuRun::dsw2}};
  for (MoePath path : {MoePath::Scattered, MoePath::Padded}) {
    std::string line = label + " " + path_name(path) + " fused vs unfused:";
    SCOPED_TRACE(line);
    const GpuRun fused = run_gpu(p, path, GemmEngine::Kernel, true);
    const GpuRun unfused = run_gpu(p, path, GemmEngine::Kernel, false);
    EXPECT_EQ(fused.topk_idx, unfused.topk_idx);
    for (const auto& [name, field] : fields) expect_same_values(line, name, fused.*field, unfused.*field, 1e-3);
    std::printf("%s\n", line.c_str());
  }
}

TEST(CudaMoe, FusedSwigluMatchesUnfusedEveryCase) {
  KMOE_REQUIRE_GPU();
  unsigned seed = kRandomSeed;
  for (const auto& c : kRandomCases) {
    char label[128];
    std::snprintf(label, sizeof label, "T=%lld H=%d F=%d E=%d k=%d dead=%d S=%d", (long long)c.tokens, c.hidden,
                  c.ffn, c.experts, c.k, c.dead_experts, c.shared_ffn);
    expect_fused_matches_unfused(label, random_problem(c, seed++));
  }
  for (const std::string set : kOracleSets) {
    const auto ckpt = io::HfCheckpoint::open(test::testdata_dir() / set / "hf_save_pretrained");
    const auto ref = io::SafetensorsFile::open(test::testdata_dir() / set / (set + "-ref.safetensors"));
    for (int layer = 0; layer < ckpt.config().num_layers; ++layer) {
      const std::string pre = "layers." + std::to_string(layer) + ".";
      expect_fused_matches_unfused(set + " layer " + std::to_string(layer),
                                   oracle_problem(ckpt, layer, oracle_tensor(ref, pre + "x"),
                                                  oracle_tensor(ref, pre + "dy")));
    }
  }
}

std::vector<double> bf16_to_f64(const DeviceBuffer<std::uint16_t>& b) {
  return test::bf16_bits_to_double(b.download());
}

// The epilogues alone, in the corners the block does not reach: rows read and written through indices that are not
// the plan's, an empty group, K and F not multiples of the tiles, h13 not stored, and the backward in place over h13.
TEST(CudaMoe, FusedSwigluEpiloguesIndexedRowsAndInPlace) {
  KMOE_REQUIRE_GPU();
  using core::cuda::GemmEpilogue;
  using core::cuda::GroupedGemmArgs;
  const std::int64_t T = 150, k = 2, R = T * k, H = 72, F = 80;
  const std::vector<std::int64_t> offsets = {0, 150, 150, 300}, tiles = {0, 2, 2, 5};  // group 1 empty
  std::vector<std::int64_t> perm(R);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(11));
  DeviceBuffer<std::int64_t> d_off(offsets), d_tiles(tiles), d_perm(perm);
  DeviceBuffer<std::uint16_t> x(T * H), w1(3 * F * H), w3(3 * F * H), w2(3 * H * F), d_out(R * H);
  std::uint64_t seed = 40;
  for (auto* b : {&x, &w1, &w3, &w2, &d_out}) core::cuda::fill_random_bf16(b->get(), b->size(), 0.5f, seed++, nullptr);

  GroupedGemmArgs up;  // h13 = x[perm[r] / k] · [W1;W3]ᵀ, written at row perm[r]
  up.groups = 3;
  up.rows = R;
  up.n = 2 * F;
  up.k = H;
  up.offsets = d_off.get();
  up.tile_offsets = d_tiles.get();
  up.a = x.get();
  up.lda = H;
  up.a_index = d_perm.get();
  up.a_div = int(k);
  up.b0 = w1.get();
  up.b1 = w3.get();
  up.b_split = F;
  up.ldc = 2 * F;
  up.c_index = d_perm.get();
  DeviceBuffer<std::uint16_t> h13(R * 2 * F), act(R * F), h13_f(R * 2 * F), act_f(R * F), act_f2(R * F);
  for (auto* b : {&h13, &act, &h13_f, &act_f, &act_f2}) b->poison();
  up.c_bf16 = h13.get();
  core::cuda::grouped_gemm(up, nullptr);
  core::cuda::swiglu_forward(h13.get(), R, F, act.get(), nullptr);
  GroupedGemmArgs fused = up;
  fused.epilogue = GemmEpilogue::SwigluForward;
  fused.h13_out = h13_f.get();
  fused.ld_h13 = 2 * F;
  fused.c_bf16 = act_f.get();
  fused.ldc = F;
  core::cuda::grouped_gemm(fused, nullptr);
  fused.h13_out = nullptr;
  fused.c_bf16 = act_f2.get();
  core::cuda::grouped_gemm(fused, nullptr);
  std::string line = "SwiGLU forward epilogue:";
  expect_same_values(line, "h13", bf16_to_f64(h13_f), bf16_to_f64(h13), 1e-3);
  expect_same_values(line, "act", bf16_to_f64(act_f), bf16_to_f64(act), 1e-3);
  expect_same_values(line, "act (h13 not stored)", bf16_to_f64(act_f2), bf16_to_f64(act), 1e-3);
  std::printf("%s\n", line.c_str());

  GroupedGemmArgs down = up;  // d_act = d_out[r] · W2, written at row perm[r]
  down.n = F;
  down.k = H;
  down.a = d_out.get();
  down.a_index = nullptr;
  down.b_trans = false;
  down.b0 = w2.get();
  down.b1 = nullptr;
  down.b_split = 0;
  down.ldc = F;
  DeviceBuffer<std::uint16_t> d_act(R * F), dh13(R * 2 * F), dh13_f(R * 2 * F), in_place(R * 2 * F);
  for (auto* b : {&d_act, &dh13, &dh13_f}) b->poison();
  down.c_bf16 = d_act.get();
  core::cuda::grouped_gemm(down, nullptr);
  core::cuda::swiglu_backward(h13.get(), d_act.get(), R, F, dh13.get(), nullptr);
  GroupedGemmArgs fused_bwd = down;
  fused_bwd.epilogue = GemmEpilogue::SwigluBackward;
  fused_bwd.h13_in = h13.get();
  fused_bwd.ld_h13 = 2 * F;
  fused_bwd.c_bf16 = dh13_f.get();
  fused_bwd.ldc = 2 * F;
  core::cuda::grouped_gemm(fused_bwd, nullptr);
  KMOE_CUDA_CHECK(cudaMemcpy(in_place.get(), h13.get(), R * 2 * F * 2, cudaMemcpyDeviceToDevice));
  fused_bwd.h13_in = in_place.get();
  fused_bwd.c_bf16 = in_place.get();
  core::cuda::grouped_gemm(fused_bwd, nullptr);
  line = "SwiGLU backward epilogue:";
  expect_same_values(line, "dh13", bf16_to_f64(dh13_f), bf16_to_f64(dh13), 1e-3);
  expect_same_values(line, "dh13 (in place over h13)", bf16_to_f64(in_place), bf16_to_f64(dh13), 1e-3);
  std::printf("%s\n", line.c_str());

  // Arguments the epilogues cannot serve are refused with a message.
  GroupedGemmArgs bad = fused;
  bad.b1 = nullptr;
  EXPECT_THROW(core::cuda::grouped_gemm(bad, nullptr), kmoe::InputError);
  bad = fused_bwd;
  bad.h13_in = nullptr;
  EXPECT_THROW(core::cuda::grouped_gemm(bad, nullptr), kmoe::InputError);
}

// ---- pieces -------------------------------------------------------------------------------------------------------

TEST(CudaMoe, DispatchPlanIsStableAndPadded) {
  KMOE_REQUIRE_GPU();
  const std::int64_t T = 1001;
  const int E = 64, k = 8;
  std::mt19937 rng(7);
  std::vector<std::int64_t> idx(T * k);
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<int> e(E);
    std::iota(e.begin(), e.end(), 0);
    std::shuffle(e.begin(), e.end(), rng);
    for (int s = 0; s < k; ++s) idx[t * k + s] = e[s] % (E - 5);  // experts E-5..E-1 get nothing
  }
  // duplicates within a token are fine for the plan (it only groups pairs)
  DeviceBuffer<std::int64_t> d_idx(idx);
  DeviceBuffer<unsigned char> buf(core::cuda::dispatch_plan_bytes(T, E, k));
  buf.poison();
  const auto plan = core::cuda::dispatch_plan_carve(buf.get(), T, E, k);
  core::cuda::dispatch_plan_build(d_idx.get(), plan, nullptr);
  KMOE_CUDA_CHECK(cudaDeviceSynchronize());
  auto get = [](const std::int64_t* p, std::int64_t n) {
    std::vector<std::int64_t> h(n);
    KMOE_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(std::int64_t), cudaMemcpyDeviceToHost));
    return h;
  };
  const auto offsets = get(plan.offsets, E + 1), padded = get(plan.padded_offsets, E + 1),
             sorted = get(plan.sorted_pair, T * k), pair_row = get(plan.pair_row, T * k),
             ppr = get(plan.pair_padded_row, T * k), ppair = get(plan.padded_pair, plan.padded_capacity);
  // expected: stable counting sort on the host
  std::vector<std::int64_t> want_sorted;
  for (int e = 0; e < E; ++e)
    for (std::int64_t p = 0; p < T * k; ++p)
      if (idx[p] == e) want_sorted.push_back(p);
  EXPECT_EQ(sorted, want_sorted);
  EXPECT_EQ(offsets[E], T * k);
  for (int e = 0; e < E; ++e) {
    const std::int64_t n = offsets[e + 1] - offsets[e];
    EXPECT_EQ(padded[e + 1] - padded[e], (n + 127) / 128 * 128) << "expert " << e;
  }
  for (std::int64_t p = 0; p < T * k; ++p) {
    ASSERT_EQ(sorted[pair_row[p]], p);
    ASSERT_EQ(ppair[ppr[p]], p);
    const std::int64_t e = idx[p];
    ASSERT_EQ(ppr[p] - padded[e], pair_row[p] - offsets[e]);
  }
  std::int64_t padding = 0;
  for (auto v : ppair) padding += v == -1;
  EXPECT_EQ(padding, plan.padded_capacity - T * k);
}

}  // namespace

namespace {

// `kmoe block --backend cuda --precision bf16` writes the oracle's tensors from the GPU kernels.
TEST(CudaMoe, KmoeBlockCommandOnTheGpu) {
  KMOE_REQUIRE_GPU();
  const std::string set = "granitemoeshared-tiny";
  const auto dir = kmoe::test::testdata_dir() / set;
  kmoe::test::ScratchDir scratch("cuda_block");
  for (const char* impl : {"scatter", "padded"}) {
    const auto out = scratch.path() / (std::string(impl) + ".safetensors");
    const auto r = kmoe::test::run_kmoe("block --checkpoint " + (dir / "hf_save_pretrained").string() +
                                        " --layer 1 --inputs " + (dir / (set + "-ref.safetensors")).string() +
                                        " --out " + out.string() + " --backend cuda --precision bf16 --impl " + impl);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto got = kmoe::io::SafetensorsFile::open(out);
    const auto ref = kmoe::io::SafetensorsFile::open(dir / (set + "-ref.safetensors"));
    for (const std::string name : {"y", "dx", "grad.w1", "grad.w2", "grad.shared_w2"}) {
      auto g = kmoe::io::to_host_view<double>(got.tensor("layers.1." + name));
      auto w = kmoe::io::to_host_view<double>(ref.tensor("layers.1." + name + "_f64"));
      ASSERT_EQ(g.extent(0), w.extent(0)) << name;
      const double err = kmoe::test::rel_l2(std::vector<double>(g.data(), g.data() + g.extent(0)),
                                            std::vector<double>(w.data(), w.data() + w.extent(0)));
      std::printf("kmoe block --backend cuda --impl %s: %s rel %.2e\n", impl, name.c_str(), err);
      EXPECT_TRUE(std::isfinite(err)) << name;
      if (std::isfinite(err)) EXPECT_LE(err, 1e-2) << name;
    }
  }
  // bf16 belongs to the cuda backend only
  const auto bad = kmoe::test::run_kmoe("block --checkpoint x --layer 0 --inputs y --out z --precision bf16");
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
}

}  // namespace

namespace {

// The portable kernels on Kokkos::Cuda (moe::MoeLayer<float, Kokkos::Cuda>: fp32, KokkosBlas -> cuBLAS) against the
// oracle at the float32 tolerance, and the hand-written bf16 block against that portable GPU path.
template <class V>
std::vector<double> to_host_f64(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<double>(h.data(), h.data() + h.span());
}

TEST(CudaMoe, PortableCudaPathMatchesOracleAndHandWrittenPath) {
  KMOE_REQUIRE_GPU();
  using Space = Kokkos::Cuda;
  using views = kmoe::moe::MoeViews<float, Space>;
  for (const std::string set : kOracleSets) {
    const auto ckpt = kmoe::io::HfCheckpoint::open(kmoe::test::testdata_dir() / set / "hf_save_pretrained");
    const auto ref = kmoe::io::SafetensorsFile::open(kmoe::test::testdata_dir() / set / (set + "-ref.safetensors"));
    auto want = [&](const std::string& name) { return oracle_tensor(ref, name); };
    for (int layer = 0; layer < ckpt.config().num_layers; ++layer) {
      const std::string pre = "layers." + std::to_string(layer) + ".";
      for (auto impl : {kmoe::moe::ExpertImpl::Scatter, kmoe::moe::ExpertImpl::Padded}) {
        const bool scatter = impl == kmoe::moe::ExpertImpl::Scatter;
        const std::string label = set + " layer " + std::to_string(layer) + (scatter ? " scatter" : " padded");
        SCOPED_TRACE(label);
        kmoe::moe::MoeOptions opt;
        opt.top_k = 0;
        opt.impl = impl;
        auto layer_obj = kmoe::moe::layer_from_checkpoint<float, Space>(ckpt, layer, opt);
        const auto xr = want(pre + "x"), dyr = want(pre + "dy");
        const std::int64_t hidden = layer_obj.weights().hidden(), tokens = std::int64_t(xr.size()) / hidden;
        typename views::matrix x("x", tokens, hidden), dy("dy", tokens, hidden);
        auto xh = Kokkos::create_mirror_view(x);
        auto dyh = Kokkos::create_mirror_view(dy);
        for (std::size_t i = 0; i < xr.size(); ++i) {
          xh.data()[i] = float(xr[i]);
          dyh.data()[i] = float(dyr[i]);
        }
        Kokkos::deep_copy(x, xh);
        Kokkos::deep_copy(dy, dyh);
        // KokkosBlas -> cuBLAS: its host-side heuristics raise FE_INVALID, which the test main traps.
        fenv_t fenv;
        feholdexcept(&fenv);
        const auto y = to_host_f64(layer_obj.forward(x));
        const auto g = layer_obj.backward(dy);
        fesetenv(&fenv);
        const auto dx = to_host_f64(g.dx), dgate = to_host_f64(g.grads.router), dw1 = to_host_f64(g.grads.w1),
                   dw2 = to_host_f64(g.grads.w2);
        const auto y_ref = want(pre + "y"), dx_ref = want(pre + "dx"), dgate_ref = want(pre + "grad.gate"),
                   dw1_ref = want(pre + "grad.w1"), dw2_ref = want(pre + "grad.w2");
        expect_close(label + " portable Cuda fp32 vs oracle",
                     {{"y", &y, &y_ref}, {"dx", &dx, &dx_ref}, {"dgate", &dgate, &dgate_ref},
                      {"dw1", &dw1, &dw1_ref}, {"dw2", &dw2, &dw2_ref}},
                     1e-5);
        // The hand-written block on the same layer (bf16), against the portable GPU path.
        const kmoe::test::MoeProblem p = oracle_problem(ckpt, layer, xr, dyr);
        const GpuRun h = run_gpu(p, scatter ? MoePath::Scattered : MoePath::Padded);
        expect_close(label + " hand-written bf16 vs portable Cuda fp32",
                     {{"y", &h.y, &y}, {"dx", &h.dx, &dx}, {"dw1", &h.dw1, &dw1}, {"dw2", &h.dw2, &dw2}}, 1e-2);
      }
    }
  }
}

}  // namespace
