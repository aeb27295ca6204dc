/// \file error.hpp
/// \brief kmoe's error types and check macros.
///
/// Boundary checks throw kmoe::InputError (bad data: a file, a tensor, a shape; the CLI exits 1) or kmoe::UsageError
/// (bad arguments; the CLI exits 2) with a message that names the function, file, tensor or value at fault. Internal
/// invariants use KMOE_ASSERT, which reports file:line. Vendor calls (CUDA, cuBLAS, NCCL, MPI, HDF5) get their own
/// checked-call macros beside their backends.
///
/// A message is always one printable line: names and values taken from files may hold newlines, terminal escape
/// sequences or megabytes of text, so every Error escapes control characters and invalid UTF-8 and caps its length
/// (detail::one_line). Helpers for quoting such values (detail::printable) and shapes (detail::dims_text) keep the
/// interesting part of a message short.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace kmoe {

namespace detail {
/// Longest message an Error keeps (bytes, before escaping); longer ones are cut with a note of what was dropped.
inline constexpr std::size_t kMaxMessageBytes = 4096;

/// `s` made safe to print on one terminal line: C0 controls, DEL and the C1 controls (U+0080..U+009F) escaped
/// (\n, \r, \t, \xNN, \u0080...), bytes that are not UTF-8 as \xNN; at most `max_bytes` of `s` are kept, the
/// rest replaced by "...(N more bytes)". Backslashes are kept as they are.
std::string printable(std::string_view s, std::size_t max_bytes = 256);

/// Length of the UTF-8 sequence starting at s[i] (RFC 3629: no overlongs, no surrogates, <= U+10FFFF); 0 if invalid.
std::size_t utf8_length(std::string_view s, std::size_t i);

/// A message as an Error stores it: printable(msg, kMaxMessageBytes).
std::string one_line(std::string_view msg);

/// "[6, 96, 64]"; a shape of more than `max_shown` dimensions is shortened to its first ones and its rank,
/// "[1, 1, 1, 1, 1, 1, 1, 1, ... (100000 dimensions)]".
template <class Dims>
std::string dims_text(const Dims& dims, std::size_t max_shown = 8) {
  std::string s = "[";
  std::size_t i = 0;
  for (const auto& d : dims) {
    if (i == max_shown) {
      s += ", ... (" + std::to_string(dims.size()) + " dimensions)";
      break;
    }
    s += (i ? ", " : "") + std::to_string(d);
    ++i;
  }
  return s + "]";
}
}  // namespace detail

/// Any failure kmoe reports. The message is stored as detail::one_line(message).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(detail::one_line(message)) {}
  explicit Error(const char* message) : Error(std::string(message)) {}
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
