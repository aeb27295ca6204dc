// `kmoe finetune` and `kmoe convert` against hostile arguments and damaged runs: every bad value is refused by name
// before any work (exit 2), every damaged input is a one-line InputError (exit 1), nothing is written where it
// would replace an input, and nothing is silently skipped or restarted.
#include <gtest/gtest.h>

#include <kmoe/io/safetensors.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kmoe_test.hpp"

namespace {

namespace fs = std::filesystem;
using kmoe::test::CommandResult;
using kmoe::test::run_command;
using kmoe::test::run_kmoe;
using kmoe::test::ScratchDir;

const fs::path kHf = kmoe::test::repo_data_dir() / "granitemoe-tiny";

std::string q(const fs::path& p) { return "'" + p.string() + "'"; }

bool one_line(const std::string& s) { return std::count(s.begin(), s.end(), '\n') == 1; }

// `kmoe ARGS` run from `dir` (so that a relative or empty path lands there, never in the test's directory).
CommandResult kmoe_in(const fs::path& dir, const std::string& args) {
  return run_command("cd " + q(dir) + " && " + kmoe::test::kmoe_exe().string() + " " + args);
}

// A copy of the repository's checkpoint at `dir` (tests that might write beside or inside it never touch the source).
fs::path copy_of_hf(const fs::path& dir) {
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(kHf)) fs::copy_file(e.path(), dir / e.path().filename());
  return dir;
}

std::string finetune(const fs::path& hf, const fs::path& run, const std::string& more) {
  return "finetune --checkpoint " + q(hf) + " --out " + q(run) + " " + more;
}

TEST(FinetuneArguments, NonFiniteOrOutOfRangeNumbersAreUsageErrorsNamingTheOption) {
  ScratchDir tmp("ft-numbers");
  const fs::path run = tmp.path() / "run";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--lr", "inf"},           {"--lr", "nan"},          {"--lr", "-1"},          {"--lr", "1e300"},
      {"--lr", "1e-400"},        {"--eps", "inf"},         {"--eps", "0"},          {"--eps", "1e-40"},
      {"--weight-decay", "inf"}, {"--weight-decay", "-1"}, {"--beta1", "1"},        {"--beta2", "nan"},
      {"--clip", "nan"},         {"--clip", "inf"},        {"--perturb", "nan"},    {"--perturb", "inf"},
      {"--perturb", "-0.5"},     {"--ep", "0"},            {"--ep", "4294967297"},  {"--ep", "-1"},
      {"--tokens", "0"},         {"--tokens", "1e11"},     {"--batches", "0"},      {"--seed", "-1"},
      {"--save-every", "1.5"},   {"--save-every", "-2"},   {"--lr", "0x"},          {"--lr", " 1"},
      {"--steps", "99999999999999999999"}, {"--aux-loss-coef", "-0.1"}, {"--aux-loss-coef", "nan"},
      {"--z-loss-coef", "inf"},   {"--z-loss-coef", "-1"}};
  for (const auto& [option, value] : cases) {
    SCOPED_TRACE(option + " " + value);
    std::string more = "--no-convert " + option + " '" + value + "'";
    if (option != "--steps") more += " --steps 1";
    const auto r = run_kmoe(finetune(kHf, run, more));
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_NE(r.err.find(option), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(value), std::string::npos) << r.err;
    EXPECT_TRUE(one_line(r.err)) << r.err;
    EXPECT_FALSE(fs::exists(run)) << "nothing is trained or saved";
  }
}

// A finite but huge learning rate: the weights overflow after the first update. The run stops at the first
// non-finite loss, before saving anything from it.
TEST(FinetuneArguments, TrainingThatDivergesStopsBeforeSavingGarbage) {
  ScratchDir tmp("ft-diverge");
  const fs::path run = tmp.path() / "run";
  const auto r = run_kmoe(finetune(kHf, run, "--steps 4 --tokens 16 --lr 1e30 --no-convert"));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("not finite"), std::string::npos) << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;
  EXPECT_FALSE(fs::exists(run / "checkpoint-4"));
}

TEST(FinetuneArguments, TokensBeyondTheMachinesMemoryAreRefusedBeforeAllocating) {
  ScratchDir tmp("ft-tokens");
  const auto r = run_kmoe(finetune(kHf, tmp.path() / "run", "--steps 1 --no-convert --tokens 100000000000"));
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("--tokens 100000000000"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("memory"), std::string::npos) << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;
}

