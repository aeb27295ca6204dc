// `kmoe finetune` + `kmoe convert` end to end under mpirun: --steps 0 then convert reproduces the Hugging Face
// directory byte for byte for 1, 2 and 3 ranks on every testdata set; training losses agree across rank counts and
// fall; --resume continues the same curve from a checkpoint saved by another rank count; the final RUN_DIR/hf keeps
// non-MoE tensors byte-identical; bad input and usage give exit codes 1 and 2 with one-line messages.
#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>
#include <cstring>
#include <fstream>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <regex>
#include <sstream>

#include "kmoe_test.hpp"

namespace {

namespace fs = std::filesystem;
using kmoe::test::CommandResult;
using kmoe::test::run_command;
using kmoe::test::run_kmoe;

fs::path hf_dir(const std::string& set) { return kmoe::test::testdata_dir() / set / "hf_save_pretrained"; }

// `kmoe ARGS` under mpirun with np ranks (one OpenMP thread each: the CI machine has 2 cores). This test process is
// itself an MPI (singleton) process: its OMPI_/PMIX_ variables would make mpirun's children join it, so they go.
CommandResult mpirun_kmoe(int np, const std::string& args) {
  return run_command(
      "for v in $(env | grep -E '^(OMPI|PMIX|OPAL|ORTE)_' | cut -d= -f1); do unset $v; done; "
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 " +
      std::string(KMOE_TEST_MPIEXEC) + " -np " + std::to_string(np) + " --oversubscribe " +
      kmoe::test::kmoe_exe().string() + " " + args);
}



// The "step S/N loss L" lines of a finetune run, by step.
std::map<int, double> losses(const std::string& out) {
  std::map<int, double> r;
  const std::regex line(R"(step (\d+)/\d+ loss ([0-9.eE+-]+))");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), line); it != std::sregex_iterator(); ++it)
    r[std::stoi((*it)[1].str())] = std::stod((*it)[2].str());
  return r;
}

/// The value after `key` on each "step S/N ..." line, by step.
std::map<int, double> field(const std::string& out, const std::string& key) {
  std::map<int, double> r;
  const std::regex line("step (\\d+)/\\d+ [^\\n]* " + key + " ([0-9.eE+-]+)");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), line); it != std::sregex_iterator(); ++it)
    r[std::stoi((*it)[1].str())] = std::stod((*it)[2].str());
  return r;
}

// Router losses (--aux-loss-coef, --z-loss-coef): the objective gains coef_aux * aux_loss + coef_z * z_loss over the
// step's global batch, so np 1 and np 2 (and 2 replicas) print the same losses; the training curve changes.
TEST(FinetuneCli, RouterLossesAddToTheObjectiveAndAgreeAcrossRankCounts) {
  const fs::path hf = hf_dir("mixtral-tiny");
  kmoe::test::ScratchDir tmp("finetune-router-losses");
  const std::string common = "finetune --checkpoint " + hf.string() + " --tokens 48 --steps 4 --no-convert --lr 1e-2 ";
  const std::string coefs = "--aux-loss-coef 0.05 --z-loss-coef 0.01 ";
  auto plain = mpirun_kmoe(1, common + "--out " + (tmp.path() / "plain").string());
  ASSERT_EQ(plain.exit_code, 0) << plain.out << plain.err;
  auto one = mpirun_kmoe(1, common + coefs + "--out " + (tmp.path() / "a").string());
  ASSERT_EQ(one.exit_code, 0) << one.out << one.err;
  auto two = mpirun_kmoe(2, common + coefs + "--out " + (tmp.path() / "b").string());
  ASSERT_EQ(two.exit_code, 0) << two.out << two.err;
  auto replicas = mpirun_kmoe(2, common + coefs + "--ep 1 --out " + (tmp.path() / "c").string());
  ASSERT_EQ(replicas.exit_code, 0) << replicas.out << replicas.err;
  EXPECT_EQ(plain.out.find("aux_loss"), std::string::npos) << "off by default: " << plain.out;
  const auto l0 = losses(plain.out), l1 = losses(one.out), l2 = losses(two.out), lr = losses(replicas.out);
  const auto mse = field(one.out, "mse"), aux = field(one.out, "aux_loss"), z = field(one.out, "z_loss");
  const auto aux2 = field(two.out, "aux_loss"), z2 = field(two.out, "z_loss");
  ASSERT_EQ(l1.size(), 4u) << one.out;
  ASSERT_EQ(aux.size(), 4u) << one.out;
  ASSERT_EQ(aux2.size(), 4u) << two.out;
  for (const auto& [step, loss] : l1) {
    SCOPED_TRACE("step " + std::to_string(step));
    EXPECT_NEAR(l2.at(step), loss, 1e-5 * loss);
    EXPECT_NEAR(lr.at(step), loss, 1e-5 * loss);
    EXPECT_NEAR(aux2.at(step), aux.at(step), 1e-6 * aux.at(step));
    EXPECT_NEAR(z2.at(step), z.at(step), 1e-6 * z.at(step));
    EXPECT_NEAR(loss, mse.at(step) + 0.05 * aux.at(step) + 0.01 * z.at(step), 1e-6 * loss);
    // Top-2 of 8 experts: the load-balancing loss is at least 2 (perfect balance), and near it for this router.
    EXPECT_GE(aux.at(step), 2.0 - 1e-6);
    EXPECT_LT(aux.at(step), 4.0);
  }
  // Step 1 starts from the same weights: the same block error, the loss higher by the router terms.
  EXPECT_NEAR(mse.at(1), l0.at(1), 1e-6 * l0.at(1));
  EXPECT_GT(l1.at(1), l0.at(1) + 0.05 * 2.0);
  // Later steps train on another objective: the block error moves differently.
  EXPECT_GT(std::abs(mse.at(4) - l0.at(4)), 1e-6 * l0.at(4)) << one.out << plain.out;
  // The recorded hyperparameters.
  const auto ck = kmoe::io::Hdf5Checkpoint::open(tmp.path() / "b" / "checkpoint-4");
  EXPECT_EQ(ck.attributes().at("aux_loss_coef"), "0.050000");
  EXPECT_EQ(ck.attributes().at("z_loss_coef"), "0.010000");
}

