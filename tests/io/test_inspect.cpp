// `kmoe inspect`: a file (tensors, dtypes, shapes, bytes, metadata) and a checkpoint directory (architecture, spec,
// MoE layers). Exit 0; bad input exits 1 (test_bad_input.cpp covers each malformation).
#include "io_test_util.hpp"

#include <string>
#include <utility>
#include <vector>

namespace {

using kmoe::test::run_kmoe;

TEST(Inspect, File) {
  const auto path = kmoe::test::hf_dir("granitemoe-tiny") / "model-00003-of-00006.safetensors";
  const auto r = run_kmoe("inspect " + path.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  EXPECT_NE(r.out.find("59160 bytes"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("metadata: format=pt"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tensors: 7"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("model.layers.0.block_sparse_moe.output_linear.weight  BF16   [6, 64, 48]  36864"),
            std::string::npos)
      << r.out;
}

TEST(Inspect, CheckpointDirectory) {
  for (const auto& set : kmoe::test::testdata_sets()) {
    const auto r = run_kmoe("inspect " + kmoe::test::hf_dir(set).string());
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const bool dsv3 = set == "deepseek_v3-tiny";  // its first layer is dense
    EXPECT_NE(r.out.find(dsv3 ? "MoE layers: 2 of 3 (1, 2); dense: 0\n" : "MoE layers: 2 of 2 (0, 1)\n"),
              std::string::npos)
        << r.out;
    EXPECT_NE(r.out.find("spec: "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("routing: "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("experts: "), std::string::npos) << r.out;
  }
  // Each family's routing and expert variants, as its config sets them.
  const std::vector<std::pair<std::string, std::vector<std::string>>> variants = {
      {"mixtral-tiny", {"routing: softmax, top-k, renormalise\n", "experts: swiglu; shared expert: none\n"}},
      {"granitemoeshared-tiny", {"routing: softmax, top-k, renormalise\n", "shared expert: plain\n"}},
      {"qwen2_moe-tiny", {"routing: softmax, top-k, no renormalisation\n", "shared expert: sigmoid-gated\n"}},
      {"qwen3_moe-tiny", {"routing: softmax, top-k, renormalise\n", "experts: swiglu; shared expert: none\n"}},
      {"olmoe-tiny", {"routing: softmax, top-k, no renormalisation\n"}},
      {"deepseek_v3-tiny",
       {"routing: sigmoid, group-limited top-k (4 groups, keep 2, group score = sum of top 2), renormalise (+1e-20), "
        "scale 2.5; selection bias (choice only)\n",
        "shared expert: plain\n"}},
      {"gpt_oss-tiny",
       {"routing: softmax, top-k of the logits, softmax over the k; router bias\n",
        "experts: clamped swiglu (gate <= 7, |up| <= 7, (up + 1) * gate * sigmoid(1.702 gate)), biases; shared expert: "
        "none\n"}},
      {"granitemoehybrid-tiny",
       {"routing: softmax, top-k, renormalise\n", "layer types: linear_attention full_attention\n"}},
  };
  for (const auto& [set, lines] : variants) {
    const auto r = run_kmoe("inspect " + kmoe::test::hf_dir(set).string());
    ASSERT_EQ(r.exit_code, 0) << r.err;
    for (const auto& line : lines) EXPECT_NE(r.out.find(line), std::string::npos) << set << ": " << line << r.out;
  }
  const auto r = run_kmoe("inspect " + kmoe::test::hf_dir("granitemoeshared-tiny").string());
  EXPECT_NE(r.out.find("architecture: GraniteMoeSharedForCausalLM (model_type granitemoeshared"), std::string::npos);
  EXPECT_NE(r.out.find("shared_intermediate_size 72"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("files: 7 shard(s) + model.safetensors.index.json; total_size 385664 bytes"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("model.layers.1.shared_mlp.output_linear.weight"), std::string::npos) << r.out;
  // The repository's own copy reads the same.
  EXPECT_EQ(run_kmoe("inspect " + kmoe::test::repo_data_dir().string() + "/granitemoe-tiny").exit_code, 0);
}

TEST(Inspect, UnknownArchitectureStillInspects) {
  kmoe::test::ScratchDir tmp("inspect-unknown");
  kmoe::test::copy_dir(kmoe::test::hf_dir("mixtral-tiny"), tmp.path());
  kmoe::test::write_bytes(tmp.path() / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})");
  const auto r = run_kmoe("inspect " + tmp.path().string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("spec: none (kmoe knows MixtralForCausalLM"), std::string::npos) << r.out;
}

}  // namespace
