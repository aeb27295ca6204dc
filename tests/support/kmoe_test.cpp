#include "kmoe_test.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

namespace kmoe::test {

ScratchDir::ScratchDir(const std::string& tag) {
  std::random_device rd;
  path_ = std::filesystem::path(KMOE_TEST_SCRATCH_DIR) /
          (tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(rd() % 1000000));
  std::filesystem::remove_all(path_);
  std::filesystem::create_directories(path_);
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

CommandResult run_command(const std::string& command) {
  ScratchDir tmp("cmd");
  const auto out = tmp.path() / "out", err = tmp.path() / "err";
  const std::string full = command + " >" + out.string() + " 2>" + err.string() + " </dev/null";
  const int status = std::system(full.c_str());
  CommandResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  r.out = read_file_bytes(out);
  r.err = read_file_bytes(err);
  return r;
}

std::string read_file_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void expect_same_files(const std::filesystem::path& original, const std::filesystem::path& converted) {
  std::size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(original)) {
    const auto twin = converted / e.path().filename();
    ASSERT_TRUE(std::filesystem::exists(twin)) << twin;
    EXPECT_TRUE(read_file_bytes(e.path()) == read_file_bytes(twin)) << "differs: " << twin;
    ++n;
  }
  std::size_t m = 0;
  for (const auto& e : std::filesystem::directory_iterator(converted)) m += e.is_regular_file() ? 1 : 0;
  EXPECT_EQ(m, n) << converted;
}

}  // namespace kmoe::test
