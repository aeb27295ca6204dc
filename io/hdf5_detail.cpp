// Checked HDF5 calls: error-stack silencing, message extraction, RAII close.
#include "hdf5_detail.hpp"

#include <mutex>

namespace kmoe::io::detail {

void hdf5_silence() {
  static std::once_flag once;
  std::call_once(once, [] {
    // H5open initialises the library (and its default error stack) before we switch the printing off.
    if (H5open() < 0) throw InternalError("HDF5: H5open failed");
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  });
}

namespace {
herr_t collect_innermost(unsigned n, const H5E_error2_t* err, void* data) {
  // Walking downward, the last entry is the innermost one: the place where HDF5 detected the problem.
  auto* out = static_cast<std::string*>(data);
  if (err->desc && *err->desc) *out = err->desc;
  (void)n;
  return 0;
}
}  // namespace

std::string hdf5_error_message() {
  std::string msg;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_innermost, &msg);
  H5Eclear2(H5E_DEFAULT);
  return msg;
}

void hdf5_fail(const char* call, const std::string& where, const char* file, int line) {
  std::string msg = hdf5_error_message();
  throw InputError(::kmoe::detail::concat(where, ": HDF5 call ", call, " failed", msg.empty() ? "" : ": ", msg, " [", file, ":", line,
                          "]"));
}

void H5Handle::reset() {
  if (id_ == H5I_INVALID_HID) return;
  // Closing in a destructor must not throw: the close result of an error path is irrelevant.
  switch (H5Iget_type(id_)) {
    case H5I_FILE: H5Fclose(id_); break;
    case H5I_GROUP: H5Gclose(id_); break;
    case H5I_DATASET: H5Dclose(id_); break;
    case H5I_DATASPACE: H5Sclose(id_); break;
    case H5I_DATATYPE: H5Tclose(id_); break;
    case H5I_ATTR: H5Aclose(id_); break;
    case H5I_GENPROP_LST: H5Pclose(id_); break;
    default: break;
  }
  id_ = H5I_INVALID_HID;
}

void H5Handle::close_file_checked(const std::string& where) {
  const hid_t id = std::exchange(id_, H5I_INVALID_HID);
  if (id == H5I_INVALID_HID) return;
  KMOE_H5(H5Fclose(id), where);
}

}  // namespace kmoe::io::detail
