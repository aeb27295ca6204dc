// Reading small files (config.json, index json, the text files of a conversion) without trusting what the path is.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

namespace kmoe::io::detail {

/// The bytes of the regular file `path`, at most `max_bytes` of them. A FIFO, device or directory is refused before
/// anything could block on it (the open does not wait for a FIFO's writer); a missing, unreadable or larger file is
/// refused too. kmoe::InputError naming the path in every case.
std::string read_regular_file(const std::filesystem::path& path, std::size_t max_bytes);

/// Largest JSON text file (config.json, generation_config.json, model.safetensors.index.json) kmoe reads: a
/// transformers index of a million tensors is about 100 MB.
inline constexpr std::size_t kMaxJsonFileBytes = std::size_t(256) << 20;

/// Whether `path` exists (following symbolic links); kmoe::InputError naming it when it cannot be looked at (a
/// symbolic link loop, a permission denied), instead of std::filesystem's exception.
bool path_exists(const std::filesystem::path& path);

/// The type of `path` (following symbolic links; not_found when absent); InputError as for path_exists.
std::filesystem::file_type path_type(const std::filesystem::path& path);

/// True when `name` can only mean a file directly inside a directory: non-empty, at most 255 bytes, not "." or
/// "..", and free of '/', NUL and control characters.
bool is_plain_file_name(std::string_view name);

/// InputError "`where`: NAME_KIND 'NAME' is not a plain file name ..." unless is_plain_file_name(name).
void check_plain_file_name(std::string_view name, const std::string& where, const char* kind);

}  // namespace kmoe::io::detail
