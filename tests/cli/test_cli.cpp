// The kmoe command's contract: dispatch, --help/--version per subcommand, exit codes 0/1/2 with one-line messages,
// and the argument parser every subcommand shares (checked here through kmoe block and kmoe inspect).
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kmoe_test.hpp"

namespace {

namespace fs = std::filesystem;
using kmoe::test::run_kmoe;
using kmoe::test::ScratchDir;

std::string q(const fs::path& p) { return "'" + p.string() + "'"; }
bool one_line(const std::string& s) { return std::count(s.begin(), s.end(), '\n') == 1; }

// kmoe block on the oracle's granitemoe-tiny layer 0, with `more` arguments.
std::string block_args(const fs::path& out, const std::string& more) {
  const fs::path set = kmoe::test::testdata_dir() / "granitemoe-tiny";
  return "block --checkpoint " + q(set / "hf_save_pretrained") + " --inputs " +
         q(set / "granitemoe-tiny-ref.safetensors") + " --out " + q(out) + " " + more;
}

TEST(Cli, TopLevelHelpAndVersion) {
  auto r = run_kmoe("--help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* c : {"inspect", "block", "finetune", "convert"}) EXPECT_NE(r.out.find(c), std::string::npos) << c;
  r = run_kmoe("--version");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out.rfind("kmoe ", 0), 0u) << r.out;
}

TEST(Cli, EverySubcommandHasHelpAndVersion) {
  for (const char* c : {"inspect", "block", "finetune", "convert"}) {
    auto r = run_kmoe(std::string(c) + " --help");
    EXPECT_EQ(r.exit_code, 0) << c;
    EXPECT_NE(r.out.find(std::string("usage: kmoe ") + c), std::string::npos) << c << ": " << r.out;
    r = run_kmoe(std::string(c) + " --version");
    EXPECT_EQ(r.exit_code, 0) << c;
    EXPECT_EQ(r.out.rfind("kmoe ", 0), 0u) << r.out;
  }
}

TEST(Cli, BadUsageExitsTwoNamingTheArgument) {
  auto r = run_kmoe("");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("missing command"), std::string::npos) << r.err;
  r = run_kmoe("frobnicate");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("'frobnicate'"), std::string::npos) << r.err;
  r = run_kmoe("block --no-such-option 3");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--no-such-option"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
}

TEST(CliParser, IntegersAreCheckedForGarbageOverflowAndRange) {
  ScratchDir tmp("cli-int");
  const fs::path out = tmp.path() / "out.safetensors";
  for (const std::string bad : {"--layer -1", "--layer 4294967297", "--layer 99999999999999999999", "--layer 1x",
                                "--layer ' 0'", "--layer 0 --ep 0", "--layer 0 --ep 4294967297",
                                "--layer 0 --block 0", "--layer 0 --block 1e3"}) {
    SCOPED_TRACE(bad);
    const auto r = run_kmoe(block_args(out, bad));
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    const std::string option = bad.substr(bad.rfind("--"), bad.find(' ', bad.rfind("--")) - bad.rfind("--"));
    EXPECT_NE(r.err.find(option), std::string::npos) << r.err;
    EXPECT_TRUE(one_line(r.err)) << r.err;
    EXPECT_FALSE(fs::exists(out));
  }
}

TEST(CliParser, EmptyDoubledAndOptionLikeValuesAreUsageErrors) {
  ScratchDir tmp("cli-values");
  const fs::path out = tmp.path() / "out.safetensors";
  struct Case {
    std::string args, says;
  };
  const std::vector<Case> cases = {
      {block_args(out, "--layer 0 --precision ''"), "--precision"},
      {block_args(out, "--layer 0 --impl="), "--impl"},
      {block_args(out, "--layer 0 --layer 1"), "given twice"},
      // A value that starts with -- is an option: neither kmoe nor Kokkos takes it as a value.
      {"block --checkpoint " + q(kmoe::test::testdata_dir() / "granitemoe-tiny" / "hf_save_pretrained") +
           " --layer 0 --inputs x --out --kokkos-help",
       "--out=--kokkos-help"},
      {block_args(out, "--layer 0 --precision --help-me"), "--precision"},
      {"inspect ''", "empty argument"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.args);
    const auto r = run_kmoe(c.args);
    EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
    EXPECT_NE(r.err.find(c.says), std::string::npos) << r.err;
    EXPECT_TRUE(one_line(r.err)) << r.err;
    EXPECT_EQ(r.out.find("Kokkos"), std::string::npos) << r.out;
  }
  EXPECT_FALSE(fs::exists(out));
}

