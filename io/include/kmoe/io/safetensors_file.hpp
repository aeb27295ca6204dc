/// \file safetensors_file.hpp
/// \brief The Kokkos-free part of <kmoe/io/safetensors.hpp>: reading (mmap, zero-copy views) and byte-exact writing.
///
/// Include <kmoe/io/safetensors.hpp> for this plus the conversions to Kokkos host Views. This header stays free of
/// Kokkos so the header parser can be built alone (the libFuzzer target compiles it with clang).
#pragma once

#include <kmoe/core/error.hpp>
#include <kmoe/io/dtype.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace kmoe::io {

namespace detail {
using ::kmoe::detail::concat;
}  // namespace detail

/// One tensor of a safetensors file: a typed, zero-copy view onto the file's mapping (row-major, little-endian).
struct TensorView {
  std::string name;                  ///< the tensor's name in the header
  DType dtype = DType::F32;          ///< element type
  std::vector<std::int64_t> shape;   ///< dimensions, row-major (empty = scalar)
  const std::byte* data = nullptr;   ///< first byte of the tensor inside the mapping
  std::size_t nbytes = 0;            ///< bytes of the tensor (= numel * dtype size)
  std::string file;                  ///< the file it came from (for error messages)
  std::shared_ptr<const void> owner; ///< keeps the mapping alive while this view exists

  /// Product of the dimensions (1 for a scalar).
  std::int64_t numel() const;
  /// "[6, 96, 64]"
  std::string shape_string() const;
  /// "file: tensor 'name'" — the prefix of every error message about this tensor.
  std::string where() const;
};

/// A memory-mapped safetensors file. Cheap to copy (the mapping is shared); every TensorView keeps it alive.
class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws kmoe::InputError (one line, naming the file and tensor) on any malformation:
  /// see docs/io.md for the list. An empty file (0 tensors, no data) needs at least the 8-byte size and "{}".
  static SafetensorsFile open(const std::filesystem::path& path);

  /// Parses an in-memory copy of a file (kept alive by `bytes`); `label` names it in error messages.
  static SafetensorsFile from_bytes(std::shared_ptr<const std::vector<std::byte>> bytes, const std::string& label);

  /// The tensor called `name`; kmoe::InputError naming the file and the tensor when absent.
  const TensorView& tensor(const std::string& name) const;
  /// True when the file holds a tensor called `name`.
  bool has(const std::string& name) const;
  /// Tensor names in file order (ascending data offset).
  std::vector<std::string> names() const;
  /// Tensors in file order (ascending data offset).
  const std::vector<TensorView>& tensors() const;
  /// The "__metadata__" map (empty when absent).
  const std::map<std::string, std::string>& metadata() const;
  /// The "__metadata__" entries in header order (the Python library writes them in its HashMap's arbitrary order;
  /// write_safetensors_ordered with these reproduces such a file byte for byte).
  const std::vector<std::pair<std::string, std::string>>& metadata_entries() const;
  /// True when the header has a "__metadata__" entry (even an empty one).
  bool has_metadata() const;
  /// The path given to open() (or the label given to from_bytes()).
  const std::filesystem::path& path() const;
  /// Size of the JSON header in bytes, padding included (the N of the 8-byte prefix).
  std::uint64_t header_size() const;
  /// Total size of the file in bytes.
  std::uint64_t file_size() const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

/// A tensor to write: its bytes are either borrowed (`data`, must outlive the write) or owned (`owned`).
struct TensorToWrite {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;    ///< borrowed bytes (row-major, little-endian); when null, `owned` is used
  std::vector<std::byte> owned;  ///< owned bytes

  /// The bytes to write.
  const std::byte* bytes() const { return data ? static_cast<const std::byte*>(data) : owned.data(); }
  /// Bytes the dtype and shape call for (InputError naming the tensor when they overflow or do not fill whole bytes).
  std::size_t expected_nbytes() const;
  /// Borrows the bytes of a read tensor (same name, dtype, shape); keep the file open until written.
  static TensorToWrite borrow(const TensorView& t);
  /// Borrows the bytes of a read tensor under a new name.
  static TensorToWrite borrow(std::string name, const TensorView& t);
};

/// The tensors kmoe's writers (and the Python library) produce.
using NamedTensorBytes = TensorToWrite;

/// Writes a safetensors file exactly as the Python `safetensors` library (serialize_file/save_file) does: tensors
/// sorted by descending dtype (safetensors' enum order) then by name, compact JSON with "__metadata__" first (keys
/// sorted), header padded with spaces to a multiple of 8. Atomic: written to a temporary file in the same directory,
/// fsync'ed, then renamed over `path`. A progress bar shows on a terminal for files over ~1 GB.
/// \param path     [in] destination
/// \param tensors  [in] the tensors (any order; names must be unique; bytes must match dtype and shape)
/// \param metadata [in] the "__metadata__" map; std::nullopt writes no "__metadata__" entry
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::optional<std::map<std::string, std::string>>& metadata =
                           std::map<std::string, std::string>{{"format", "pt"}});

/// Metadata entries in the order to write them.
using MetadataEntries = std::vector<std::pair<std::string, std::string>>;

/// As write_safetensors, with the "__metadata__" entries written in the given order (e.g. a read file's
/// metadata_entries(), to reproduce it byte for byte). Keys must be unique.
void write_safetensors_ordered(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                               const std::optional<MetadataEntries>& metadata);

/// The header JSON (unpadded) write_safetensors_ordered would produce for these tensors, in the order it writes
/// them; `order` receives the indices of `tensors` in file order.
std::string safetensors_header_json(const std::vector<TensorToWrite>& tensors,
                                    const std::optional<MetadataEntries>& metadata,
                                    std::vector<std::size_t>* order = nullptr);

}  // namespace kmoe::io