TEST(FinetuneArguments, OutMustBeANonEmptyDirectoryApartFromTheInputs) {
  ScratchDir tmp("ft-out");
  // Empty: never the current directory.
  auto r = kmoe_in(tmp.path(), finetune(kHf, "", "--steps 0 --no-convert"));
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("--out"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::is_empty(tmp.path()));
  // A file: refused before training, the file untouched.
  const fs::path file = tmp.path() / "file";
  std::ofstream(file) << "keep";
  r = run_kmoe(finetune(kHf, file, "--steps 1 --no-convert"));
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("not a directory"), std::string::npos) << r.err;
  EXPECT_EQ(kmoe::test::read_file_bytes(file), "keep");
  EXPECT_EQ(r.out.find("step 1/1"), std::string::npos) << r.out;
  // The checkpoint read, or inside it.
  const fs::path hf = copy_of_hf(tmp.path() / "hf");
  for (const fs::path& out : {hf, hf / "run"}) {
    r = run_kmoe(finetune(hf, out, "--steps 0 --no-convert"));
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_NE(r.err.find("--checkpoint"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(hf / "run"));
    EXPECT_FALSE(fs::exists(hf / "checkpoint-0"));
  }
  // A checkpoint under RUN_DIR/hf, which the final conversion replaces.
  const fs::path run = tmp.path() / "run";
  r = run_kmoe(finetune(kHf, run, "--steps 0"));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = run_kmoe(finetune(run / "hf", run, "--steps 0"));
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("replaces"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(run / "hf" / "config.json"));
}

TEST(FinetuneResume, ANewestCheckpointWithoutAReadableManifestIsAnErrorNamingIt) {
  ScratchDir tmp("ft-resume");
  const fs::path run = tmp.path() / "run";
  auto r = run_kmoe(finetune(kHf, run, "--steps 2 --save-every 1 --no-convert --tokens 16"));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  fs::rename(run / "checkpoint-2" / "manifest.h5", tmp.path() / "manifest.h5");
  r = run_kmoe(finetune(kHf, run, "--steps 3 --resume --no-convert --tokens 16"));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("checkpoint-2"), std::string::npos) << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;
  EXPECT_EQ(r.out.find("step 1/3"), std::string::npos) << "no restart from HF_DIR: " << r.out;
  // Unreadable (not HDF5) is the same.
  std::ofstream(run / "checkpoint-2" / "manifest.h5") << "not hdf5";
  r = run_kmoe(finetune(kHf, run, "--steps 3 --resume --no-convert --tokens 16"));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("checkpoint-2"), std::string::npos) << r.err;
  // Moved out of the way: the run continues from the one before.
  fs::rename(run / "checkpoint-2", tmp.path() / "damaged");
  r = run_kmoe(finetune(kHf, run, "--steps 3 --resume --no-convert --tokens 16"));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("resuming from " + (run / "checkpoint-1").string()), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("step 2/3"), std::string::npos) << r.out;
}

// granitemoe-tiny without layer 1's router: both commands refuse it, naming the tensor.
TEST(FinetuneInputs, AMoeLayerWithoutItsRouterIsAnInputError) {
  ScratchDir tmp("ft-router");
  const fs::path hf = copy_of_hf(tmp.path() / "hf");
  const std::string router = "model.layers.1.block_sparse_moe.router.layer.weight";
  const std::string shard = "model-00005-of-00006.safetensors";
  {
    const auto f = kmoe::io::SafetensorsFile::open(kHf / shard);
    std::vector<kmoe::io::TensorToWrite> kept;
    for (const auto& t : f.tensors())
      if (t.name != router) kept.push_back(kmoe::io::TensorToWrite::borrow(t));
    ASSERT_EQ(kept.size() + 1, f.tensors().size());
    kmoe::io::write_safetensors(hf / shard, kept);
  }
  std::string index = kmoe::test::read_file_bytes(kHf / "model.safetensors.index.json");
  const std::string entry = "    \"" + router + "\": \"" + shard + "\",\n";
  ASSERT_NE(index.find(entry), std::string::npos);
  index.erase(index.find(entry), entry.size());
  std::ofstream(hf / "model.safetensors.index.json", std::ios::binary) << index;

  auto r = run_kmoe(finetune(hf, tmp.path() / "run", "--steps 1 --no-convert --tokens 16"));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find(router), std::string::npos) << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;
  EXPECT_FALSE(fs::exists(tmp.path() / "run" / "checkpoint-1"));
  r = run_kmoe("block --checkpoint " + q(hf) + " --layer 1 --inputs " +
               q(kmoe::test::testdata_dir() / "granitemoe-tiny" / "granitemoe-tiny-ref.safetensors") + " --out " +
               q(tmp.path() / "block.safetensors"));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find(router), std::string::npos) << r.err;
}

