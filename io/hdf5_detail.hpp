// Internal to io/hdf5_*.cpp: checked HDF5 calls and RAII handles. HDF5's automatic error printing is switched off
// once; a failed call throws kmoe::InputError with the call text, HDF5's innermost error message, the file/dataset
// being worked on, and file:line.
#pragma once

#include <hdf5.h>

#include <kmoe/core/error.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace kmoe::io::detail {

/// Switches HDF5's error-stack printing off (idempotent; called before any HDF5 use).
void hdf5_silence();

/// The innermost message of HDF5's current error stack ("" when empty).
std::string hdf5_error_message();

[[noreturn]] void hdf5_fail(const char* call, const std::string& where, const char* file, int line);

/// Closes an HDF5 id with the right H5*close when it goes out of scope.
class H5Handle {
 public:
  H5Handle() = default;
  explicit H5Handle(hid_t id) : id_(id) {}
  H5Handle(H5Handle&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)) {}
  H5Handle& operator=(H5Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  H5Handle(const H5Handle&) = delete;
  H5Handle& operator=(const H5Handle&) = delete;
  ~H5Handle() { reset(); }
  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }
  /// Closes now, ignoring the result (error paths and destructors).
  void reset();
  /// Closes a file id now and checks the result (buffered data reaches the OS here).
  void close_file_checked(const std::string& where);

 private:
  hid_t id_ = H5I_INVALID_HID;
};

// ---- atomic directories (HDF5 checkpoints and converted Hugging Face directories) ----------------------------

/// fsync of a file or a directory; InputError naming the path on failure.
void fsync_path(const std::filesystem::path& p, bool directory);

/// The temporary sibling a directory is built in: PARENT/.NAME.kmoe-tmp (one name, so a killed build's leftovers are
/// found and removed by the next one).
std::filesystem::path sibling_temp_dir(const std::filesystem::path& dir);

/// Creates `tmp` empty (removing leftovers of a killed run, and of a killed replacement: PARENT/.NAME.kmoe-old).
void prepare_temp_dir(const std::filesystem::path& tmp);

/// Makes the fully written `tmp` directory appear as `dir`: fsync tmp, then rename (or, when `dir` exists, swap
/// atomically with renameat2(RENAME_EXCHANGE) where the file system can, else move the old one aside first), fsync
/// the parent, remove the old contents. `stage` is called after each step (tests kill the process there).
void commit_directory(const std::filesystem::path& tmp, const std::filesystem::path& dir,
                      const std::function<void(const std::string&)>& stage);

}  // namespace kmoe::io::detail

/// Checks an HDF5 call returning hid_t/herr_t/htri_t (negative = failure); `where` names the file/dataset.
#define KMOE_H5(call, where)                                                         \
  ([&]() {                                                                           \
    auto kmoe_h5_r = (call);                                                         \
    if (kmoe_h5_r < 0) ::kmoe::io::detail::hdf5_fail(#call, (where), __FILE__, __LINE__); \
    return kmoe_h5_r;                                                                \
  }())
