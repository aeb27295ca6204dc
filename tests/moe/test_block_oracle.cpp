// MoeLayer and `kmoe block` against the transformers oracle (KMOE_TESTDATA_DIR): every layer of every set, both
// expert paths, Serial and OpenMP, float64 (1e-10 of the *_f64 tensors; 1e-6 of transformers' own where no twin
// exists) and float32 (1e-5), topk_idx exact. Then the command: its output file, and its errors.
#include "kernel_test_util.hpp"
#include "kmoe_test.hpp"

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/checkpoint.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <filesystem>
#include <fstream>
#include <type_traits>
#include <string>
#include <vector>

namespace {

using namespace kmoe;
namespace fs = std::filesystem;
using HostM = Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>;

const std::vector<std::string>& sets() {
  // Every family of the oracle: the portable layer runs all their routing, expert and shared-expert variants.
  static const std::vector<std::string> s = {"mixtral-tiny",   "granitemoe-tiny",       "granitemoeshared-tiny",
                                             "qwen3_moe-tiny", "granitemoehybrid-tiny", "olmoe-tiny",
                                             "qwen2_moe-tiny", "deepseek_v3-tiny",      "gpt_oss-tiny"};
  return s;
}

struct Oracle {
  io::HfCheckpoint checkpoint;
  io::SafetensorsFile ref;
  explicit Oracle(const std::string& set)
      : checkpoint(io::HfCheckpoint::open(test::testdata_dir() / set / "hf_save_pretrained")),
        ref(io::SafetensorsFile::open(test::testdata_dir() / set / (set + "-ref.safetensors"))) {}
  /// The reference for `name`: its float64 re-implementation twin when the set has one (tolerance f64_tol), else
  /// transformers' own tensor (1e-6: its router ran in float32).
  std::pair<std::vector<double>, double> expected(const std::string& name, double f64_tol) const {
    const bool twin = ref.has(name + "_f64");
    auto v = io::to_host_view<double>(ref.tensor(twin ? name + "_f64" : name));
    return {std::vector<double>(v.data(), v.data() + v.extent(0)), twin ? f64_tol : 1e-6};
  }
};

double rel_err(const double* got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

/// Largest relative error seen per precision against the *_f64 twins (printed at the end, for the record), overall
/// and per set.
double worst_twin_err[2] = {0, 0};
std::map<std::string, std::array<double, 2>> worst_per_set;

template <class T, class Space>
void check_layer(const std::string& set, const Oracle& o, int layer, moe::ExpertImpl impl, double f64_tol) {
  const std::string p = "layers." + std::to_string(layer) + ".";
  moe::MoeOptions opt;
  opt.top_k = 0;
  opt.impl = impl;
  opt.block = 4;
  auto moe_layer = moe::layer_from_checkpoint<T, Space>(o.checkpoint, layer, opt);
  auto xr = io::to_host_view<double>(o.ref.tensor(p + "x"));
  auto dyr = io::to_host_view<double>(o.ref.tensor(p + "dy"));
  const std::int64_t hidden = moe_layer.weights().hidden(), tokens = xr.extent(0) / hidden;
  typename moe::MoeViews<T, Space>::matrix x("x", tokens, hidden), dy("dy", tokens, hidden);
  for (std::size_t i = 0; i < x.span(); ++i) {
    x.data()[i] = T(xr(i));
    dy.data()[i] = T(dyr(i));
  }
  auto y = moe_layer.forward(x);
  auto g = moe_layer.backward(dy);
  auto idx_ref = io::to_host_view<std::int64_t>(o.ref.tensor(p + "topk_idx"));
  const auto& idx = moe_layer.routing().topk_idx;
  ASSERT_EQ(idx.span(), idx_ref.extent(0));
  for (std::size_t i = 0; i < idx.span(); ++i) EXPECT_EQ(idx.data()[i], idx_ref(i)) << "topk_idx entry " << i;
  auto compare = [&](const std::string& name, const auto& view) {
    auto [want, tol] = o.expected(p + name, f64_tol);
    ASSERT_EQ(view.span(), want.size()) << name;
    std::vector<double> got(view.data(), view.data() + view.span());
    const double err = rel_err(got.data(), want);
    EXPECT_LE(err, tol) << name;
    if (tol == f64_tol) {
      const int prec = std::is_same<T, double>::value ? 0 : 1;
      worst_twin_err[prec] = std::max(worst_twin_err[prec], err);
      worst_per_set[set][prec] = std::max(worst_per_set[set][prec], err);
    }
  };
  compare("router_logits", moe_layer.router_logits());
  compare("router_probs", moe_layer.routing().probs);
  compare("topk_weight", moe_layer.routing().topk_weight);
  compare("y", y);
  compare("dx", g.dx);
  compare("grad.gate", g.grads.router);
  compare("grad.w1", g.grads.w1);
  compare("grad.w3", g.grads.w3);
  compare("grad.w2", g.grads.w2);
  if (moe_layer.weights().has_shared()) {
    compare("grad.shared_w1", g.grads.shared_w1);
    compare("grad.shared_w3", g.grads.shared_w3);
    compare("grad.shared_w2", g.grads.shared_w2);
  }
  // The optional tensors: each family's reference has exactly the gradients of the tensors it has.
  const auto& w = moe_layer.weights();
  EXPECT_EQ(w.has_router_bias(), o.ref.has(p + "grad.router_bias"));
  EXPECT_EQ(w.has_expert_biases(), o.ref.has(p + "grad.w1_bias"));
  EXPECT_EQ(w.has_shared_gate(), o.ref.has(p + "grad.shared_gate"));
  EXPECT_EQ(w.has_score_bias(), o.ref.has(p + "score_bias"));
  if (w.has_router_bias()) compare("grad.router_bias", g.grads.router_bias);
  if (w.has_expert_biases()) {
    compare("grad.w1_bias", g.grads.w1_bias);
    compare("grad.w3_bias", g.grads.w3_bias);
    compare("grad.w2_bias", g.grads.w2_bias);
  }
  if (w.has_shared_gate()) compare("grad.shared_gate", g.grads.shared_gate);
  if (w.has_score_bias()) {  // loaded exactly as stored
    auto want = io::to_host_view<double>(o.ref.tensor(p + "score_bias"));
    for (std::size_t i = 0; i < want.extent(0); ++i) EXPECT_EQ(double(w.score_bias(i)), want(i)) << "score_bias " << i;
  }
}

TEST(BlockOracle, EveryLayerOfEverySetBothPathsBothSpacesBothPrecisions) {
  for (const auto& set : sets()) {
    const Oracle o(set);
    const auto& layers = o.checkpoint.config().moe_layers;
    ASSERT_FALSE(layers.empty()) << set;
    for (int layer : layers) {
      for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) {
        SCOPED_TRACE(::testing::Message() << set << " layer " << layer
                                          << (impl == moe::ExpertImpl::Scatter ? " scatter" : " padded"));
        check_layer<double, Kokkos::Serial>(set, o, layer, impl, 1e-10);
        check_layer<float, Kokkos::Serial>(set, o, layer, impl, 1e-5);
#ifdef KOKKOS_ENABLE_OPENMP
        check_layer<double, Kokkos::OpenMP>(set, o, layer, impl, 1e-10);
        check_layer<float, Kokkos::OpenMP>(set, o, layer, impl, 1e-5);
#endif
      }
    }
  }
  for (const auto& [set, err] : worst_per_set)
    std::printf("%-24s largest relative L2 error vs the *_f64 tensors: float64 %.3g, float32 %.3g\n", set.c_str(),
                err[0], err[1]);
  std::printf("largest relative L2 error vs the *_f64 tensors: float64 %.3g, float32 %.3g\n", worst_twin_err[0],
              worst_twin_err[1]);
}

TEST(BlockOracle, TheBf16CudaBlockRefusesTheVariantsItDoesNotRun) {
  // The bf16 layer is the hand-written CUDA block, which runs the Mixtral/Granite math only: its constructor's
  // argument check (shared with the portable layer, so tested here on the host) refuses the other families by name.
  using S = Kokkos::Serial;
  const std::vector<std::pair<std::string, std::string>> refused = {
      {"olmoe-tiny", "OlmoeForCausalLM need(s) routing: softmax, top-k, no renormalisation"},
      {"qwen2_moe-tiny", "a sigmoid-gated shared expert"},
      {"deepseek_v3-tiny", "routing: sigmoid, group-limited top-k"},
      {"deepseek_v3-tiny", "a selection bias"},
      {"gpt_oss-tiny", "a router bias"},
      {"gpt_oss-tiny", "experts: clamped swiglu (alpha 1.702, limit 7, up + 1)"},
      {"gpt_oss-tiny", "expert biases"}};
  for (const auto& [set, part] : refused) {
    const Oracle o(set);
    const int layer = o.checkpoint.config().moe_layers.front();
    moe::MoeOptions opt;
    opt.top_k = o.checkpoint.config().top_k;
    const auto w = moe::load_weights<bf16, S>(o.checkpoint, layer);
    try {
      moe::detail::check_layer_arguments(w, opt);
      ADD_FAILURE() << set << " was not refused";
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("MoeLayer<bf16, Kokkos::Cuda>"), std::string::npos) << e.what();
    }
  }
  for (const std::string set : {"mixtral-tiny", "granitemoeshared-tiny", "qwen3_moe-tiny", "granitemoehybrid-tiny"}) {
    const Oracle o(set);
    moe::MoeOptions opt;
    opt.top_k = o.checkpoint.config().top_k;
    EXPECT_NO_THROW(moe::detail::check_layer_arguments(
        moe::load_weights<bf16, S>(o.checkpoint, o.checkpoint.config().moe_layers.front()), opt))
        << set;
  }
}

