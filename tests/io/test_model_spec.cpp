// Model specs: checkpoint names <-> kmoe layout for Mixtral, GraniteMoe and GraniteMoeShared. The loaded weights are
// checked by running the MoE formula in double against the oracle's float64 outputs (so a swapped W1/W3, a transposed
// matrix or a wrong expert would fail), and the reverse map reproduces the checkpoint bytes exactly.
#include <kmoe/io/model_spec.hpp>

#include "io_test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

using namespace kmoe::io;
using kmoe::test::hf_dir;

double silu(double v) { return v / (1.0 + std::exp(-v)); }

double rel_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

/// y = sum_k w_k W2[e_k] (silu(W1[e_k] x) * W3[e_k] x) (+ shared expert), with the oracle's routing; GPT-OSS's
/// experts are the clamped SwiGLU with biases, Qwen2-MoE's shared expert is scaled by sigmoid(shared_gate x).
void check_layer_against_oracle(const std::string& set, int layer) {
  SCOPED_TRACE(set + " layer " + std::to_string(layer));
  const auto ck = HfCheckpoint::open(hf_dir(set));
  const ModelSpec& spec = spec_for(ck.config().architecture);
  const bool clamped = spec.expert == ExpertVariant::ClampedSwiGLU;
  const double limit = ck.config().swiglu_limit;
  const auto w = load_moe_layer<double>(ck, layer);
  const auto ref = SafetensorsFile::open(kmoe::test::testdata_dir() / set / (set + "-ref.safetensors"));
  const std::string p = "layers." + std::to_string(layer) + ".";
  const auto x = to_host_view<double>(ref.tensor(p + "x"));
  const auto idx = to_host_view_2d<std::int64_t>(ref.tensor(p + "topk_idx"));
  const auto wt = to_host_view_2d<double>(ref.tensor(p + "topk_weight_f64"));
  const auto y_ref = to_host_view<double>(ref.tensor(p + "y_f64"));
  const auto logits_ref = to_host_view_2d<double>(ref.tensor(p + "router_logits"));
  const std::int64_t E = w.router.extent(0), H = w.router.extent(1), F = w.w1.extent(1), S = w.shared_w1.extent(0);
  const std::int64_t N = static_cast<std::int64_t>(x.extent(0)) / H;
  ASSERT_EQ(static_cast<std::int64_t>(idx.extent(0)), N);
  EXPECT_EQ(w.router_bias.extent(0) != 0, spec.router_bias.present());
  EXPECT_EQ(w.w1_bias.extent(0) != 0, spec.has_expert_biases());
  EXPECT_EQ(w.shared_gate.extent(0) != 0, spec.shared_variant() == SharedVariant::SigmoidGated);
  if (ref.has(p + "score_bias")) {  // the selection bias as stored (F32 on disk)
    const auto sb = to_host_view<double>(ref.tensor(p + "score_bias"));
    ASSERT_EQ(w.score_bias.extent(0), sb.extent(0));
    for (std::size_t e = 0; e < sb.extent(0); ++e) EXPECT_EQ(w.score_bias(e), sb(e));
  } else {
    EXPECT_EQ(w.score_bias.extent(0), 0u);
  }
  std::vector<double> y(static_cast<std::size_t>(N * H), 0.0), yr(y.size()), logits, lref;
  for (std::int64_t n = 0; n < N; ++n) {
    const double* xn = x.data() + n * H;
    for (std::int64_t e = 0; e < E; ++e) {
      double l = w.router_bias.extent(0) ? w.router_bias(e) : 0.0;
      for (std::int64_t h = 0; h < H; ++h) l += w.router(e, h) * xn[h];
      logits.push_back(l);
      lref.push_back(logits_ref(n, e));
    }
    for (std::size_t k = 0; k < idx.extent(1); ++k) {
      const std::int64_t e = idx(n, k);
      std::vector<double> out(static_cast<std::size_t>(H), 0.0);
      for (std::int64_t f = 0; f < F; ++f) {
        double a = clamped ? w.w1_bias(e, f) : 0.0, b = clamped ? w.w3_bias(e, f) : 0.0;
        for (std::int64_t h = 0; h < H; ++h) {
          a += w.w1(e, f, h) * xn[h];
          b += w.w3(e, f, h) * xn[h];
        }
        double g;
        if (clamped) {
          a = std::min(a, limit);
          b = std::max(-limit, std::min(b, limit));
          g = (b + 1.0) * a / (1.0 + std::exp(-1.702 * a));
        } else {
          g = silu(a) * b;
        }
        for (std::int64_t h = 0; h < H; ++h) out[static_cast<std::size_t>(h)] += w.w2(e, h, f) * g;
      }
      for (std::int64_t h = 0; h < H; ++h)
        y[static_cast<std::size_t>(n * H + h)] += wt(n, k) * (out[static_cast<std::size_t>(h)] + (clamped ? w.w2_bias(e, h) : 0.0));
    }
    double gate = 1.0;
    if (w.shared_gate.extent(0)) {
      double z = 0;
      for (std::int64_t h = 0; h < H; ++h) z += w.shared_gate(0, h) * xn[h];
      gate = 1.0 / (1.0 + std::exp(-z));
    }
    for (std::int64_t s = 0; s < S; ++s) {
      double a = 0, b = 0;
      for (std::int64_t h = 0; h < H; ++h) {
        a += w.shared_w1(s, h) * xn[h];
        b += w.shared_w3(s, h) * xn[h];
      }
      const double g = silu(a) * b * gate;
      for (std::int64_t h = 0; h < H; ++h) y[static_cast<std::size_t>(n * H + h)] += w.shared_w2(h, s) * g;
    }
  }
  for (std::size_t i = 0; i < y.size(); ++i) yr[i] = y_ref(i);
  EXPECT_LT(rel_l2(y, yr), 1e-10);
  EXPECT_LT(rel_l2(logits, lref), 1e-5);  // transformers' router runs in float32
}

