#include <kmoe/core/error.hpp>

#include <algorithm>

namespace kmoe::detail {

/// Length of the UTF-8 sequence starting at s[i] (RFC 3629: no overlongs, no surrogates, <= U+10FFFF); 0 if invalid.
std::size_t utf8_length(std::string_view s, std::size_t i) {
  const auto at = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned c = at(i);
  if (c < 0x80) return 1;
  std::size_t len;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + len > s.size() || at(i + 1) < lo || at(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < len; ++k)
    if (at(i + k) < 0x80 || at(i + k) > 0xBF) return 0;
  return len;
}

namespace {

void hex_escape(std::string& out, const char* prefix, unsigned v) {
  static const char* hex = "0123456789abcdef";
  out += prefix;
  if (v > 0xFF) {
    out += hex[(v >> 12) & 15];
    out += hex[(v >> 8) & 15];
  }
  out += hex[(v >> 4) & 15];
  out += hex[v & 15];
}

}  // namespace

std::string printable(std::string_view s, std::size_t max_bytes) {
  std::string out;
  out.reserve(std::min(s.size(), max_bytes) + 16);
  std::size_t i = 0;
  while (i < s.size() && i < max_bytes) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const std::size_t len = utf8_length(s, i);
    if (len == 0) {
      hex_escape(out, "\\x", c);
      ++i;
    } else if (len == 1) {
      switch (c) {
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (c < 0x20 || c == 0x7F)
            hex_escape(out, "\\x", c);
          else
            out += static_cast<char>(c);
      }
      ++i;
    } else if (i + len > max_bytes) {
      break;  // do not cut a character in two
    } else if (len == 2 && c == 0xC2 && static_cast<unsigned char>(s[i + 1]) < 0xA0) {
      hex_escape(out, "\\u00", static_cast<unsigned char>(s[i + 1]));  // C1 control (CSI is U+009B)
      i += 2;
    } else {
      out.append(s.substr(i, len));
      i += len;
    }
  }
  if (i < s.size()) out += "...(" + std::to_string(s.size() - i) + " more bytes)";
  return out;
}

std::string one_line(std::string_view msg) { return printable(msg, kMaxMessageBytes); }

void throw_internal(const char* cond, const char* file, int line, const std::string& msg) {
  std::ostringstream os;
  os << "kmoe internal error: " << file << ":" << line << ": check '" << cond << "' failed";
  if (!msg.empty()) os << ": " << msg;
  throw InternalError(os.str());
}

}  // namespace kmoe::detail
