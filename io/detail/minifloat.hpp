// Exact decoding and correctly rounded encoding of the small float formats of safetensors (F16, BF16, F8_*).
// Internal to io/: the Kokkos kernels use kmoe::bf16; these are host-side converters for files.
#pragma once

#include <kmoe/io/dtype.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace kmoe::io::detail {

/// The layout of a small float format: exponent and mantissa bits, bias, and how it spends the top exponent.
struct MiniFloat {
  int ebits, mbits, bias;
  enum Special { Ieee, FiniteNanAllOnes } special;  // Ieee: inf + NaNs at max exponent; FN: only S.1111.111 is NaN
};

inline constexpr MiniFloat kF16{5, 10, 15, MiniFloat::Ieee};
inline constexpr MiniFloat kBF16{8, 7, 127, MiniFloat::Ieee};
inline constexpr MiniFloat kF8E5M2{5, 2, 15, MiniFloat::Ieee};
inline constexpr MiniFloat kF8E4M3{4, 3, 7, MiniFloat::FiniteNanAllOnes};

/// Exact value of `bits` in format `f` (every such value is a float).
inline float minifloat_to_float(std::uint32_t bits, const MiniFloat& f) {
  const std::uint32_t mmask = (1u << f.mbits) - 1, emax = (1u << f.ebits) - 1;
  const bool neg = (bits >> (f.ebits + f.mbits)) & 1u;
  const std::uint32_t e = (bits >> f.mbits) & emax, m = bits & mmask;
  float v;
  if (f.special == MiniFloat::Ieee && e == emax) {
    v = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else if (f.special == MiniFloat::FiniteNanAllOnes && e == emax && m == mmask) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), 1 - f.bias - f.mbits);
  } else {
    v = std::ldexp(static_cast<float>(m | (1u << f.mbits)), static_cast<int>(e) - f.bias - f.mbits);
  }
  return neg ? -v : v;
}

/// `x` rounded to nearest even in format `f`. Overflow gives inf (Ieee) or NaN (FN, as torch's float8_e4m3fn does).
inline std::uint32_t double_to_minifloat(double x, const MiniFloat& f) {
  const std::uint32_t emax = (1u << f.ebits) - 1, mmask = (1u << f.mbits) - 1;
  const std::uint32_t sign = std::signbit(x) ? 1u << (f.ebits + f.mbits) : 0u;
  const std::uint32_t nan_bits =
      f.special == MiniFloat::Ieee ? (emax << f.mbits) | (1u << (f.mbits - 1)) : (emax << f.mbits) | mmask;
  if (std::isnan(x)) return sign | nan_bits;
  const double a = std::fabs(x);
  // Largest finite: Ieee uses exponents up to emax-1; FN uses emax with mantissa up to all-ones minus one.
  const int top_e = (f.special == MiniFloat::Ieee ? static_cast<int>(emax) - 1 : static_cast<int>(emax)) - f.bias;
  const std::uint32_t top_m = f.special == MiniFloat::Ieee ? mmask : mmask - 1;
  const double max_finite = std::ldexp(static_cast<double>(top_m | (1u << f.mbits)), top_e - f.mbits);
  const std::uint32_t overflow = f.special == MiniFloat::Ieee ? (emax << f.mbits) : nan_bits;
  if (std::isinf(a)) return sign | overflow;
  if (a == 0.0) return sign;
  int k;
  std::frexp(a, &k);  // a = frac * 2^k, frac in [0.5, 1): unbiased exponent k-1
  const int e = std::max(k - 1, 1 - f.bias);
  const double quantum = std::ldexp(1.0, e - f.mbits);
  const double q = std::nearbyint(a / quantum);  // exact scaling by a power of two; nearbyint rounds half to even
  const double v = q * quantum;
  if (v > max_finite) return sign | overflow;
  if (v == 0.0) return sign;  // rounded to zero
  std::frexp(v, &k);
  if (k - 1 < 1 - f.bias) return sign | static_cast<std::uint32_t>(q);  // subnormal (or rounded to zero)
  const int ve = k - 1;
  const std::uint32_t m = static_cast<std::uint32_t>(std::ldexp(v, f.mbits - ve)) & mmask;
  return sign | (static_cast<std::uint32_t>(ve + f.bias) << f.mbits) | m;
}

/// Exact value of an F8_E8M0 scale (2^(bits-127); 0xFF is NaN).
inline float e8m0_to_float(std::uint8_t bits) {
  return bits == 0xFF ? std::numeric_limits<float>::quiet_NaN() : std::ldexp(1.0f, static_cast<int>(bits) - 127);
}

/// `x` rounded to the nearest power of two in F8_E8M0 (ties to the larger; non-positive and NaN give NaN).
inline std::uint8_t double_to_e8m0(double x) {
  if (!(x > 0) || std::isinf(x)) return 0xFF;
  int k;
  const double frac = std::frexp(x, &k);  // x = frac * 2^k
  int e = frac >= std::sqrt(0.5) ? k : k - 1;
  e = std::min(std::max(e, -127), 127);
  return static_cast<std::uint8_t>(e + 127);
}

}  // namespace kmoe::io::detail
