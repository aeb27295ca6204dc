// Checked HDF5 calls: error-stack silencing, message extraction, RAII close.
#include "hdf5_detail.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
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

namespace fs = std::filesystem;

void fsync_path(const fs::path& p, bool directory) {
  const int fd = ::open(p.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  KMOE_CHECK_INPUT(fd >= 0, p.string(), ": cannot open for fsync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  KMOE_CHECK_INPUT(rc == 0, p.string(), ": fsync failed: ", std::strerror(err));
}

namespace {
void rename_or_throw(const fs::path& from, const fs::path& to) {
  KMOE_CHECK_INPUT(::rename(from.c_str(), to.c_str()) == 0, "cannot rename ", from.string(), " to ", to.string(), ": ",
                   std::strerror(errno));
}
fs::path sibling_old_dir(const fs::path& dir) {
  return dir.parent_path() / ("." + dir.filename().string() + ".kmoe-old");
}
}  // namespace

fs::path sibling_temp_dir(const fs::path& dir) {
  return dir.parent_path() / ("." + dir.filename().string() + ".kmoe-tmp");
}

void prepare_temp_dir(const fs::path& tmp) {
  std::error_code ec;
  fs::create_directories(tmp.parent_path(), ec);
  KMOE_CHECK_INPUT(!ec, tmp.parent_path().string(), ": cannot create directory: ", ec.message());
  const std::string name = tmp.filename().string();
  const std::string base = name.substr(1, name.size() - 1 - std::string(".kmoe-tmp").size());
  fs::remove_all(tmp, ec);
  fs::remove_all(tmp.parent_path() / ("." + base + ".kmoe-old"), ec);
  fs::create_directory(tmp, ec);
  KMOE_CHECK_INPUT(!ec, tmp.string(), ": cannot create directory: ", ec.message());
}

void commit_directory(const fs::path& tmp, const fs::path& dir,
                      const std::function<void(const std::string&)>& stage) {
  fsync_path(tmp, true);
  const fs::path parent = dir.parent_path(), old = sibling_old_dir(dir);
  if (fs::exists(dir)) {
    // Replacing a directory of the same name: swap atomically where the file system can, so that one complete
    // version is under `dir` at every moment.
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
      stage("renamed");
      fsync_path(parent, true);
      fs::remove_all(tmp);
      return;
    }
    rename_or_throw(dir, old);
    stage("old-moved");
  }
  rename_or_throw(tmp, dir);
  stage("renamed");
  fsync_path(parent, true);
  fs::remove_all(old);
}

}  // namespace kmoe::io::detail