TEST(ModelSpec, LoadedLayersReproduceTheOraclesMoeOutput) {
  for (const auto& set : kmoe::test::testdata_sets()) {
    const auto ck = HfCheckpoint::open(hf_dir(set));
    ASSERT_FALSE(ck.config().moe_layers.empty()) << set;
    for (int layer : ck.config().moe_layers) check_layer_against_oracle(set, layer);
  }
}

TEST(ModelSpec, ShapesAndSharedExpert) {
  const auto m = load_moe_layer<float>(HfCheckpoint::open(hf_dir("mixtral-tiny")), 1);
  EXPECT_EQ(m.w1.extent(0), 8u);
  EXPECT_EQ(m.w1.extent(1), 96u);
  EXPECT_EQ(m.w1.extent(2), 64u);
  EXPECT_EQ(m.w2.extent(1), 64u);
  EXPECT_EQ(m.w2.extent(2), 96u);
  EXPECT_FALSE(m.has_shared_expert());
  const auto s = load_moe_layer<float>(HfCheckpoint::open(hf_dir("granitemoeshared-tiny")), 0);
  EXPECT_TRUE(s.has_shared_expert());
  EXPECT_EQ(s.shared_w1.extent(0), 72u);
  EXPECT_EQ(s.shared_w2.extent(0), 64u);
  EXPECT_EQ(s.shared_w2.extent(1), 72u);
  // Granite: W1 = first F rows of input_linear, W3 = the next F rows, per expert.
  const auto ck = HfCheckpoint::open(hf_dir("granitemoe-tiny"));
  const auto g = load_moe_layer<float>(ck, 0);
  const auto fused = to_host_view_3d<float>(ck.tensor("model.layers.0.block_sparse_moe.input_linear.weight"));
  EXPECT_EQ(g.w1(5, 47, 63), fused(5, 47, 63));
  EXPECT_EQ(g.w3(5, 0, 0), fused(5, 48, 0));
  EXPECT_EQ(g.w3(2, 47, 1), fused(2, 95, 1));
}

