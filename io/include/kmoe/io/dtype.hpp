/// \file dtype.hpp
/// \brief The element types of the safetensors format, their names, sizes and C++ counterparts.
///
/// The enumerators are declared in the order of the Python/Rust safetensors library's `Dtype` enum, which is also the
/// order its writer sorts tensors by (descending dtype, then name): kmoe's byte-exact writer relies on it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace kmoe {
struct bf16;
}

namespace kmoe::io {

/// A safetensors element type. F4/F6_* are packed sub-byte formats (4 or 6 bits per element); C64 is a complex number
/// of two float32. Everything is little-endian.
enum class DType : std::uint8_t {
  BOOL,
  F4,
  F6_E2M3,
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
};

/// Number of DType enumerators (for tables and loops).
inline constexpr int kNumDTypes = static_cast<int>(DType::U64) + 1;

/// The spelling used in safetensors headers: "BF16", "F8_E4M3", ...
const char* dtype_name(DType dtype);

/// The DType spelled `name` in a safetensors header; std::nullopt when unknown.
std::optional<DType> parse_dtype(std::string_view name);

/// The DType spelled `name`; throws kmoe::InputError naming the value (and the accepted names) when unknown.
DType dtype_from_name(std::string_view name);

/// Bits per element (4 for F4, 6 for F6_*, 8..64 otherwise).
std::size_t dtype_bits(DType dtype);

/// Bytes per element, or 0 for the packed sub-byte types (F4, F6_*): use dtype_nbytes for those.
std::size_t dtype_size(DType dtype);

/// Bytes of `numel` elements; std::nullopt when the count is negative, overflows, or does not fill whole bytes
/// (a packed sub-byte tensor with numel * bits not a multiple of 8).
std::optional<std::uint64_t> dtype_nbytes(DType dtype, std::int64_t numel);

/// True for the floating-point types that kmoe converts to float/double (F64, F32, F16, BF16, F8_E4M3, F8_E5M2,
/// F8_E8M0). F4/F6_* (packed) and C64 (complex) are stored and copied, never converted.
bool dtype_is_float(DType dtype);

/// True for BOOL and the integer types (U8..U64, I8..I64).
bool dtype_is_integer(DType dtype);

/// The DType that stores a C++ element type T without conversion (float -> F32, double -> F64, kmoe::bf16 -> BF16,
/// std::int64_t -> I64, ...).
template <class T>
constexpr DType dtype_of();
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<kmoe::bf16>() { return DType::BF16; }
template <> constexpr DType dtype_of<std::int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<std::int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<std::int16_t>() { return DType::I16; }
template <> constexpr DType dtype_of<std::int8_t>() { return DType::I8; }
template <> constexpr DType dtype_of<std::uint64_t>() { return DType::U64; }
template <> constexpr DType dtype_of<std::uint32_t>() { return DType::U32; }
template <> constexpr DType dtype_of<std::uint16_t>() { return DType::U16; }
template <> constexpr DType dtype_of<std::uint8_t>() { return DType::U8; }
template <> constexpr DType dtype_of<bool>() { return DType::BOOL; }

}  // namespace kmoe::io
