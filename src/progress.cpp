#include <kmoe/core/progress.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace kmoe {
namespace {

std::string format_amount(std::int64_t v, ProgressBar::Unit unit) {
  char buf[32];
  if (unit == ProgressBar::Unit::Items) {
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v));
    return buf;
  }
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double x = static_cast<double>(v);
  int u = 0;
  while (x >= 1024.0 && u < 4) {
    x /= 1024.0;
    ++u;
  }
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", x, units[u]);
  return buf;
}

}  // namespace

bool ProgressBar::stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

ProgressBar::ProgressBar(std::string label, std::int64_t total, Unit unit, bool enabled)
    : label_(std::move(label)), total_(total), unit_(unit), active_(enabled && total > 0 && stderr_is_terminal()) {}

ProgressBar::~ProgressBar() {
  if (drawn_ && !finished_) std::fputc('\n', stderr);
}

void ProgressBar::update(std::int64_t done) {
  if (!active_ || finished_) return;
  done_ = std::clamp<std::int64_t>(done, 0, total_);
  const auto now = std::chrono::steady_clock::now();
  // Redrawing on every call would make the bar the bottleneck of a tight loop.
  if (drawn_ && done_ < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  draw();
}

void ProgressBar::finish() {
  if (!active_ || finished_) return;
  done_ = total_;
  draw();
  std::fputc('\n', stderr);
  std::fflush(stderr);
  finished_ = true;
}

void ProgressBar::draw() {
  constexpr int width = 30;
  const double frac = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1.0;
  const int filled = static_cast<int>(frac * width);
  std::string bar(static_cast<std::size_t>(filled), '#');
  bar.append(static_cast<std::size_t>(width - filled), '.');
  std::fprintf(stderr, "\r%s [%s] %3d%% %s/%s", label_.c_str(), bar.c_str(), static_cast<int>(frac * 100.0),
               format_amount(done_, unit_).c_str(), format_amount(total_, unit_).c_str());
  std::fflush(stderr);
  drawn_ = true;
}

}  // namespace kmoe
