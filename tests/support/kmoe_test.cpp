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
  auto slurp = [](const std::filesystem::path& p) {
    std::ifstream f(p);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  };
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

}  // namespace kmoe::test