class ConvertOutput : public ::testing::Test {
 protected:
  ScratchDir tmp{"convert-out"};
  fs::path run = tmp.path() / "run", ck = run / "checkpoint-0";
  void SetUp() override {
    const auto r = run_kmoe(finetune(kHf, run, "--steps 0 --no-convert"));
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  }
  // Exit code 2, one line naming `part`, the checkpoint still whole.
  void expect_refused(const std::string& args, const std::string& part) {
    SCOPED_TRACE(args);
    const auto r = run_kmoe("convert " + args);
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_NE(r.err.find(part), std::string::npos) << r.err;
    EXPECT_TRUE(one_line(r.err)) << r.err;
    EXPECT_TRUE(fs::exists(ck / "manifest.h5"));
  }
};

TEST_F(ConvertOutput, NeverReplacesAnInputAFileOrAnExistingDirectoryWithoutForce) {
  expect_refused(q(ck) + " ''", "empty");
  expect_refused(q(ck) + " " + q(ck), "is CHECKPOINT_DIR");
  expect_refused("--force " + q(ck) + " " + q(ck), "is CHECKPOINT_DIR");
  expect_refused("--force " + q(ck) + " " + q(run), "contains CHECKPOINT_DIR");
  expect_refused(q(ck) + " " + q(ck / "hf"), "lies inside CHECKPOINT_DIR");
  const fs::path hf = copy_of_hf(tmp.path() / "source" / "hf");
  expect_refused("--force " + q(ck) + " " + q(hf) + " " + q(hf), "is ORIGINAL_HF_DIR");
  expect_refused("--force " + q(ck) + " " + q(hf.parent_path()) + " " + q(hf), "contains ORIGINAL_HF_DIR");
  expect_refused(q(ck) + " " + q(hf / "out") + " " + q(hf), "lies inside ORIGINAL_HF_DIR");
  EXPECT_FALSE(fs::exists(hf / "out"));
  kmoe::test::expect_same_files(kHf, hf);
  const fs::path file = tmp.path() / "file";
  std::ofstream(file) << "keep";
  expect_refused("--force " + q(ck) + " " + q(file), "not a directory");
  EXPECT_EQ(kmoe::test::read_file_bytes(file), "keep");
  fs::create_directory(tmp.path() / "elsewhere");
  fs::create_directory_symlink(tmp.path() / "elsewhere", tmp.path() / "link");
  expect_refused("--force " + q(ck) + " " + q(tmp.path() / "link"), "symbolic link");

  const fs::path out = tmp.path() / "out";
  auto r = run_kmoe("convert " + q(ck) + " " + q(out) + " " + q(kHf));
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  kmoe::test::expect_same_files(kHf, out);
  expect_refused(q(ck) + " " + q(out), "--force");
  r = run_kmoe("convert --force " + q(ck) + " " + q(out) + " " + q(kHf));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  kmoe::test::expect_same_files(kHf, out);
  // --force replaces a previous conversion only: not a directory that holds anything else.
  std::ofstream(out / "notes.txt") << "keep";
  expect_refused("--force " + q(ck) + " " + q(out), "notes.txt");
  fs::remove(out / "notes.txt");
  fs::create_directory(out / "sub");
  expect_refused("--force " + q(ck) + " " + q(out), "sub");
  EXPECT_TRUE(fs::is_directory(out / "sub"));
}

TEST_F(ConvertOutput, PathsTheSystemRefusesExitOneInOneLine) {
  fs::create_symlink(tmp.path() / "loop-a", tmp.path() / "loop-b");
  fs::create_symlink(tmp.path() / "loop-b", tmp.path() / "loop-a");
  for (const std::string args : {q(tmp.path() / "loop-a") + " " + q(tmp.path() / "out"),
                                 q(ck) + " " + q(tmp.path() / "loop-a" / "out"),
                                 q(ck) + " " + q(tmp.path() / "out") + " " + q(tmp.path() / "loop-a")}) {
    SCOPED_TRACE(args);
    const auto r = run_kmoe("convert " + args);
    EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
    EXPECT_NE(r.err.find("loop-a"), std::string::npos) << r.err;
    EXPECT_TRUE(one_line(r.err)) << r.err;
  }
  EXPECT_FALSE(fs::exists(tmp.path() / "out"));
}

}  // namespace
