/// \file bf16.hpp
/// \brief bfloat16 storage type: the upper 16 bits of an IEEE float32.
///
/// Conversion to float is exact; conversion from float rounds to nearest even (as torch does), NaN stays NaN.
/// Host and device callable so kernels of every backend share one definition.
#pragma once

#include <Kokkos_Macros.hpp>
#include <cstdint>
#include <cstring>

namespace kmoe {

struct bf16 {
  std::uint16_t bits = 0;

  KOKKOS_INLINE_FUNCTION static bf16 from_bits(std::uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }
  KOKKOS_INLINE_FUNCTION static float bits_to_float(std::uint16_t b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  KOKKOS_INLINE_FUNCTION static std::uint16_t float_to_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN, sign kept
    }
    const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
  }

  KOKKOS_INLINE_FUNCTION explicit operator float() const { return bits_to_float(bits); }
  KOKKOS_INLINE_FUNCTION static bf16 from_float(float f) { return from_bits(float_to_bits(f)); }
};

}  // namespace kmoe
