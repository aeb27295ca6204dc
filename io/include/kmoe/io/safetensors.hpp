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
#include <kmoe/io/safetensors_file.hpp>

#include <Kokkos_Core.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::io {

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
