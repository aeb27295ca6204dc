/// \file progress.hpp
/// \brief A one-line progress bar on stderr, drawn only when stderr is a terminal.
///
/// For long reads/writes (over ~1 GB: kProgressMinBytes), benchmarks, training loops. Redraws at most every 100 ms
/// and on completion; never prints to a pipe or a file (logs and tests stay clean), so it is safe to create always.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace kmoe {

/// Reads and writes at least this big get a progress bar (when stderr is a terminal).
inline constexpr std::int64_t kProgressMinBytes = std::int64_t(1) << 30;

/// A progress bar: `label [#####.....]  42% 1.2/2.9 GiB`.
class ProgressBar {
 public:
  enum class Unit { Items, Bytes };

  /// \param label   [in] what is progressing ("writing model.safetensors")
  /// \param total   [in] the count at completion (> 0; 0 draws nothing)
  /// \param unit    [in] Bytes prints sizes in KiB/MiB/GiB, Items prints counts
  /// \param enabled [in] false disables it (e.g. on MPI ranks other than 0); it is also off unless isatty(stderr)
  ProgressBar(std::string label, std::int64_t total, Unit unit = Unit::Items, bool enabled = true);
  /// Finishes the line if something was drawn.
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  /// Sets the count done so far (clamped to total); redraws if due.
  void update(std::int64_t done);
  /// Draws 100% and ends the line (idempotent).
  void finish();
  /// True when the bar draws (enabled, total > 0 and stderr a terminal).
  bool active() const { return active_; }

  /// True when stderr is a terminal.
  static bool stderr_is_terminal();

 private:
  void draw();
  std::string label_;
  std::int64_t total_, done_ = 0;
  Unit unit_;
  bool active_, drawn_ = false, finished_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace kmoe
