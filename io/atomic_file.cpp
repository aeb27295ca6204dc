#include <kmoe/io/atomic_file.hpp>

#include <kmoe/core/error.hpp>

#include "detail/file_util.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>

namespace kmoe::io {
namespace {

std::atomic<unsigned> g_counter{0};

std::string errno_text() { return std::strerror(errno); }

}  // namespace

AtomicFile::AtomicFile(std::filesystem::path path) : path_(std::move(path)) {
  const auto dir = path_.has_parent_path() ? path_.parent_path() : std::filesystem::path(".");
  KMOE_CHECK_INPUT(!path_.filename().empty(), "cannot write '", path_.string(), "': not a file name");
  temp_ = dir / ("." + path_.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                 std::to_string(g_counter++));
  fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  KMOE_CHECK_INPUT(fd_ >= 0, "cannot write '", path_.string(), "': cannot create a temporary file in '",
                   dir.string(), "': ", errno_text());
}

AtomicFile::~AtomicFile() {
  if (committed_) return;
  if (fd_ >= 0) ::close(fd_);
  ::unlink(temp_.c_str());
}

void AtomicFile::write(const void* data, std::size_t n) {
  KMOE_ASSERT(fd_ >= 0 && !committed_, "write after commit");
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    // Large writes are split: some kernels cap one write() at 2 GiB.
    const std::size_t chunk = n < (std::size_t(1) << 30) ? n : (std::size_t(1) << 30);
    const ssize_t w = ::write(fd_, p, chunk);
    if (w < 0 && errno == EINTR) continue;
    KMOE_CHECK_INPUT(w > 0, "cannot write '", path_.string(), "': ", w < 0 ? errno_text() : "no progress");
    p += w;
    n -= static_cast<std::size_t>(w);
    written_ += static_cast<std::size_t>(w);
  }
}

void AtomicFile::commit() {
  KMOE_ASSERT(fd_ >= 0 && !committed_, "commit twice");
  KMOE_CHECK_INPUT(::fsync(fd_) == 0, "cannot write '", path_.string(), "': fsync: ", errno_text());
  const int rc = ::close(fd_);
  fd_ = -1;
  KMOE_CHECK_INPUT(rc == 0, "cannot write '", path_.string(), "': close: ", errno_text());
  KMOE_CHECK_INPUT(::rename(temp_.c_str(), path_.c_str()) == 0, "cannot write '", path_.string(),
                   "': rename: ", errno_text());
  committed_ = true;
  // The rename is durable only once the directory entry is.
  const auto dir = path_.has_parent_path() ? path_.parent_path() : std::filesystem::path(".");
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

namespace detail {

std::string read_regular_file(const std::filesystem::path& path, std::size_t max_bytes) {
  const std::string p = path.string();
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  KMOE_CHECK_INPUT(fd >= 0, p, ": cannot open: ", errno_text());
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  KMOE_CHECK_INPUT(::fstat(fd, &st) == 0, p, ": cannot stat: ", errno_text());
  KMOE_CHECK_INPUT(S_ISREG(st.st_mode), p, ": not a regular file (",
                   S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket", ")");
  KMOE_CHECK_INPUT(static_cast<std::uint64_t>(st.st_size) <= max_bytes, p, ": ", st.st_size,
                   " bytes, more than the ", max_bytes, " bytes such a file may have");
  std::string out(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t r = ::read(fd, out.data() + done, out.size() - done);
    if (r < 0 && errno == EINTR) continue;
    KMOE_CHECK_INPUT(r >= 0, p, ": read error: ", errno_text());
    if (r == 0) break;  // shrank while reading
    done += static_cast<std::size_t>(r);
  }
  out.resize(done);
  return out;
}

std::filesystem::file_type path_type(const std::filesystem::path& path) {
  std::error_code ec;
  const bool exists = std::filesystem::exists(path, ec);
  KMOE_CHECK_INPUT(!ec, path.string(), ": cannot look at it: ", ec.message());
  if (!exists) return std::filesystem::file_type::not_found;
  const auto st = std::filesystem::status(path, ec);
  KMOE_CHECK_INPUT(!ec, path.string(), ": cannot look at it: ", ec.message());
  return st.type();
}

bool path_exists(const std::filesystem::path& path) {
  return path_type(path) != std::filesystem::file_type::not_found;
}

bool is_plain_file_name(std::string_view name) {
  if (name.empty() || name.size() > 255 || name == "." || name == "..") return false;
  for (const char c : name)
    if (c == '/' || static_cast<unsigned char>(c) < 0x20 || c == 0x7F) return false;
  return true;
}

void check_plain_file_name(std::string_view name, const std::string& where, const char* kind) {
  KMOE_CHECK_INPUT(is_plain_file_name(name), where, ": ", kind, " '", kmoe::detail::printable(name),
                   "' is not a plain file name (no '/', '..', NUL or control characters): refusing to write outside ",
                   "the output directory");
}

}  // namespace detail

void write_file_atomic(const std::filesystem::path& path, std::string_view contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

}  // namespace kmoe::io
