// `kmoe inspect`: a file (tensors, dtypes, shapes, bytes, metadata) and a checkpoint directory (architecture, spec,
// MoE layers). Exit 0; bad input exits 1 (test_bad_input.cpp covers each malformation).
#include "io_test_util.hpp"

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
    EXPECT_NE(r.out.find("MoE layers: 2 of 2 (0, 1)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("spec: "), std::string::npos) << r.out;
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
