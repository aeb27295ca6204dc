/// \file atomic_file.hpp
/// \brief Atomic file writes: a temporary file in the destination's directory, fsync, rename.
///
/// A reader never sees a half-written file, and a crash leaves the old file (or none) plus, at worst, a stray
/// `.NAME.tmp-PID-N` file. Used by every kmoe writer (safetensors, index json, HDF5 checkpoints, converted checkpoints).
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

namespace kmoe::io {

/// An open temporary file that replaces `path` on commit(); destroyed without commit, it is removed.
class AtomicFile {
 public:
  /// Creates the temporary file beside `path`; kmoe::InputError naming the path when it cannot.
  explicit AtomicFile(std::filesystem::path path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Appends n bytes; kmoe::InputError naming the path on a write failure (disk full...).
  void write(const void* data, std::size_t n);
  /// Bytes written so far.
  std::size_t size() const { return written_; }
  /// The temporary file's path (e.g. for HDF5, which opens files itself; close any handle before commit()).
  const std::filesystem::path& temp_path() const { return temp_; }
  /// fsync's the file, renames it over the destination and fsync's the directory.
  void commit();

 private:
  std::filesystem::path path_, temp_;
  int fd_ = -1;
  std::size_t written_ = 0;
  bool committed_ = false;
};

/// Writes `contents` to `path` atomically.
void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

}  // namespace kmoe::io