TEST(FinetuneCli, StepsZeroThenConvertReproducesTheCheckpointForOneTwoThreeRanks) {
  for (const char* set :
       {"mixtral-tiny", "granitemoe-tiny", "granitemoeshared-tiny", "qwen3_moe-tiny", "granitemoehybrid-tiny",
        "olmoe-tiny", "qwen2_moe-tiny", "deepseek_v3-tiny", "gpt_oss-tiny"}) {
    for (int np : {1, 2, 3}) {
      SCOPED_TRACE(std::string(set) + " np " + std::to_string(np));
      kmoe::test::ScratchDir tmp("finetune0");
      const fs::path run = tmp.path() / "run";
      auto r = mpirun_kmoe(np, "finetune --checkpoint " + hf_dir(set).string() + " --steps 0 --out " + run.string() +
                                   " --no-convert");
      ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
      const auto ck = kmoe::io::Hdf5Checkpoint::open(run / "checkpoint-0");
      EXPECT_EQ(ck.saved_world_size(), np);
      EXPECT_EQ(ck.step(), 0);
      r = run_kmoe("convert " + (run / "checkpoint-0").string() + " " + (tmp.path() / "out").string() + " " +
                   hf_dir(set).string());
      ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
      kmoe::test::expect_same_files(hf_dir(set), tmp.path() / "out");
    }
  }
}

// The families with routing and expert variants train: DeepSeek-V3 (sigmoid, selection bias, group-limited top-k,
// a plain shared expert, a dense first layer) and GPT-OSS (router and expert biases, the clamped SwiGLU), on 1 rank
// and on 2 then resumed on 3 with the same losses; the loss falls; the converted directory keeps every non-MoE
// tensor's bytes and the selection bias (not trained) and changes the trained MoE tensors.
TEST(FinetuneCli, VariantFamiliesTrainTheSameOnAnyRankCountAndResume) {
  kmoe::test::ScratchDir tmp("finetune-variants");
  for (const std::string set : {"deepseek_v3-tiny", "gpt_oss-tiny"}) {
    SCOPED_TRACE(set);
    const std::string common = "finetune --checkpoint " + hf_dir(set).string() + " --tokens 64 --steps 6 ";
    auto one = mpirun_kmoe(1, common + "--out " + (tmp.path() / (set + "1")).string());
    ASSERT_EQ(one.exit_code, 0) << one.out << one.err;
    // The same 6 steps as 3 on 2 ranks, then --resume (the optional tensors' AdamW state included) on 3 ranks.
    const std::string half = "finetune --checkpoint " + hf_dir(set).string() + " --tokens 64 --steps 3 ";
    auto two = mpirun_kmoe(2, half + "--no-convert --out " + (tmp.path() / (set + "2")).string());
    ASSERT_EQ(two.exit_code, 0) << two.out << two.err;
    auto three = mpirun_kmoe(3, common + "--resume --no-convert --out " + (tmp.path() / (set + "2")).string());
    ASSERT_EQ(three.exit_code, 0) << three.out << three.err;
    auto l2 = losses(two.out);
    const auto l1 = losses(one.out), l3 = losses(three.out);
    l2.insert(l3.begin(), l3.end());
    ASSERT_EQ(l1.size(), 6u) << one.out;
    ASSERT_EQ(l2.size(), 6u) << two.out << three.out;
    for (const auto& [step, loss] : l1) EXPECT_NEAR(l2.at(step), loss, 1e-5 * loss) << "step " << step;
    EXPECT_LT(l1.at(6), 0.8 * l1.at(1)) << one.out;
    const auto original = kmoe::io::HfCheckpoint::open(hf_dir(set));
    const auto trained = kmoe::io::HfCheckpoint::open(tmp.path() / (set + "1") / "hf");
    const auto& spec = kmoe::io::spec_for(original.config().architecture);
    int changed = 0;
    for (const auto& name : original.tensor_names()) {
      const auto& a = original.tensor(name);
      const auto& b = trained.tensor(name);
      ASSERT_EQ(a.shape, b.shape) << name;
      const bool same = std::memcmp(a.data, b.data, a.nbytes) == 0;
      const bool selection_bias = name.find("e_score_correction_bias") != std::string::npos;
      if (!kmoe::io::is_moe_tensor(spec, name) || selection_bias)
        EXPECT_TRUE(same) << name;
      else
        changed += !same;
    }
    EXPECT_GT(changed, 0);
  }
}