TEST(CliParser, AValueThatStartsWithDashesPassesWithAnEqualsSignAndReachesOnlyKmoe) {
  ScratchDir tmp("cli-dashes");
  const fs::path out = tmp.path() / "--kokkos-help";
  // From the scratch directory, where --out=--kokkos-help names a file.
  const fs::path set = kmoe::test::testdata_dir() / "granitemoe-tiny";
  const auto r = kmoe::test::run_command("cd " + q(tmp.path()) + " && " + kmoe::test::kmoe_exe().string() +
                                         " block --checkpoint " + q(set / "hf_save_pretrained") + " --inputs " +
                                         q(set / "granitemoe-tiny-ref.safetensors") +
                                         " --layer 0 --out=--kokkos-help");
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.out.find("Kokkos"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::is_regular_file(out));
}

TEST(CliPaths, SymlinkLoopsAreOneLineInputErrors) {
  ScratchDir tmp("cli-loop");
  fs::create_symlink(tmp.path() / "a", tmp.path() / "b");
  fs::create_symlink(tmp.path() / "b", tmp.path() / "a");
  auto r = run_kmoe("inspect " + q(tmp.path() / "a"));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find((tmp.path() / "a").string()), std::string::npos) << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;
  r = run_kmoe(block_args(tmp.path() / "a" / "out.safetensors", "--layer 0"));
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;
}

TEST(CliPaths, BlockNeverWritesOverItsInputs) {
  ScratchDir tmp("cli-block-out");
  const fs::path inputs = tmp.path() / "inputs.safetensors";
  fs::copy_file(kmoe::test::testdata_dir() / "granitemoe-tiny" / "granitemoe-tiny-ref.safetensors", inputs);
  const std::string before = kmoe::test::read_file_bytes(inputs);
  const fs::path hf = kmoe::test::testdata_dir() / "granitemoe-tiny" / "hf_save_pretrained";
  auto r = run_kmoe("block --checkpoint " + q(hf) + " --layer 0 --inputs " + q(inputs) + " --out " + q(inputs));
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("--inputs"), std::string::npos) << r.err;
  EXPECT_EQ(kmoe::test::read_file_bytes(inputs), before);
  // Inside the checkpoint (here a copy): refused before anything is written.
  const fs::path ck = tmp.path() / "ck";
  fs::create_directories(ck);
  for (const auto& e : fs::directory_iterator(hf)) fs::copy_file(e.path(), ck / e.path().filename());
  r = run_kmoe("block --checkpoint " + q(ck) + " --layer 0 --inputs " + q(inputs) + " --out " +
               q(ck / "model.safetensors"));
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("--checkpoint"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(ck / "model.safetensors"));
}

// Tensor names and metadata come from the file: inspect prints them escaped, so a newline cannot forge a line and a
// terminal escape never reaches the screen.
TEST(CliPaths, InspectPrintsNamesAndMetadataEscaped) {
  ScratchDir tmp("cli-inspect-escaped");
  const std::string name = "evil\n\x1b[31mred";
  const std::string header = "{\"__metadata__\":{\"note\":\"a\\u001b[2Jb\"},\"" +
                             std::string("evil\\n\\u001b[31mred") + "\":{\"dtype\":\"F32\",\"shape\":[1],"
                             "\"data_offsets\":[0,4]}}";
  const fs::path file = tmp.path() / "evil.safetensors";
  {
    std::ofstream f(file, std::ios::binary);
    const std::uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header;
    f.write("\0\0\0\0", 4);
  }
  const auto r = run_kmoe("inspect " + q(file));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find('\x1b'), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find(name), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("evil"), std::string::npos) << r.out;
  for (std::size_t at = 0, line = 0; at < r.out.size(); ++line) {  // no line starts with the name's tail
    const std::size_t end = r.out.find('\n', at);
    EXPECT_NE(r.out.compare(at, 3, "red"), 0) << "line " << line << ": " << r.out;
    at = end == std::string::npos ? r.out.size() : end + 1;
  }
}

TEST(CliSizes, APaddedBlockBeyondTheMachinesMemoryIsRefusedBeforeAllocating) {
  ScratchDir tmp("cli-block-size");
  const fs::path out = tmp.path() / "out.safetensors";
  const auto r = run_kmoe(block_args(out, "--layer 0 --impl padded --block 2000000000"));
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("--block 2000000000"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("memory"), std::string::npos) << r.err;
  EXPECT_TRUE(one_line(r.err)) << r.err;
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
