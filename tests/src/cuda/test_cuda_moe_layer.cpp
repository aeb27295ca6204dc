// moe::MoeLayer<bf16, Kokkos::Cuda>: the MoeLayer API over kmoe's hand-written CUDA block.
//  - it is the CUDA block and says so (backend, profiling region, engine);
//  - against the portable layer on the same GPU (MoeLayer<float, Kokkos::Cuda>, same bf16-representable inputs):
//    every testdata layer and random shapes (E = 64, k = 8, experts with no tokens; a shared expert), both paths,
//    y / dx / every gradient within 1e-2 relative L2, top-k identical; every output poisoned (NaN) before the run;
//  - workspace reuse across shapes, expert counts on request, zero tokens, input errors.
#include "cuda_test.hpp"
#include "kmoe_test.hpp"
#include "layer_util.hpp"
#include "moe_reference.hpp"

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/checkpoint.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <cfenv>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>

namespace {

using namespace kmoe;
using Cuda = Kokkos::Cuda;
using Bf16Layer = moe::MoeLayer<bf16, Cuda>;
using F32Layer = moe::MoeLayer<float, Cuda>;
using test::MoeProblem;
using test::device_view;
using test::host_bytes;
using test::host_f64;
using test::nan_value;
using test::weights_of;
using test::random_problem;

static_assert(Bf16Layer::backend == moe::LayerBackend::Cuda, "MoeLayer<bf16, Cuda> must be the hand-written block");
static_assert(F32Layer::backend == moe::LayerBackend::Portable, "MoeLayer<float, Cuda> is the portable reference");
static_assert(std::is_same<moe::MoeBackward<bf16, Cuda>::value_type, float>::value, "bf16 layers: fp32 gradients");

/// What one layer run returns, on the host.
struct LayerRun {
  std::vector<double> logits, topk_weight, y, dx, dgate, dw1, dw3, dw2, dsw1, dsw3, dsw2;
  std::vector<std::int64_t> topk_idx, counts;
};

moe::MoeOptions options_of(const MoeProblem& p, moe::ExpertImpl impl, core::GemmAlgo gemm) {
  moe::MoeOptions o;
  o.top_k = p.k;
  o.impl = impl;
  o.gemm = gemm;
  return o;
}

/// Runs a layer forward and backward into outputs poisoned with NaN, so an unwritten element fails the comparison.
template <class T>
LayerRun run_layer(const MoeProblem& p, moe::ExpertImpl impl, core::GemmAlgo gemm = core::GemmAlgo::Auto) {
  using Layer = moe::MoeLayer<T, Cuda>;
  using G = moe::grad_value_t<T>;
  Layer layer(weights_of<T>(p), options_of(p, impl, gemm));
  const auto x = device_view<typename Layer::matrix>("x", p.x, p.tokens, p.hidden);
  const auto dy = device_view<typename Layer::matrix>("dy", p.dy, p.tokens, p.hidden);
  typename Layer::matrix y("y", p.tokens, p.hidden);
  Kokkos::deep_copy(y, nan_value<T>());
  moe::MoeBackward<T, Cuda> out;
  out.dx = typename moe::MoeViews<G, Cuda>::matrix("dx", p.tokens, p.hidden);
  out.grads = moe::uninitialized_like<G>(layer.weights());
  Kokkos::deep_copy(out.dx, nan_value<G>());
  moe::for_each_weight_pair(out.grads, out.grads, [](const auto& v, const auto&, const char*) {
    Kokkos::deep_copy(v, nan_value<G>());
  });
  // KokkosBlas -> cuBLAS (the portable layer): its host-side heuristics raise FE_INVALID, which the test main traps.
  fenv_t fenv;
  feholdexcept(&fenv);
  layer.forward(x, y);
  layer.backward(dy, out);
  Kokkos::fence();
  fesetenv(&fenv);
  LayerRun r;
  r.logits = host_f64(layer.router_logits());
  r.topk_weight = host_f64(layer.routing().topk_weight);
  auto idx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().topk_idx);
  r.topk_idx.assign(idx.data(), idx.data() + idx.span());
  r.counts = layer.expert_counts();
  r.y = host_f64(y);
  r.dx = host_f64(out.dx);
  r.dgate = host_f64(out.grads.router);
  r.dw1 = host_f64(out.grads.w1);
  r.dw3 = host_f64(out.grads.w3);
  r.dw2 = host_f64(out.grads.w2);
  r.dsw1 = host_f64(out.grads.shared_w1);
  r.dsw3 = host_f64(out.grads.shared_w3);
  r.dsw2 = host_f64(out.grads.shared_w2);
  return r;
}

