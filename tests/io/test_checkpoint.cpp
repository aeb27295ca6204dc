// Checkpoint directories: config.json, lookup across shards, the shard plan, and transformers' index json byte for
// byte; a whole checkpoint written back is identical to the oracle's.
#include <kmoe/io/checkpoint.hpp>

#include "io_test_util.hpp"

namespace {

using namespace kmoe::io;
using kmoe::test::file_bytes;
using kmoe::test::hf_dir;
using kmoe::test::ScratchDir;

TEST(Checkpoint, ReadsTheConfigFields) {
  const auto m = read_model_config(hf_dir("mixtral-tiny") / "config.json");
  EXPECT_EQ(m.architecture, "MixtralForCausalLM");
  EXPECT_EQ(m.model_type, "mixtral");
  EXPECT_EQ(m.hidden_act, "silu");
  EXPECT_EQ(m.dtype, "bfloat16");
  EXPECT_EQ(m.hidden_size, 64);
  EXPECT_EQ(m.intermediate_size, 96);
  EXPECT_EQ(m.num_experts, 8);
  EXPECT_EQ(m.top_k, 2);
  EXPECT_EQ(m.num_layers, 2);
  EXPECT_EQ(m.shared_intermediate_size, 0);
  const auto g = read_model_config(hf_dir("granitemoe-tiny") / "config.json");
  EXPECT_EQ(g.architecture, "GraniteMoeForCausalLM");
  EXPECT_EQ(g.intermediate_size, 48);
  EXPECT_EQ(g.num_experts, 6);
  EXPECT_EQ(g.shared_intermediate_size, 0);
  const auto s = read_model_config(hf_dir("granitemoeshared-tiny") / "config.json");
  EXPECT_EQ(s.architecture, "GraniteMoeSharedForCausalLM");
  EXPECT_EQ(s.model_type, "granitemoeshared");
  EXPECT_EQ(s.intermediate_size, 40);
  EXPECT_EQ(s.num_experts, 8);
  EXPECT_EQ(s.shared_intermediate_size, 72);
}

TEST(Checkpoint, ReadsEachFamilysKeysRoutingAndMoeLayers) {
  const auto q2 = read_model_config(hf_dir("qwen2_moe-tiny") / "config.json");
  EXPECT_EQ(q2.num_experts, 8);               // "num_experts"
  EXPECT_EQ(q2.intermediate_size, 32);        // "moe_intermediate_size", not the dense "intermediate_size" 96
  EXPECT_EQ(q2.shared_intermediate_size, 48);  // "shared_expert_intermediate_size"
  EXPECT_FALSE(q2.routing.renormalize);       // norm_topk_prob false
  EXPECT_EQ(q2.moe_layers, (std::vector<int>{0, 1}));
  const auto q3 = read_model_config(hf_dir("qwen3_moe-tiny") / "config.json");
  EXPECT_EQ(q3.num_experts, 8);  // saved as "num_local_experts" by transformers 5
  EXPECT_TRUE(q3.routing.renormalize);
  EXPECT_TRUE(q3.routing.is_default());
  const auto ds = read_model_config(hf_dir("deepseek_v3-tiny") / "config.json");
  EXPECT_EQ(ds.num_experts, 8);  // "n_routed_experts"
  EXPECT_EQ(ds.intermediate_size, 32);
  EXPECT_EQ(ds.shared_intermediate_size, 32);  // moe_intermediate_size * n_shared_experts
  EXPECT_EQ(ds.moe_layers, (std::vector<int>{1, 2}));  // first_k_dense_replace = 1
  EXPECT_EQ(ds.routing.score, kmoe::core::ScoreFunction::Sigmoid);
  EXPECT_EQ(ds.routing.n_group, 4);
  EXPECT_EQ(ds.routing.topk_group, 2);
  EXPECT_EQ(ds.routing.group_score_topk, 2);
  EXPECT_EQ(ds.routing.scaling_factor, 2.5);
  EXPECT_EQ(ds.routing.renorm_epsilon, 1e-20);
  EXPECT_TRUE(ds.routing.renormalize);
  const auto go = read_model_config(hf_dir("gpt_oss-tiny") / "config.json");
  EXPECT_TRUE(go.routing.softmax_over_topk);
  EXPECT_FALSE(go.routing.renormalize);
  EXPECT_EQ(go.swiglu_limit, 7.0);
  const auto gh = read_model_config(hf_dir("granitemoehybrid-tiny") / "config.json");
  EXPECT_EQ(gh.layer_types, (std::vector<std::string>{"linear_attention", "full_attention"}));
  EXPECT_EQ(gh.shared_intermediate_size, 72);
  EXPECT_EQ(gh.moe_layers, (std::vector<int>{0, 1}));
}

TEST(Checkpoint, ConfigKeysSelectTheMoeLayersAndBadValuesAreNamed) {
  ScratchDir tmp("ck-config");
  const std::string qwen = file_bytes(hf_dir("qwen3_moe-tiny") / "config.json");
  const std::string ds = file_bytes(hf_dir("deepseek_v3-tiny") / "config.json");
  auto with = [&](const std::string& base, const std::string& from, const std::string& to) {
    std::string s = base;
    const auto at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    s.replace(at, from.size(), to);
    kmoe::test::write_bytes(tmp.path() / "config.json", s);
    return tmp.path() / "config.json";
  };
  EXPECT_EQ(read_model_config(with(qwen, "\"decoder_sparse_step\": 1", "\"decoder_sparse_step\": 2")).moe_layers,
            (std::vector<int>{1}));
  EXPECT_EQ(read_model_config(with(qwen, "\"mlp_only_layers\": []", "\"mlp_only_layers\": [1]")).moe_layers,
            (std::vector<int>{0}));
  EXPECT_EQ(read_model_config(with(ds, "\"first_k_dense_replace\": 1", "\"first_k_dense_replace\": 2")).moe_layers,
            (std::vector<int>{2}));
  EXPECT_FALSE(read_model_config(with(ds, "\"norm_topk_prob\": true", "\"norm_topk_prob\": false")).routing.renormalize);
  kmoe::test::expect_input_error([&] { read_model_config(with(ds, "\"n_group\": 4", "\"n_group\": 3")); },
                                 {"config.json", "\"n_group\" = 3", "divide the 8 experts"});
  kmoe::test::expect_input_error([&] { read_model_config(with(ds, "\"topk_group\": 2", "\"topk_group\": 5")); },
                                 {"config.json", "\"topk_group\" = 5"});
  const std::string ds_k3 = file_bytes(with(ds, "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 3"));
  kmoe::test::expect_input_error([&] { read_model_config(with(ds_k3, "\"topk_group\": 2", "\"topk_group\": 1")); },
                                 {"config.json", "top_k = 3 exceeds the 2 experts"});
  kmoe::test::expect_input_error(
      [&] { read_model_config(with(ds, "\"norm_topk_prob\": true", "\"norm_topk_prob\": 1")); },
      {"config.json", "\"norm_topk_prob\" must be true or false"});
  kmoe::test::expect_input_error(
      [&] { read_model_config(with(qwen, "\"mlp_only_layers\": []", "\"mlp_only_layers\": [\"a\"]")); },
      {"config.json", "\"mlp_only_layers\" must be a list of layer indices"});
  kmoe::test::expect_input_error(
      [&] { read_model_config(with(qwen, "\"num_local_experts\": 8", "\"experts\": 8")); },
      {"config.json", "missing \"num_experts\" (or \"num_local_experts\")"});
}

TEST(Checkpoint, LooksUpTensorsAcrossShards) {
  const auto ck = HfCheckpoint::open(hf_dir("granitemoe-tiny"));
  EXPECT_TRUE(ck.is_sharded());
  EXPECT_EQ(ck.shard_files().size(), 6u);
  EXPECT_EQ(ck.shard_files().front(), "model-00001-of-00006.safetensors");
  EXPECT_EQ(ck.tensor_names().size(), ck.shard_plan().size());
  EXPECT_EQ(ck.total_size(), 2 * ck.total_parameters());
  const auto& t = ck.tensor("model.layers.1.block_sparse_moe.input_linear.weight");
  EXPECT_EQ(t.shape, (std::vector<std::int64_t>{6, 96, 64}));
  EXPECT_NE(t.file.find("model-00004-of-00006.safetensors"), std::string::npos);
  EXPECT_EQ(ck.tensor("model.norm.weight").file.find("model-00006"), t.file.find("model-00004"));
  EXPECT_TRUE(ck.has("lm_head.weight"));
  EXPECT_FALSE(ck.has("nope"));
  kmoe::test::expect_input_error([&] { ck.tensor("nope"); }, {"granitemoe-tiny", "'nope'"});
  std::int64_t bytes = 0;
  for (const auto& e : ck.shard_plan()) {
    EXPECT_TRUE(ck.shard(e.file).has(e.tensor)) << e.tensor;
    bytes += static_cast<std::int64_t>(ck.tensor(e.tensor).nbytes);
  }
  EXPECT_EQ(bytes, ck.total_size());
  // Index order is the index's sorted weight_map.
  const auto names = ck.tensor_names();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
}

TEST(Checkpoint, IndexJsonIsByteExact) {
  for (const auto& set : kmoe::test::testdata_sets()) {
    const auto ck = HfCheckpoint::open(hf_dir(set));
    EXPECT_EQ(index_json_text(ck.shard_plan(), ck.total_size(), ck.total_parameters()),
              file_bytes(hf_dir(set) / "model.safetensors.index.json"))
        << set;
  }
  // Python's json.dumps(ensure_ascii=True) escapes non-ASCII and DEL.
  EXPECT_EQ(index_json_text({{"caf\xc3\xa9\x7f", "a.safetensors"}}, 2, 1),
            "{\n  \"metadata\": {\n    \"total_parameters\": 1,\n    \"total_size\": 2\n  },\n  \"weight_map\": {\n"
            "    \"caf\\u00e9\\u007f\": \"a.safetensors\"\n  }\n}\n");
  EXPECT_EQ(index_json_text({}, 0, 0),
            "{\n  \"metadata\": {\n    \"total_parameters\": 0,\n    \"total_size\": 0\n  },\n  \"weight_map\": {}\n}\n");
}

TEST(Checkpoint, WholeCheckpointWrittenBackIsIdentical) {
  ScratchDir tmp("ck-write");
  for (const auto& set : kmoe::test::testdata_sets()) {
    const auto ck = HfCheckpoint::open(hf_dir(set));
    std::vector<TensorToWrite> ts;
    for (const auto& name : ck.tensor_names()) ts.push_back(TensorToWrite::borrow(ck.tensor(name)));
    const auto out = tmp.path() / set;
    std::filesystem::create_directories(out);
    // transformers' total_parameters leaves out buffers (DeepSeek-V3's e_score_correction_bias), so pass it on.
    write_checkpoint_tensors(out, ts, ck.shard_plan(), true, ck.total_parameters());
    int files = 0;
    for (const auto& e : std::filesystem::directory_iterator(out)) {
      EXPECT_TRUE(file_bytes(e.path()) == file_bytes(hf_dir(set) / e.path().filename())) << set << " " << e.path();
      ++files;
    }
    EXPECT_EQ(files, static_cast<int>(ck.shard_files().size()) + 1) << set;
  }
}

TEST(Checkpoint, SingleFileCheckpoint) {
  ScratchDir tmp("ck-single");
  const auto src = HfCheckpoint::open(hf_dir("mixtral-tiny"));
  std::vector<TensorToWrite> ts;
  std::vector<ShardEntry> plan;
  for (const auto& name : src.tensor_names()) {
    ts.push_back(TensorToWrite::borrow(src.tensor(name)));
    plan.push_back({name, "model.safetensors"});
  }
  const auto dir = tmp.path() / "single";
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(hf_dir("mixtral-tiny") / "config.json", dir / "config.json");
  write_checkpoint_tensors(dir, ts, plan, false);
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  const auto ck = HfCheckpoint::open(dir);
  EXPECT_FALSE(ck.is_sharded());
  EXPECT_EQ(ck.shard_files(), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(ck.total_size(), src.total_size());
  EXPECT_EQ(ck.total_parameters(), src.total_parameters());
  for (const auto& name : src.tensor_names()) {
    const auto& a = src.tensor(name);
    const auto& b = ck.tensor(name);
    ASSERT_EQ(a.nbytes, b.nbytes);
    EXPECT_EQ(0, std::memcmp(a.data, b.data, a.nbytes)) << name;
  }
  kmoe::test::expect_input_error([&] { write_checkpoint_tensors(dir, ts, {}, false); }, {"not in the shard plan"});
  plan.push_back({"extra", "model.safetensors"});
  kmoe::test::expect_input_error([&] { write_checkpoint_tensors(dir, ts, plan, false); }, {"'extra'", "not given"});
}

}  // namespace
