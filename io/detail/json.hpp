// nlohmann::json for io/'s parsers (header-only, private to the library: it does not appear in public headers).
#pragma once

#include <kmoe/core/error.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <string>

namespace kmoe::io::detail {

using json = nlohmann::json;

/// Deepest nesting accepted in a JSON file kmoe reads (config.json, index json): real ones nest 3 or 4 levels. The
/// bound keeps hostile files ([[[[... a million deep) from exhausting memory or the stack of anything that walks
/// the value afterwards.
inline constexpr int kMaxJsonDepth = 64;

/// A JSON value's type for messages ("string", "number", ...).
inline std::string json_type(const json& j) { return j.type_name(); }

/// A JSON value for a message: scalars as JSON text (cut to 64 bytes), arrays and objects by their type and size
/// only, never serialised whole.
inline std::string json_brief(const json& j) {
  if (j.is_array()) return "an array of " + std::to_string(j.size()) + " elements";
  if (j.is_object()) return "an object of " + std::to_string(j.size()) + " keys";
  return ::kmoe::detail::printable(j.dump(), 64);
}

/// Parses JSON text, refusing nesting deeper than kMaxJsonDepth; kmoe::InputError naming `label` otherwise.
inline json parse_json_text(const std::string& text, const std::string& label) {
  const auto bound = [&](int depth, json::parse_event_t event, json&) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= kMaxJsonDepth)
      throw InputError(::kmoe::detail::concat(label, ": JSON nests deeper than ", kMaxJsonDepth, " levels"));
    return true;
  };
  try {
    return json::parse(text, bound);
  } catch (const json::exception& e) {
    throw InputError(::kmoe::detail::concat(label, ": not valid JSON: ", e.what()));
  }
}

}  // namespace kmoe::io::detail