void expect_close(const std::string& label, const LayerRun& got, const LayerRun& want, double tol) {
  const std::vector<std::pair<const char*, std::pair<const std::vector<double>*, const std::vector<double>*>>> checks = {
      {"logits", {&got.logits, &want.logits}}, {"topk_w", {&got.topk_weight, &want.topk_weight}},
      {"y", {&got.y, &want.y}},                {"dx", {&got.dx, &want.dx}},
      {"dgate", {&got.dgate, &want.dgate}},    {"dw1", {&got.dw1, &want.dw1}},
      {"dw3", {&got.dw3, &want.dw3}},          {"dw2", {&got.dw2, &want.dw2}},
      {"dsw1", {&got.dsw1, &want.dsw1}},       {"dsw3", {&got.dsw3, &want.dsw3}},
      {"dsw2", {&got.dsw2, &want.dsw2}}};
  std::string line = label + ":";
  for (const auto& [name, pair] : checks) {
    ASSERT_EQ(pair.first->size(), pair.second->size()) << label << " " << name;
    if (pair.first->empty()) continue;
    const double err = test::rel_l2(*pair.first, *pair.second);
    char buf[64];
    std::snprintf(buf, sizeof buf, " %s %.2e", name, err);
    line += buf;
    EXPECT_TRUE(std::isfinite(err)) << label << " " << name << ": non-finite values (an unwritten element?)";
    if (std::isfinite(err)) EXPECT_LE(err, tol) << label << " " << name;
  }
  std::printf("%s\n", line.c_str());
  EXPECT_EQ(got.topk_idx, want.topk_idx) << label << ": top-k differs";
  EXPECT_EQ(got.counts, want.counts) << label << ": expert counts differ";
}

// ---- problems ----------------------------------------------------------------------------------------------------

template <class V>
std::vector<float> flat(const V& view) {
  std::vector<float> out(view.span());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(view.data()[i]);
  return out;
}

/// Every layer of every testdata set, with the oracle's x and dy rounded to bf16.
std::vector<std::pair<std::string, MoeProblem>> testdata_problems() {
  std::vector<std::pair<std::string, MoeProblem>> out;
  for (const std::string set : {"mixtral-tiny", "granitemoe-tiny", "granitemoeshared-tiny"}) {
    const auto ckpt = io::HfCheckpoint::open(test::testdata_dir() / set / "hf_save_pretrained");
    const auto ref = io::SafetensorsFile::open(test::testdata_dir() / set / (set + "-ref.safetensors"));
    for (int layer = 0; layer < ckpt.config().num_layers; ++layer) {
      const std::string pre = "layers." + std::to_string(layer) + ".";
      const auto w = io::load_moe_layer<float>(ckpt, layer);  // bf16 on disk: exact in float
      MoeProblem p = test::problem_from_weights(w, int(ckpt.config().top_k));
      p.x = test::round_bf16(flat(io::to_host_view<float>(ref.tensor(pre + "x"))));
      p.dy = test::round_bf16(flat(io::to_host_view<float>(ref.tensor(pre + "dy"))));
      p.tokens = std::int64_t(p.x.size()) / p.hidden;
      out.emplace_back(set + " layer " + std::to_string(layer), std::move(p));
    }
  }
  return out;
}

const char* impl_name(moe::ExpertImpl i) { return i == moe::ExpertImpl::Scatter ? "scatter" : "padded"; }

// ---- tests -------------------------------------------------------------------------------------------------------