TEST(FinetuneCli, LossesAgreeAcrossRankCountsFallAndResumeContinuesTheCurve) {
  const fs::path hf = hf_dir("granitemoeshared-tiny");
  kmoe::test::ScratchDir tmp("finetune-train");
  const std::string common = "finetune --checkpoint " + hf.string() + " --tokens 64 ";
  // Uninterrupted: 8 steps on 1 rank and on 2 ranks (and 2 replicas of 1 ep rank).
  auto one = mpirun_kmoe(1, common + "--steps 8 --out " + (tmp.path() / "a").string());
  ASSERT_EQ(one.exit_code, 0) << one.out << one.err;
  auto two = mpirun_kmoe(2, common + "--steps 8 --save-every 4 --out " + (tmp.path() / "b").string());
  ASSERT_EQ(two.exit_code, 0) << two.out << two.err;
  auto replicas = mpirun_kmoe(2, common + "--steps 8 --ep 1 --no-convert --out " + (tmp.path() / "c").string());
  ASSERT_EQ(replicas.exit_code, 0) << replicas.out << replicas.err;
  const auto l1 = losses(one.out), l2 = losses(two.out), lr = losses(replicas.out);
  ASSERT_EQ(l1.size(), 8u) << one.out;
  ASSERT_EQ(l2.size(), 8u) << two.out;
  ASSERT_EQ(lr.size(), 8u) << replicas.out;
  for (const auto& [step, loss] : l1) {
    EXPECT_NEAR(l2.at(step), loss, 1e-5 * loss) << "step " << step;
    EXPECT_NEAR(lr.at(step), loss, 1e-5 * loss) << "step " << step;
  }
  EXPECT_LT(l1.at(8), 0.6 * l1.at(1)) << one.out;  // the loss falls
  EXPECT_TRUE(fs::exists(tmp.path() / "b" / "checkpoint-4"));
  EXPECT_TRUE(fs::exists(tmp.path() / "b" / "checkpoint-8"));

  // Interrupted: 4 steps on 3 ranks, then --resume to 8 on 2 ranks: the same curve.
  auto first = mpirun_kmoe(3, common + "--steps 4 --no-convert --out " + (tmp.path() / "d").string());
  ASSERT_EQ(first.exit_code, 0) << first.out << first.err;
  auto resumed = mpirun_kmoe(2, common + "--steps 8 --resume --out " + (tmp.path() / "d").string());
  ASSERT_EQ(resumed.exit_code, 0) << resumed.out << resumed.err;
  EXPECT_NE(resumed.out.find("resuming from"), std::string::npos) << resumed.out;
  const auto l3 = losses(first.out), l4 = losses(resumed.out);
  ASSERT_EQ(l3.size(), 4u);
  ASSERT_EQ(l4.size(), 4u) << resumed.out;
  for (const auto& [step, loss] : l3) EXPECT_NEAR(loss, l1.at(step), 1e-5 * l1.at(step)) << "step " << step;
  for (const auto& [step, loss] : l4) EXPECT_NEAR(loss, l1.at(step), 1e-5 * l1.at(step)) << "step " << step;

  // The converted directory: a valid checkpoint, same files, non-MoE tensors byte-identical, MoE tensors trained.
  for (const char* run : {"a", "b", "d"}) {
    SCOPED_TRACE(run);
    const fs::path out = tmp.path() / run / "hf";
    const auto original = kmoe::io::HfCheckpoint::open(hf);
    const auto trained = kmoe::io::HfCheckpoint::open(out);
    const auto& spec = kmoe::io::spec_for(original.config().architecture);
    EXPECT_EQ(kmoe::test::read_file_bytes(hf / "config.json"), kmoe::test::read_file_bytes(out / "config.json"));
    EXPECT_EQ(kmoe::test::read_file_bytes(hf / "model.safetensors.index.json"), kmoe::test::read_file_bytes(out / "model.safetensors.index.json"));
    EXPECT_EQ(trained.shard_files(), original.shard_files());
    for (const auto& name : original.tensor_names()) {
      const auto& a = original.tensor(name);
      const auto& b = trained.tensor(name);
      ASSERT_EQ(a.dtype, b.dtype) << name;
      ASSERT_EQ(a.shape, b.shape) << name;
      const bool same = std::memcmp(a.data, b.data, a.nbytes) == 0;
      EXPECT_EQ(same, !kmoe::io::is_moe_tensor(spec, name)) << name;
    }
  }
}