TEST(BlockOracle, AnotherActivationIsRefused) {
  // The experts' activation is built on silu: a checkpoint whose config says otherwise is refused by name.
  test::ScratchDir dir("block_gelu");
  const fs::path src = test::testdata_dir() / "mixtral-tiny" / "hf_save_pretrained", dst = dir.path() / "ckpt";
  fs::copy(src, dst);
  fs::permissions(dst, fs::perms::owner_all, fs::perm_options::add);
  const fs::path config = dst / "config.json";
  fs::permissions(config, fs::perms::owner_write, fs::perm_options::add);
  std::string text = test::read_file_bytes(config);
  const auto at = text.find("\"silu\"");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 6, "\"gelu\"");
  std::ofstream(config, std::ios::binary | std::ios::trunc) << text;
  const auto ckpt = io::HfCheckpoint::open(dst);
  try {
    moe::layer_from_checkpoint<double, Kokkos::Serial>(ckpt, 0, moe::MoeOptions{0});
    ADD_FAILURE() << "gelu was not refused";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("hidden_act \"gelu\""), std::string::npos) << e.what();
  }
}

TEST(BlockOracle, LayerOutOfRangeIsAnInputError) {
  const Oracle o("mixtral-tiny");
  using S = Kokkos::Serial;
  const moe::MoeOptions from_config{0};
  EXPECT_THROW((moe::layer_from_checkpoint<double, S>(o.checkpoint, 2, from_config)), InputError);
  EXPECT_THROW((moe::layer_from_checkpoint<double, S>(o.checkpoint, -1, from_config)), InputError);
}

