// Internal to io/hdf5_*.cpp: checked HDF5 calls and RAII handles. HDF5's automatic error printing is switched off
// once; a failed call throws kmoe::InputError with the call text, HDF5's innermost error message, the file/dataset
// being worked on, and file:line.
#pragma once

#include <hdf5.h>

#include <kmoe/core/error.hpp>

#include <cstdint>
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

}  // namespace kmoe::io::detail

/// Checks an HDF5 call returning hid_t/herr_t/htri_t (negative = failure); `where` names the file/dataset.
#define KMOE_H5(call, where)                                                         \
  ([&]() {                                                                           \
    auto kmoe_h5_r = (call);                                                         \
    if (kmoe_h5_r < 0) ::kmoe::io::detail::hdf5_fail(#call, (where), __FILE__, __LINE__); \
    return kmoe_h5_r;                                                                \
  }())
