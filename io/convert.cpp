// Conversions between safetensors element types and C++ values: exact decoding (every F16/BF16/F8 value is a
// float), correctly rounded encoding (round to nearest even, once, also from double).
#include <kmoe/io/safetensors.hpp>

#include <kmoe/core/progress.hpp>

#include "detail/minifloat.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace kmoe::io {

// ---- conversion -----------------------------------------------------------------------------------------------

namespace detail {
namespace {

template <class U>
U load(const std::byte* p) {
  U v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// Decode tables: every F16/F8 value is exactly a float, so a table lookup is exact (and fast).
const float* f16_table() {
  static const std::vector<float> t = [] {
    std::vector<float> v(65536);
    for (std::uint32_t i = 0; i < 65536; ++i) v[i] = minifloat_to_float(i, kF16);
    return v;
  }();
  return t.data();
}
const float* f8_table(DType d) {
  static const std::vector<float> e4m3 = [] {
    std::vector<float> v(256);
    for (std::uint32_t i = 0; i < 256; ++i) v[i] = minifloat_to_float(i, kF8E4M3);
    return v;
  }();
  static const std::vector<float> e5m2 = [] {
    std::vector<float> v(256);
    for (std::uint32_t i = 0; i < 256; ++i) v[i] = minifloat_to_float(i, kF8E5M2);
    return v;
  }();
  static const std::vector<float> e8m0 = [] {
    std::vector<float> v(256);
    for (std::uint32_t i = 0; i < 256; ++i) v[i] = e8m0_to_float(static_cast<std::uint8_t>(i));
    return v;
  }();
  return d == DType::F8_E4M3 ? e4m3.data() : d == DType::F8_E5M2 ? e5m2.data() : e8m0.data();
}

/// Element i of a float-dtype tensor, exactly (F64 as double; everything else is exactly a float).
template <class Out>
void decode_float(const TensorView& t, Out* out, std::size_t n) {
  const std::byte* p = t.data;
  switch (t.dtype) {
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(load<double>(p + 8 * i));
      break;
    case DType::F32:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(load<float>(p + 4 * i));
      break;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(kmoe::bf16::bits_to_float(load<std::uint16_t>(p + 2 * i)));
      break;
    case DType::F16: {
      const float* tab = f16_table();
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(tab[load<std::uint16_t>(p + 2 * i)]);
      break;
    }
    case DType::F8_E4M3:
    case DType::F8_E5M2:
    case DType::F8_E8M0: {
      const float* tab = f8_table(t.dtype);
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<Out>(tab[static_cast<unsigned char>(p[i])]);
      break;
    }
    default:
      KMOE_ASSERT(false, "decode_float on ", dtype_name(t.dtype));
  }
}

/// Integer tensors widened to int64 (U64 beyond int64 is an error).
void decode_int(const TensorView& t, std::int64_t* out, std::size_t n) {
  const std::byte* p = t.data;
  switch (t.dtype) {
    case DType::BOOL:
    case DType::U8:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<unsigned char>(p[i]);
      break;
    case DType::I8:
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::int8_t>(p[i]);
      break;
    case DType::I16:
      for (std::size_t i = 0; i < n; ++i) out[i] = load<std::int16_t>(p + 2 * i);
      break;
    case DType::U16:
      for (std::size_t i = 0; i < n; ++i) out[i] = load<std::uint16_t>(p + 2 * i);
      break;
    case DType::I32:
      for (std::size_t i = 0; i < n; ++i) out[i] = load<std::int32_t>(p + 4 * i);
      break;
    case DType::U32:
      for (std::size_t i = 0; i < n; ++i) out[i] = load<std::uint32_t>(p + 4 * i);
      break;
    case DType::I64:
      for (std::size_t i = 0; i < n; ++i) out[i] = load<std::int64_t>(p + 8 * i);
      break;
    case DType::U64:
      for (std::size_t i = 0; i < n; ++i) {
        const auto v = load<std::uint64_t>(p + 8 * i);
        KMOE_CHECK_INPUT(v <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), t.where(),
                         ": element ", i, " = ", v, " does not fit int64");
        out[i] = static_cast<std::int64_t>(v);
      }
      break;
    default:
      KMOE_ASSERT(false, "decode_int on ", dtype_name(t.dtype));
  }
}

[[noreturn]] void cannot_convert(const TensorView& t, const char* to) {
  throw InputError(concat(t.where(), ": cannot convert ", dtype_name(t.dtype), " to ", to));
}

// Big conversions touch the whole mapping (a read from disk): show progress on a terminal.
template <class F>
void chunked(const TensorView& t, std::size_t n, F&& body) {
  constexpr std::size_t kChunk = std::size_t(1) << 24;
  ProgressBar bar("reading " + t.name, static_cast<std::int64_t>(t.nbytes), ProgressBar::Unit::Bytes,
                  static_cast<std::int64_t>(t.nbytes) >= kProgressMinBytes);
  for (std::size_t i = 0; i < n; i += kChunk) {
    body(i, std::min(kChunk, n - i));
    bar.update(static_cast<std::int64_t>(static_cast<double>(t.nbytes) * static_cast<double>(i + std::min(kChunk, n - i)) /
                                         static_cast<double>(n)));
  }
  bar.finish();
}

TensorView shifted(const TensorView& t, std::size_t first) {
  TensorView s;
  s.dtype = t.dtype;
  s.name = t.name;
  s.file = t.file;
  s.data = t.data + first * dtype_bits(t.dtype) / 8;
  return s;
}

}  // namespace

template <class T>
void convert_tensor(const TensorView& t, T* out) {
  const std::size_t n = static_cast<std::size_t>(t.numel());
  if constexpr (std::is_same_v<T, kmoe::bf16>) {
    if (t.dtype == DType::BF16) {
      std::memcpy(out, t.data, 2 * n);  // bits preserved
      return;
    }
    if (!dtype_is_float(t.dtype)) cannot_convert(t, "bf16");
    chunked(t, n, [&](std::size_t i0, std::size_t m) {
      std::vector<double> tmp(m);
      decode_float(shifted(t, i0), tmp.data(), m);
      for (std::size_t i = 0; i < m; ++i) out[i0 + i].bits = static_cast<std::uint16_t>(double_to_minifloat(tmp[i], kBF16));
    });
  } else if constexpr (std::is_floating_point_v<T>) {
    if (dtype_is_float(t.dtype)) {
      chunked(t, n, [&](std::size_t i0, std::size_t m) { decode_float(shifted(t, i0), out + i0, m); });
    } else if (dtype_is_integer(t.dtype)) {
      std::vector<std::int64_t> tmp(n);
      decode_int(t, tmp.data(), n);
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(tmp[i]);
    } else {
      cannot_convert(t, std::is_same_v<T, double> ? "double" : "float");
    }
  } else {
    static_assert(std::is_same_v<T, std::int64_t> || std::is_same_v<T, std::int32_t>, "convert_tensor: type");
    if (!dtype_is_integer(t.dtype)) cannot_convert(t, std::is_same_v<T, std::int64_t> ? "int64" : "int32");
    if constexpr (std::is_same_v<T, std::int64_t>) {
      decode_int(t, out, n);
    } else {
      std::vector<std::int64_t> tmp(n);
      decode_int(t, tmp.data(), n);
      for (std::size_t i = 0; i < n; ++i) {
        KMOE_CHECK_INPUT(tmp[i] >= std::numeric_limits<std::int32_t>::min() &&
                             tmp[i] <= std::numeric_limits<std::int32_t>::max(),
                         t.where(), ": element ", i, " = ", tmp[i], " does not fit int32");
        out[i] = static_cast<std::int32_t>(tmp[i]);
      }
    }
  }
}

template void convert_tensor<float>(const TensorView&, float*);
template void convert_tensor<double>(const TensorView&, double*);
template void convert_tensor<kmoe::bf16>(const TensorView&, kmoe::bf16*);
template void convert_tensor<std::int64_t>(const TensorView&, std::int64_t*);
template void convert_tensor<std::int32_t>(const TensorView&, std::int32_t*);

namespace {

template <class U>
void store(std::byte* p, U v) {
  std::memcpy(p, &v, sizeof v);
}

template <class I>
void encode_int(std::int64_t v, std::byte* p, const std::string& what, std::size_t i) {
  KMOE_CHECK_INPUT(v >= static_cast<std::int64_t>(std::numeric_limits<I>::min()) &&
                       (v < 0 || static_cast<std::uint64_t>(v) <= static_cast<std::uint64_t>(std::numeric_limits<I>::max())),
                   "tensor '", what, "': element ", i, " = ", v, " does not fit the dtype");
  store(p, static_cast<I>(v));
}

}  // namespace

template <class T>
void encode_elements(const T* in, std::size_t n, DType dtype, std::byte* out, const std::string& what) {
  if constexpr (std::is_same_v<T, kmoe::bf16>) {
    if (dtype == DType::BF16) {
      std::memcpy(out, in, 2 * n);
      return;
    }
    std::vector<float> tmp(n);
    for (std::size_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(in[i]);
    encode_elements(tmp.data(), n, dtype, out, what);
  } else if constexpr (std::is_floating_point_v<T>) {
    switch (dtype) {
      case DType::F64:
        for (std::size_t i = 0; i < n; ++i) store(out + 8 * i, static_cast<double>(in[i]));
        return;
      case DType::F32:
        for (std::size_t i = 0; i < n; ++i) store(out + 4 * i, static_cast<float>(in[i]));
        return;
      case DType::BF16:
        for (std::size_t i = 0; i < n; ++i) {
          // From float the core's rounding (identical for finite values); from double one correct rounding.
          const std::uint16_t b = std::is_same_v<T, float>
                                      ? kmoe::bf16::float_to_bits(static_cast<float>(in[i]))
                                      : static_cast<std::uint16_t>(double_to_minifloat(static_cast<double>(in[i]), kBF16));
          store(out + 2 * i, b);
        }
        return;
      case DType::F16:
        for (std::size_t i = 0; i < n; ++i)
          store(out + 2 * i, static_cast<std::uint16_t>(double_to_minifloat(static_cast<double>(in[i]), kF16)));
        return;
      case DType::F8_E4M3:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<std::byte>(double_to_minifloat(static_cast<double>(in[i]), kF8E4M3));
        return;
      case DType::F8_E5M2:
        for (std::size_t i = 0; i < n; ++i)
          out[i] = static_cast<std::byte>(double_to_minifloat(static_cast<double>(in[i]), kF8E5M2));
        return;
      case DType::F8_E8M0:
        for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::byte>(double_to_e8m0(static_cast<double>(in[i])));
        return;
      default:
        throw InputError(concat("tensor '", what, "': cannot encode floating-point values as ", dtype_name(dtype)));
    }
  } else {
    static_assert(std::is_integral_v<T>, "encode_elements: type");
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t v = static_cast<std::int64_t>(in[i]);
      switch (dtype) {
        case DType::BOOL:
          KMOE_CHECK_INPUT(v == 0 || v == 1, "tensor '", what, "': element ", i, " = ", v, " is not a bool");
          out[i] = static_cast<std::byte>(v);
          break;
        case DType::U8: encode_int<std::uint8_t>(v, out + i, what, i); break;
        case DType::I8: encode_int<std::int8_t>(v, out + i, what, i); break;
        case DType::I16: encode_int<std::int16_t>(v, out + 2 * i, what, i); break;
        case DType::U16: encode_int<std::uint16_t>(v, out + 2 * i, what, i); break;
        case DType::I32: encode_int<std::int32_t>(v, out + 4 * i, what, i); break;
        case DType::U32: encode_int<std::uint32_t>(v, out + 4 * i, what, i); break;
        case DType::I64: store(out + 8 * i, v); break;
        case DType::U64:
          if constexpr (std::is_same_v<T, std::uint64_t>) {
            store(out + 8 * i, static_cast<std::uint64_t>(in[i]));
          } else {
            encode_int<std::uint64_t>(v, out + 8 * i, what, i);
          }
          break;
        case DType::F64: store(out + 8 * i, static_cast<double>(in[i])); break;
        case DType::F32: store(out + 4 * i, static_cast<float>(in[i])); break;
        default:
          throw InputError(concat("tensor '", what, "': cannot encode integers as ", dtype_name(dtype)));
      }
    }
  }
}

#define KMOE_IO_ENCODE(T) template void encode_elements<T>(const T*, std::size_t, DType, std::byte*, const std::string&);
KMOE_IO_ENCODE(float)
KMOE_IO_ENCODE(double)
KMOE_IO_ENCODE(kmoe::bf16)
KMOE_IO_ENCODE(bool)
KMOE_IO_ENCODE(std::int8_t)
KMOE_IO_ENCODE(std::uint8_t)
KMOE_IO_ENCODE(std::int16_t)
KMOE_IO_ENCODE(std::uint16_t)
KMOE_IO_ENCODE(std::int32_t)
KMOE_IO_ENCODE(std::uint32_t)
KMOE_IO_ENCODE(std::int64_t)
KMOE_IO_ENCODE(std::uint64_t)
#undef KMOE_IO_ENCODE

void check_rank(const TensorView& t, int rank) {
  KMOE_CHECK_INPUT(static_cast<int>(t.shape.size()) == rank, t.where(), ": expected rank ", rank, ", got shape ",
                   t.shape_string());
}

}  // namespace detail

}  // namespace kmoe::io
