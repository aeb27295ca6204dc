// The kmoe command's contract: dispatch, --help/--version per subcommand, exit codes 0/1/2 with one-line messages.
#include <gtest/gtest.h>

#include "kmoe_test.hpp"

namespace {

using kmoe::test::run_kmoe;

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

}  // namespace