// ---- the command ---------------------------------------------------------------------------------------------

std::string block_args(const std::string& set, int layer, const fs::path& out, const std::string& extra = "") {
  const fs::path d = test::testdata_dir() / set;
  return "block --checkpoint " + (d / "hf_save_pretrained").string() + " --layer " + std::to_string(layer) +
         " --inputs " + (d / (set + "-ref.safetensors")).string() + " --out " + out.string() + " " + extra;
}

TEST(BlockCommand, WritesTheReferenceNamesAndShapes) {
  test::ScratchDir dir("block_cmd");
  const std::vector<std::string> common = {"router_logits", "topk_weight", "y",       "dx",
                                           "grad.gate",     "grad.w1",     "grad.w3", "grad.w2"};
  const std::vector<std::pair<std::string, std::vector<std::string>>> sets = {
      {"granitemoeshared-tiny", {"grad.shared_w1", "grad.shared_w3", "grad.shared_w2"}},
      {"gpt_oss-tiny", {"grad.router_bias", "grad.w1_bias", "grad.w3_bias", "grad.w2_bias"}},
      {"qwen2_moe-tiny", {"grad.shared_w1", "grad.shared_w3", "grad.shared_w2", "grad.shared_gate"}}};
  for (const auto& [set, extras] : sets)
  for (const std::string extra : {"", "--impl padded --precision f32 --backend serial"}) {
    SCOPED_TRACE(set + " " + extra);
    const fs::path out = dir.path() / "out.safetensors";
    auto r = test::run_kmoe(block_args(set, 1, out, extra));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const Oracle o(set);
    auto got = io::SafetensorsFile::open(out);
    const double tol = extra.empty() ? 1e-10 : 1e-5;
    std::vector<std::string> names = common;
    names.insert(names.end(), extras.begin(), extras.end());
    EXPECT_EQ(got.names().size(), names.size() + 1) << "the names above and topk_idx, nothing else";
    for (const std::string& name : names) {
      const auto& t = got.tensor("layers.1." + name);
      EXPECT_EQ(t.dtype, io::DType::F64) << name;
      const auto& want_t = o.ref.tensor("layers.1." + name);
      EXPECT_EQ(t.shape, want_t.shape) << name;
      auto [want, want_tol] = o.expected("layers.1." + name, tol);
      auto v = io::to_host_view<double>(t);
      EXPECT_LE(rel_err(v.data(), want), want_tol) << name << " " << extra;
    }
    const auto& idx = got.tensor("layers.1.topk_idx");
    EXPECT_EQ(idx.dtype, io::DType::I64);
    auto a = io::to_host_view<std::int64_t>(idx);
    auto b = io::to_host_view<std::int64_t>(o.ref.tensor("layers.1.topk_idx"));
    ASSERT_EQ(a.extent(0), b.extent(0));
    for (std::size_t i = 0; i < a.extent(0); ++i) EXPECT_EQ(a(i), b(i));
  }
}

TEST(BlockCommand, ClearErrors) {
  test::ScratchDir dir("block_err");
  const fs::path out = dir.path() / "out.safetensors";
  auto r = test::run_kmoe(block_args("mixtral-tiny", 2, out));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("out of range"), std::string::npos) << r.err;
  // Inputs of the wrong hidden size: granite's x (hidden 64) is fine, so write a file with hidden 63.
  const fs::path bad = dir.path() / "bad.safetensors";
  Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace> x("x", 3, 63);
  io::write_safetensors(bad, {io::tensor_from_host_view("layers.0.x", x), io::tensor_from_host_view("layers.0.dy", x)});
  r = test::run_kmoe("block --checkpoint " + (test::testdata_dir() / "mixtral-tiny" / "hf_save_pretrained").string() +
                     " --layer 0 --inputs " + bad.string() + " --out " + out.string());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("layers.0.x"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("[3, 63]"), std::string::npos) << r.err;
  r = test::run_kmoe(block_args("mixtral-tiny", 0, out, "--impl dense"));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = test::run_kmoe("block --layer 0");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