// --data: the oracle's recorded block inputs and transformers' outputs. Starting from the checkpoint itself, the loss
// is the squared difference between kmoe's MoE block and transformers' one: tiny.
TEST(FinetuneCli, RecordedDataStartsAtTransformersOutputs) {
  kmoe::test::ScratchDir tmp("finetune-data");
  for (const char* set :
       {"mixtral-tiny", "granitemoeshared-tiny", "deepseek_v3-tiny", "gpt_oss-tiny", "qwen2_moe-tiny"}) {
    const fs::path data = kmoe::test::testdata_dir() / set / (std::string(set) + "-ref.safetensors");
    for (int np : {1, 2}) {
      SCOPED_TRACE(std::string(set) + " np " + std::to_string(np));
      const fs::path run = tmp.path() / (std::string(set) + std::to_string(np));
      auto r = mpirun_kmoe(np, "finetune --checkpoint " + hf_dir(set).string() + " --data " + data.string() +
                                   " --steps 2 --precision f64 --no-convert --out " + run.string());
      ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
      const auto l = losses(r.out);
      ASSERT_EQ(l.size(), 2u) << r.out;
      EXPECT_LT(l.at(1), 1e-15) << r.out;  // mean squared error per element (measured: ~1e-20)
    }
  }
  // A data file without the layers' tensors: exit 1 naming the tensor.
  auto r = run_kmoe("finetune --checkpoint " + hf_dir("mixtral-tiny").string() + " --data " +
                    (kmoe::test::testdata_dir() / "mixtral-tiny" / "hf_save_pretrained" /
                     "model-00001-of-00006.safetensors")
                        .string() +
                    " --steps 1 --out " + (tmp.path() / "bad").string());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("layers.0.x"), std::string::npos) << r.err;
}

TEST(FinetuneCli, BadInputAndUsage) {
  kmoe::test::ScratchDir tmp("finetune-bad");
  // Resuming a run of another model: a spec mismatch (exit 1, one line naming it).
  auto r = run_kmoe("finetune --checkpoint " + hf_dir("granitemoe-tiny").string() + " --steps 0 --no-convert --out " +
                    (tmp.path() / "run").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_kmoe("finetune --checkpoint " + hf_dir("mixtral-tiny").string() + " --steps 1 --resume --out " +
               (tmp.path() / "run").string());
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("spec mismatch"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  // Converting against the wrong original, a missing checkpoint, a truncated shard.
  const fs::path ck = tmp.path() / "run" / "checkpoint-0";
  r = run_kmoe("convert " + ck.string() + " " + (tmp.path() / "out").string() + " " + hf_dir("mixtral-tiny").string());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("spec mismatch"), std::string::npos) << r.err;
  r = run_kmoe("convert " + (tmp.path() / "nope").string() + " " + (tmp.path() / "out").string());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("nope"), std::string::npos) << r.err;
  fs::resize_file(ck / "rank-00000-of-00001.h5", 4096);
  r = run_kmoe("convert " + ck.string() + " " + (tmp.path() / "out").string());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("rank-00000-of-00001.h5"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "out"));
  // Usage.
  EXPECT_EQ(run_kmoe("convert only-one-arg").exit_code, 2);
  r = run_kmoe("finetune --checkpoint " + hf_dir("mixtral-tiny").string() + " --out x");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--steps"), std::string::npos) << r.err;
  EXPECT_EQ(run_kmoe("finetune --checkpoint a --out b --steps 1 --precision f16").exit_code, 2);
}

}  // namespace
