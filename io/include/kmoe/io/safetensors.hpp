/// \file safetensors.hpp
/// \brief Reading and writing safetensors files, byte-exact with the Python `safetensors` library.
///
/// Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header size N, N bytes of UTF-8 JSON
/// (an object: optional "__metadata__" string->string map, and per tensor {"dtype","shape","data_offsets"}), padded
/// with spaces to a multiple of 8, then the data buffer. The tensors' [begin,end) offsets cover the buffer exactly,
/// without holes or overlaps. See docs/io.md for what byte-exact means and for the errors reported.
///
/// Reading memory-maps the file: a TensorView points into the mapping (zero copy) and keeps it alive. Conversion to
/// Kokkos host Views of float/double/bf16/int64 is explicit (to_host_view). Every error on bad input is a one-line
/// kmoe::InputError naming the file and, where one is at fault, the tensor.
#pragma once

#include <kmoe/core/bf16.hpp>
#include <kmoe/core/error.hpp>
#include <kmoe/io/dtype.hpp>

#include <Kokkos_Core.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::io {

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

namespace detail {
/// Converts every element of `t` into `out` (t.numel() elements). T is float, double, kmoe::bf16 (float dtypes only;
/// bf16 -> float is exact, f16 -> float exact, f64 -> float rounds to nearest) or std::int64_t / std::int32_t (BOOL and
/// integer dtypes). A dtype that cannot convert throws kmoe::InputError naming the file, tensor and both types.
template <class T>
void convert_tensor(const TensorView& t, T* out);
/// Encodes n elements of `in` as `dtype` into out (dtype_nbytes(dtype, n) bytes): float targets round to nearest even.
template <class T>
void encode_elements(const T* in, std::size_t n, DType dtype, std::byte* out, const std::string& what);
/// Throws InputError unless t has `rank` dimensions.
void check_rank(const TensorView& t, int rank);
}  // namespace detail

/// The tensor's elements, flattened row-major, as a new host View of T (see detail::convert_tensor for the types).
template <class T>
Kokkos::View<T*, Kokkos::HostSpace> to_host_view(const TensorView& t) {
  Kokkos::View<T*, Kokkos::HostSpace> v(Kokkos::view_alloc(Kokkos::WithoutInitializing, t.name),
                                        static_cast<std::size_t>(t.numel()));
  detail::convert_tensor(t, v.data());
  return v;
}

/// A rank-2 tensor as a new LayoutRight host View of T; InputError naming the tensor when its rank is not 2.
template <class T>
Kokkos::View<T**, Kokkos::LayoutRight, Kokkos::HostSpace> to_host_view_2d(const TensorView& t) {
  detail::check_rank(t, 2);
  Kokkos::View<T**, Kokkos::LayoutRight, Kokkos::HostSpace> v(Kokkos::view_alloc(Kokkos::WithoutInitializing, t.name),
                                                              t.shape[0], t.shape[1]);
  detail::convert_tensor(t, v.data());
  return v;
}

/// A rank-3 tensor as a new LayoutRight host View of T; InputError naming the tensor when its rank is not 3.
template <class T>
Kokkos::View<T***, Kokkos::LayoutRight, Kokkos::HostSpace> to_host_view_3d(const TensorView& t) {
  detail::check_rank(t, 3);
  Kokkos::View<T***, Kokkos::LayoutRight, Kokkos::HostSpace> v(
      Kokkos::view_alloc(Kokkos::WithoutInitializing, t.name), t.shape[0], t.shape[1], t.shape[2]);
  detail::convert_tensor(t, v.data());
  return v;
}

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

/// The header JSON (unpadded) write_safetensors would produce for these tensors, in the order it writes them;
/// `order` receives the indices of `tensors` in file order.
std::string safetensors_header_json(const std::vector<TensorToWrite>& tensors,
                                    const std::optional<std::map<std::string, std::string>>& metadata,
                                    std::vector<std::size_t>* order = nullptr);

/// A host View (any rank <= 4, any layout, host-accessible) as a tensor to write, its elements copied row-major and
/// encoded as `dtype` (default: the View's own element type, e.g. double -> F64, std::int64_t -> I64).
template <class ViewType>
TensorToWrite tensor_from_host_view(std::string name, const ViewType& view,
                                    std::optional<DType> dtype = std::nullopt) {
  using T = typename ViewType::non_const_value_type;
  constexpr int rank = static_cast<int>(ViewType::rank);
  static_assert(rank >= 0 && rank <= 4, "tensor_from_host_view: rank 0..4");
  auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), view);
  TensorToWrite out;
  out.name = std::move(name);
  out.dtype = dtype ? *dtype : dtype_of<T>();
  std::vector<T> flat;
  flat.reserve(host.size());
  for (int r = 0; r < rank; ++r) out.shape.push_back(static_cast<std::int64_t>(host.extent(r)));
  if constexpr (rank == 0) {
    flat.push_back(host());
  } else if constexpr (rank == 1) {
    for (std::size_t i = 0; i < host.extent(0); ++i) flat.push_back(host(i));
  } else if constexpr (rank == 2) {
    for (std::size_t i = 0; i < host.extent(0); ++i)
      for (std::size_t j = 0; j < host.extent(1); ++j) flat.push_back(host(i, j));
  } else if constexpr (rank == 3) {
    for (std::size_t i = 0; i < host.extent(0); ++i)
      for (std::size_t j = 0; j < host.extent(1); ++j)
        for (std::size_t k = 0; k < host.extent(2); ++k) flat.push_back(host(i, j, k));
  } else {
    for (std::size_t i = 0; i < host.extent(0); ++i)
      for (std::size_t j = 0; j < host.extent(1); ++j)
        for (std::size_t k = 0; k < host.extent(2); ++k)
          for (std::size_t l = 0; l < host.extent(3); ++l) flat.push_back(host(i, j, k, l));
  }
  out.owned.resize(out.expected_nbytes());
  detail::encode_elements(flat.data(), flat.size(), out.dtype, out.owned.data(), out.name);
  return out;
}

/// A contiguous host array as a tensor to write (copied and encoded as `dtype`).
template <class T>
TensorToWrite tensor_from_array(std::string name, const T* values, std::vector<std::int64_t> shape, DType dtype) {
  TensorToWrite out;
  out.name = std::move(name);
  out.dtype = dtype;
  out.shape = std::move(shape);
  out.owned.resize(out.expected_nbytes());
  std::size_t n = 1;
  for (auto d : out.shape) n *= static_cast<std::size_t>(d);
  detail::encode_elements(values, n, dtype, out.owned.data(), out.name);
  return out;
}

}  // namespace kmoe::io