TEST(CudaMoeLayer, MatchesPortableCudaLayerOnTestdataAndRandomShapes) {
  KMOE_REQUIRE_GPU();
  struct Case {
    std::string name;
    MoeProblem p;
    int dead;  // the last `dead` experts must get no token
  };
  std::vector<Case> cases;
  for (auto& [name, p] : testdata_problems()) cases.push_back({name, std::move(p), 0});
  cases.push_back({"random T=777 H=256 F=64 E=64 k=8 dead=8", random_problem(777, 256, 64, 64, 8, 8, 0, 4321), 8});
  cases.push_back({"random T=333 H=128 F=96 E=64 k=8 dead=4 S=64", random_problem(333, 128, 96, 64, 8, 4, 64, 4322), 4});
  for (const auto& [name, p, dead] : cases)
    for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) {
      const std::string label = name + " " + impl_name(impl);
      SCOPED_TRACE(label);
      const LayerRun portable = run_layer<float>(p, impl);
      for (auto gemm : {core::GemmAlgo::Kokkos, core::GemmAlgo::Blas}) {  // kmoe's kernel, cuBLAS
        const LayerRun hand = run_layer<bf16>(p, impl, gemm);
        expect_close(label + (gemm == core::GemmAlgo::Blas ? " cublas" : " kernel") + " bf16 vs portable fp32", hand,
                     portable, 1e-2);
        for (int e = p.experts - dead; e < p.experts; ++e)
          EXPECT_EQ(hand.counts[e], 0) << "expert " << e << " should have no tokens";
      }
    }
}

TEST(CudaMoeLayer, ChoosesTheHandWrittenBlock) {
  KMOE_REQUIRE_GPU();
  const MoeProblem p = random_problem(64, 32, 16, 4, 2, 0, 0, 5);
  Bf16Layer scatter(weights_of<bf16>(p), options_of(p, moe::ExpertImpl::Scatter, core::GemmAlgo::Auto));
  Bf16Layer padded(weights_of<bf16>(p), options_of(p, moe::ExpertImpl::Padded, core::GemmAlgo::Kokkos));
  EXPECT_STREQ(scatter.forward_region(), "kmoe::moe::forward[cuda,scattered]");
  EXPECT_STREQ(padded.forward_region(), "kmoe::moe::forward[cuda,padded]");
  const auto x = device_view<Bf16Layer::matrix>("x", p.x, p.tokens, p.hidden);
  EXPECT_STREQ(padded.gemm_engine(), "") << "no forward yet";
  padded.forward(x);
  EXPECT_STREQ(padded.gemm_engine(), "kernel");
  scatter.forward(x);
  EXPECT_STRNE(scatter.gemm_engine(), "cublas") << "Auto takes CUTLASS or kmoe's kernel on small experts";
  EXPECT_EQ(padded.routing().plan.block, core::cuda::kGemmTileRows);
  // The padded plan pads each expert to 128 rows (a multiple of options.block = 32).
  for (std::size_t e = 0; e < padded.expert_counts().size(); ++e) {
    const auto& off = padded.routing().plan.padded_offsets_host;
    EXPECT_EQ((off[e + 1] - off[e]) % 128, 0);
    EXPECT_GE(off[e + 1] - off[e], padded.expert_counts()[e]);
  }
}

TEST(CudaMoeLayer, WorkspaceReusedAcrossShapesAndCountsOnRequest) {
  KMOE_REQUIRE_GPU();
  const MoeProblem big = random_problem(400, 64, 32, 8, 2, 0, 24, 11);
  Bf16Layer layer(weights_of<bf16>(big), options_of(big, moe::ExpertImpl::Scatter, core::GemmAlgo::Kokkos));
  auto rows = [&](std::int64_t t) {
    MoeProblem p = big;
    p.tokens = t;
    p.x.resize(t * p.hidden);
    p.dy.resize(t * p.hidden);
    return p;
  };
  const void* first = nullptr;
  for (std::int64_t t : {400, 123, 400, 1, 0, 400}) {
    SCOPED_TRACE("T=" + std::to_string(t));
    const MoeProblem p = rows(t);
    const auto x = device_view<Bf16Layer::matrix>("x", p.x, p.tokens, p.hidden);
    const auto dy = device_view<Bf16Layer::matrix>("dy", p.dy, p.tokens, p.hidden);
    const auto y = layer.forward(x);
    const auto g = layer.backward(dy);
    if (t == 400 && !first) first = layer.router_logits().data();
    if (t == 400) EXPECT_EQ(layer.router_logits().data(), first) << "the workspace was reallocated";
    // A fresh layer on the same input: same bits (nothing left over from the previous, larger shape).
    Bf16Layer fresh(weights_of<bf16>(big), layer.options());
    const auto y2 = fresh.forward(x);
    const auto g2 = fresh.backward(dy);
    EXPECT_EQ(host_bytes(y), host_bytes(y2));
    EXPECT_EQ(host_bytes(g.dx), host_bytes(g2.dx));
    moe::for_each_weight_pair(g.grads, g2.grads, [](const auto& a, const auto& c, const char* name) {
      EXPECT_EQ(host_bytes(a), host_bytes(c)) << name;
    });
    // Counts: a histogram of topk_idx, summing to T*k.
    auto idx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().topk_idx);
    std::vector<std::int64_t> hist(big.experts, 0);
    for (std::size_t i = 0; i < idx.span(); ++i) ++hist[idx.data()[i]];
    EXPECT_EQ(layer.expert_counts(), hist);
    if (t == 0) {
      for (double v : host_f64(g.grads.w1)) EXPECT_EQ(v, 0.0);
      for (double v : host_f64(g.grads.shared_w2)) EXPECT_EQ(v, 0.0);
    }
  }
}

