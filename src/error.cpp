#include <kmoe/core/error.hpp>

namespace kmoe::detail {

void throw_internal(const char* cond, const char* file, int line, const std::string& msg) {
  std::ostringstream os;
  os << "kmoe internal error: " << file << ":" << line << ": check '" << cond << "' failed";
  if (!msg.empty()) os << ": " << msg;
  throw InternalError(os.str());
}

}  // namespace kmoe::detail
