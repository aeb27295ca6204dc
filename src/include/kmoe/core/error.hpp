/// \file error.hpp
/// \brief kmoe's error types and check macros.
///
/// Boundary checks throw kmoe::InputError (bad data: a file, a tensor, a shape; the CLI exits 1) or kmoe::UsageError
/// (bad arguments; the CLI exits 2) with a message that names the function, file, tensor or value at fault. Internal
/// invariants use KMOE_ASSERT, which reports file:line. Vendor calls (CUDA, cuBLAS, NCCL, MPI, HDF5) get their own
/// checked-call macros beside their backends.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace kmoe {

/// Any failure kmoe reports.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Bad input data: a corrupt or truncated file, a missing tensor, a wrong shape or dtype. CLI exit code 1.
class InputError : public Error {
 public:
  using Error::Error;
};

/// Bad usage: an unknown option, a missing or malformed argument. CLI exit code 2.
class UsageError : public Error {
 public:
  using Error::Error;
};

/// A failed internal invariant or vendor call: a bug or a broken environment, never the user's data.
class InternalError : public Error {
 public:
  using Error::Error;
};

namespace detail {
/// Joins the stream-able arguments into one string (used by the check macros).
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
[[noreturn]] void throw_internal(const char* cond, const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace kmoe

/// Throws kmoe::InputError with the concatenated message when cond is false.
#define KMOE_CHECK_INPUT(cond, ...) \
  do {                              \
    if (!(cond)) throw ::kmoe::InputError(::kmoe::detail::concat(__VA_ARGS__)); \
  } while (0)

/// Throws kmoe::UsageError with the concatenated message when cond is false.
#define KMOE_CHECK_USAGE(cond, ...) \
  do {                              \
    if (!(cond)) throw ::kmoe::UsageError(::kmoe::detail::concat(__VA_ARGS__)); \
  } while (0)

/// Internal invariant: throws kmoe::InternalError naming the condition and file:line.
#define KMOE_ASSERT(cond, ...) \
  do {                         \
    if (!(cond)) ::kmoe::detail::throw_internal(#cond, __FILE__, __LINE__, ::kmoe::detail::concat("" __VA_ARGS__)); \
  } while (0)