TEST(ModelSpec, ReverseMapReproducesTheCheckpointBytes) {
  for (const auto& set : kmoe::test::testdata_sets()) {
    const auto ck = HfCheckpoint::open(hf_dir(set));
    const ModelSpec& spec = spec_for(ck.config().architecture);
    EXPECT_EQ(find_moe_layers(ck, spec), ck.config().moe_layers) << set;
    for (int layer : ck.config().moe_layers) {
      SCOPED_TRACE(set + " layer " + std::to_string(layer));
      const auto expected = moe_layer_tensors(spec, ck.config(), layer);
      auto check = [&](const std::vector<NamedTensorBytes>& out) {
        ASSERT_EQ(out.size(), expected.size());
        for (std::size_t i = 0; i < out.size(); ++i) {
          const auto& t = ck.tensor(out[i].name);
          EXPECT_EQ(out[i].name, expected[i].name);
          EXPECT_EQ(out[i].shape, t.shape) << out[i].name;
          EXPECT_EQ(out[i].dtype, t.dtype) << out[i].name;
          ASSERT_EQ(out[i].owned.size(), t.nbytes) << out[i].name;
          EXPECT_EQ(0, std::memcmp(out[i].owned.data(), t.data, t.nbytes)) << out[i].name;
        }
      };
      check(moe_layer_to_checkpoint(spec, layer, load_moe_layer<kmoe::bf16>(ck, layer), DType::BF16));
      check(moe_layer_to_checkpoint(spec, layer, load_moe_layer<float>(ck, layer), DType::BF16));
      check(moe_layer_to_checkpoint(spec, layer, load_moe_layer<double>(ck, layer), DType::BF16));
    }
    // The MoE layers' tensors are exactly the checkpoint's MoE tensors: nothing of a MoE block is left out (it would
    // be lost on conversion) and nothing else (a dense layer's MLP, attention, Mamba) is taken for one.
    std::size_t expected = 0, moe = 0;
    for (int layer : ck.config().moe_layers) expected += moe_layer_tensors(spec, ck.config(), layer).size();
    for (const auto& n : ck.tensor_names()) {
      int l = -1;
      if (!is_moe_tensor(spec, n, &l)) continue;
      ++moe;
      const auto& layers = ck.config().moe_layers;
      EXPECT_NE(std::find(layers.begin(), layers.end(), l), layers.end()) << set << ": " << n;
    }
    EXPECT_EQ(moe, expected) << set;
  }
}

TEST(ModelSpec, NamesLayersAndMoeTensors) {
  const auto ck = HfCheckpoint::open(hf_dir("mixtral-tiny"));
  const ModelSpec& spec = spec_for("MixtralForCausalLM");
  const auto names = moe_layer_tensors(spec, ck.config(), 1);
  ASSERT_EQ(names.size(), 25u);
  EXPECT_EQ(names[0].name, "model.layers.1.block_sparse_moe.gate.weight");
  EXPECT_EQ(names[0].shape, (std::vector<std::int64_t>{8, 64}));
  EXPECT_EQ(names[1].name, "model.layers.1.block_sparse_moe.experts.0.w1.weight");
  EXPECT_EQ(names[1].shape, (std::vector<std::int64_t>{96, 64}));
  EXPECT_EQ(names[3].shape, (std::vector<std::int64_t>{64, 96}));
  int layer = -1;
  EXPECT_TRUE(is_moe_tensor(spec, "model.layers.1.block_sparse_moe.experts.7.w2.weight", &layer));
  EXPECT_EQ(layer, 1);
  EXPECT_FALSE(is_moe_tensor(spec, "model.layers.0.self_attn.q_proj.weight"));
  EXPECT_FALSE(is_moe_tensor(spec, "model.layers.0.block_sparse_moeXgate.weight"));
  EXPECT_EQ(find_moe_layers(ck, spec), (std::vector<int>{0, 1}));
  int moe = 0;
  for (const auto& n : ck.tensor_names()) moe += is_moe_tensor(spec, n);
  EXPECT_EQ(moe, 50);
  const auto sh = HfCheckpoint::open(hf_dir("granitemoeshared-tiny"));
  const auto& gs = spec_for("GraniteMoeSharedForCausalLM");
  const auto st = moe_layer_tensors(gs, sh.config(), 0);
  ASSERT_EQ(st.size(), 5u);
  EXPECT_EQ(st[1].name, "model.layers.0.block_sparse_moe.input_linear.weight");
  EXPECT_EQ(st[1].shape, (std::vector<std::int64_t>{8, 80, 64}));
  EXPECT_EQ(st[3].name, "model.layers.0.shared_mlp.input_linear.weight");
  EXPECT_EQ(st[3].shape, (std::vector<std::int64_t>{144, 64}));
  EXPECT_TRUE(is_moe_tensor(gs, "model.layers.1.shared_mlp.output_linear.weight"));
  EXPECT_EQ(model_specs().size(), 9u);
}

