// nlohmann::json for io/'s parsers (header-only, private to the library: it does not appear in public headers).
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace kmoe::io::detail {

using json = nlohmann::json;

/// A JSON value's type for messages ("string", "number", ...).
inline std::string json_type(const json& j) { return j.type_name(); }

}  // namespace kmoe::io::detail
