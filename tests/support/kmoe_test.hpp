// Helpers shared by kmoe's tests: where the oracle lives, a scratch directory, and running the kmoe command.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace kmoe::test {

/// The transformers oracle, as configured by KMOE_TESTDATA_DIR.
inline std::filesystem::path testdata_dir() { return KMOE_TEST_TESTDATA_DIR; }
/// The repository's own tiny checkpoint (tests/data).
inline std::filesystem::path repo_data_dir() { return KMOE_TEST_REPO_DATA_DIR; }
/// The kmoe executable of this build.
inline std::filesystem::path kmoe_exe() { return KMOE_TEST_CLI; }

/// A fresh directory under the build tree, removed when the object dies.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag);
  ~ScratchDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// The result of running a command: its exit code and what it wrote on stdout and stderr.
struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

/// Runs `command` through /bin/sh and captures its output (stderr is not a terminal, so no progress bars).
CommandResult run_command(const std::string& command);

/// The whole content of a file as bytes ("" when it cannot be read).
std::string read_file_bytes(const std::filesystem::path& p);

/// Every file of `original` has a byte-identical twin in `converted`, and `converted` holds no other regular file.
void expect_same_files(const std::filesystem::path& original, const std::filesystem::path& converted);

/// Runs the kmoe executable with the given argument string.
inline CommandResult run_kmoe(const std::string& args) { return run_command(kmoe_exe().string() + " " + args); }

}  // namespace kmoe::test