TEST(ModelSpec, ClearErrors) {
  kmoe::test::expect_input_error([] { spec_for("LlamaForCausalLM"); },
                                 {"'LlamaForCausalLM'", "MixtralForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"});
  const auto ck = HfCheckpoint::open(hf_dir("granitemoe-tiny"));
  kmoe::test::expect_input_error([&] { load_moe_layer<double>(ck, 2); }, {"layer 2", "out of range"});
  // A config that disagrees with the tensors: the mis-shaped tensor is named with what was expected.
  ModelConfig c = ck.config();
  c.num_experts = 7;
  kmoe::test::expect_input_error(
      [&] { load_moe_layer<double>(ck, spec_for(c.architecture), c, 0); },
      {"'model.layers.0.block_sparse_moe.router.layer.weight' has shape [6, 64], expected [7, 64]",
       "model.layers.0.block_sparse_moe.input_linear.weight [7, 96, 64]"});
  // A checkpoint missing one MoE tensor.
  kmoe::test::ScratchDir tmp("spec-missing");
  std::vector<TensorToWrite> ts;
  std::vector<ShardEntry> plan;
  for (const auto& n : ck.tensor_names()) {
    if (n == "model.layers.0.block_sparse_moe.output_linear.weight") continue;
    ts.push_back(TensorToWrite::borrow(ck.tensor(n)));
    plan.push_back({n, "model.safetensors"});
  }
  write_checkpoint_tensors(tmp.path(), ts, plan, false);
  std::filesystem::copy_file(hf_dir("granitemoe-tiny") / "config.json", tmp.path() / "config.json");
  const auto broken = HfCheckpoint::open(tmp.path());
  kmoe::test::expect_input_error([&] { load_moe_layer<float>(broken, 0); },
                                 {"missing tensor 'model.layers.0.block_sparse_moe.output_linear.weight'", "expected:",
                                  "router.layer.weight [6, 64]", "output_linear.weight [6, 64, 48]"});
  EXPECT_EQ(find_moe_layers(broken, spec_for("GraniteMoeForCausalLM")), std::vector<int>{1});
  // Mixtral's per-expert names are folded in the list of what was expected.
  ModelConfig mc = read_model_config(hf_dir("mixtral-tiny") / "config.json");
  kmoe::test::expect_input_error([&] { load_moe_layer<float>(ck, spec_for("MixtralForCausalLM"), mc, 0); },
                                 {"missing tensor 'model.layers.0.block_sparse_moe.gate.weight'",
                                  "model.layers.0.block_sparse_moe.experts.{0..7}.w1.weight [96, 64]"});
  // The reverse map checks the weights' shapes.
  auto w = load_moe_layer<double>(ck, 0);
  w.w3 = decltype(w.w3)("w3", 6, 47, 64);
  kmoe::test::expect_input_error([&] { moe_layer_to_checkpoint(spec_for(c.architecture), 0, w, DType::BF16); },
                                 {"inconsistent shapes", "w3 [6, 47, 64]"});
}

}  // namespace
