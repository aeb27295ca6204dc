// ProgressBar: silent unless stderr is a terminal; on a terminal (a pseudo-terminal here) it draws label, bar,
// percentage and sizes, and ends the line.
#include <kmoe/core/progress.hpp>

#include <gtest/gtest.h>

#include <fcntl.h>
#include <pty.h>
#include <unistd.h>

#include <cstdio>
#include <string>

namespace {

/// Runs `body` with stderr redirected to a pseudo-terminal and returns what was drawn.
template <class F>
std::string on_terminal(F&& body) {
  int master = -1, slave = -1;
  if (openpty(&master, &slave, nullptr, nullptr, nullptr) != 0) return "<no pty>";
  std::fflush(stderr);
  const int saved = dup(STDERR_FILENO);
  dup2(slave, STDERR_FILENO);
  body();
  std::fflush(stderr);
  dup2(saved, STDERR_FILENO);
  close(saved);
  close(slave);
  std::string out;
  fcntl(master, F_SETFL, O_NONBLOCK);
  char buf[4096];
  for (ssize_t n; (n = read(master, buf, sizeof buf)) > 0;) out.append(buf, static_cast<std::size_t>(n));
  close(master);
  return out;
}

TEST(Progress, SilentWhenStderrIsNotATerminal) {
  // ctest captures stderr through a pipe or file.
  if (kmoe::ProgressBar::stderr_is_terminal()) GTEST_SKIP() << "stderr is a terminal here";
  kmoe::ProgressBar bar("writing", 100, kmoe::ProgressBar::Unit::Bytes);
  EXPECT_FALSE(bar.active());
  bar.update(50);
  bar.finish();
}

TEST(Progress, DrawsOnATerminal) {
  const std::string out = on_terminal([] {
    kmoe::ProgressBar bar("writing x.safetensors", std::int64_t(3) << 30, kmoe::ProgressBar::Unit::Bytes);
    EXPECT_TRUE(bar.active());
    bar.update(std::int64_t(3) << 29);
    bar.finish();
    bar.finish();  // idempotent
    kmoe::ProgressBar off("off", 10, kmoe::ProgressBar::Unit::Items, /*enabled=*/false);
    EXPECT_FALSE(off.active());
    off.update(5);
    kmoe::ProgressBar zero("zero", 0);
    EXPECT_FALSE(zero.active());
  });
  if (out == "<no pty>") GTEST_SKIP() << "no pseudo-terminal";
  EXPECT_NE(out.find("writing x.safetensors ["), std::string::npos) << out;
  EXPECT_NE(out.find(" 50% 1.5 GiB/3.0 GiB"), std::string::npos) << out;
  EXPECT_NE(out.find("100% 3.0 GiB/3.0 GiB"), std::string::npos) << out;
  EXPECT_EQ(out.find("off"), std::string::npos) << out;
  EXPECT_EQ(out.find("zero"), std::string::npos) << out;
}

}  // namespace