TEST(CudaMoeLayer, InputAndUsageErrors) {
  KMOE_REQUIRE_GPU();
  const MoeProblem p = random_problem(16, 32, 16, 4, 2, 0, 0, 3);
  const auto w = weights_of<bf16>(p);
  auto opt = options_of(p, moe::ExpertImpl::Padded, core::GemmAlgo::Auto);
  Bf16Layer layer(w, opt);
  Bf16Layer::matrix bad_x("x", 16, 24), x("x", 16, 32), bad_dy("dy", 15, 32);
  EXPECT_THROW(layer.forward(bad_x), InputError);
  EXPECT_THROW(layer.backward(x), InputError);  // no forward yet
  Bf16Layer::matrix bad_y("y", 15, 32);
  EXPECT_THROW(layer.forward(x, bad_y), InputError);
  layer.forward(x);
  EXPECT_THROW(layer.backward(bad_dy), InputError);
  auto wrong = layer.backward(x);
  // one backward per forward: the first consumed the saved activations (the block's backward scratch)
  EXPECT_THROW(layer.backward(x), InputError);
  layer.forward(x);
  wrong.grads.w2 = moe::MoeViews<float, Cuda>::tensor3("w2", 4, 32, 8);
  EXPECT_THROW(layer.backward(x, wrong), InputError);
  opt.block = 48;
  EXPECT_THROW(Bf16Layer(w, opt), UsageError);
  opt.block = 32;
  opt.top_k = 5;
  EXPECT_THROW(Bf16Layer(w, opt), InputError);
  // hidden not a multiple of 8 (the kernels read 16-byte rows)
  const MoeProblem odd = random_problem(4, 12, 16, 4, 2, 0, 0, 4);
  EXPECT_THROW(Bf16Layer(weights_of<bf16>(odd), options_of(odd, moe::ExpertImpl::Scatter, core::GemmAlgo::Auto)),
               InputError);
  // a slice of the experts runs through the stages, which the bf16 layer does not have
  auto slice = w;
  slice.w1 = Kokkos::subview(w.w1, std::make_pair(0, 2), Kokkos::ALL, Kokkos::ALL);
  slice.w3 = Kokkos::subview(w.w3, std::make_pair(0, 2), Kokkos::ALL, Kokkos::ALL);
  slice.w2 = Kokkos::subview(w.w2, std::make_pair(0, 2), Kokkos::ALL, Kokkos::ALL);
  Bf16Layer part(slice, options_of(p, moe::ExpertImpl::Scatter, core::GemmAlgo::Auto));
  EXPECT_THROW(part.forward(x), InputError);
}

// layer_from_checkpoint loads a bf16 checkpoint straight into the bf16 layer.
TEST(CudaMoeLayer, FromCheckpoint) {
  KMOE_REQUIRE_GPU();
  const auto ckpt = io::HfCheckpoint::open(test::testdata_dir() / "granitemoeshared-tiny" / "hf_save_pretrained");
  moe::MoeOptions opt;
  opt.top_k = 0;
  auto layer = moe::layer_from_checkpoint<bf16, Cuda>(ckpt, 0, opt);
  EXPECT_EQ(layer.options().top_k, ckpt.config().top_k);
  EXPECT_TRUE(layer.weights().has_shared());
}

}  // namespace
