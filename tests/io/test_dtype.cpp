// DType names and sizes, and the exactness of the small-float conversions (decode exact, encode round-to-nearest-even
// once, also from double).
#include <kmoe/io/safetensors.hpp>

#include "io_test_util.hpp"

#include <cmath>
#include <cstring>
#include <limits>

namespace {

using namespace kmoe::io;

TEST(DType, NamesSizesAndTheLibrarysOrder) {
  const char* order[] = {"BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
                         "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"};
  ASSERT_EQ(std::size(order), static_cast<std::size_t>(kNumDTypes));
  for (int k = 0; k < kNumDTypes; ++k) {
    EXPECT_STREQ(dtype_name(static_cast<DType>(k)), order[k]);
    EXPECT_EQ(dtype_from_name(order[k]), static_cast<DType>(k));
  }
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::C64), 8u);
  EXPECT_EQ(dtype_size(DType::F8_E4M3), 1u);
  EXPECT_EQ(dtype_size(DType::F4), 0u);
  EXPECT_EQ(dtype_bits(DType::F6_E2M3), 6u);
  EXPECT_EQ(dtype_nbytes(DType::F4, 4), std::optional<std::uint64_t>(2));
  EXPECT_FALSE(dtype_nbytes(DType::F4, 3).has_value());
  EXPECT_FALSE(dtype_nbytes(DType::F64, -1).has_value());
  EXPECT_FALSE(dtype_nbytes(DType::F64, std::numeric_limits<std::int64_t>::max()).has_value());
  EXPECT_FALSE(parse_dtype("F128").has_value());
  kmoe::test::expect_input_error([] { dtype_from_name("F128"); }, {"'F128'", "BF16"});
  EXPECT_EQ(dtype_of<double>(), DType::F64);
  EXPECT_EQ(dtype_of<kmoe::bf16>(), DType::BF16);
  EXPECT_EQ(dtype_of<std::int64_t>(), DType::I64);
}

/// Decodes one element of `dtype` with the library's converter.
template <class T>
T decode(DType dtype, std::uint32_t bits) {
  TensorView t;
  t.name = "x";
  t.dtype = dtype;
  t.shape = {1};
  unsigned char b[4];
  std::memcpy(b, &bits, 4);
  t.data = reinterpret_cast<const std::byte*>(b);
  t.nbytes = dtype_size(dtype);
  T out{};
  detail::convert_tensor(t, &out);
  return out;
}

template <class T>
std::uint32_t encode(DType dtype, T v) {
  std::uint32_t bits = 0;
  detail::encode_elements(&v, 1, dtype, reinterpret_cast<std::byte*>(&bits), "x");
  return bits;
}

TEST(DType, SmallFloatsDecodeExactly) {
  EXPECT_EQ(decode<float>(DType::F16, 0x3C00), 1.0f);
  EXPECT_EQ(decode<float>(DType::F16, 0xC000), -2.0f);
  EXPECT_EQ(decode<float>(DType::F16, 0x7BFF), 65504.0f);
  EXPECT_EQ(decode<float>(DType::F16, 0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(decode<float>(DType::F16, 0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(decode<float>(DType::F16, 0x7E00)));
  EXPECT_EQ(decode<float>(DType::BF16, 0x3F80), 1.0f);
  EXPECT_EQ(decode<double>(DType::BF16, 0x4049), 3.140625);
  EXPECT_EQ(decode<float>(DType::F8_E4M3, 0x7E), 448.0f);
  EXPECT_EQ(decode<float>(DType::F8_E4M3, 0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(decode<float>(DType::F8_E4M3, 0x38), 1.0f);
  EXPECT_TRUE(std::isnan(decode<float>(DType::F8_E4M3, 0x7F)));
  EXPECT_EQ(decode<float>(DType::F8_E4M3, 0x78), 256.0f);  // exponent 1111 is finite in the fn variant
  EXPECT_EQ(decode<float>(DType::F8_E5M2, 0x7B), 57344.0f);
  EXPECT_EQ(decode<float>(DType::F8_E5M2, 0x3C), 1.0f);
  EXPECT_EQ(decode<float>(DType::F8_E5M2, 0x7C), std::numeric_limits<float>::infinity());
  EXPECT_EQ(decode<float>(DType::F8_E8M0, 127), 1.0f);
  EXPECT_EQ(decode<float>(DType::F8_E8M0, 130), 8.0f);
  EXPECT_EQ(decode<std::int64_t>(DType::I16, 0xFFFF), -1);
  EXPECT_EQ(decode<std::int64_t>(DType::U16, 0xFFFF), 65535);
  EXPECT_EQ(decode<std::int64_t>(DType::BOOL, 1), 1);
  EXPECT_EQ(decode<double>(DType::I32, 0xFFFFFFFE), -2.0);
}

TEST(DType, EverySmallFloatSurvivesDecodeEncode) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float f = decode<float>(DType::F16, b);
    if (std::isnan(f)) continue;
    ASSERT_EQ(encode(DType::F16, f), b) << std::hex << b;
    ASSERT_EQ(encode(DType::F16, static_cast<double>(f)), b) << std::hex << b;
    const float g = decode<float>(DType::BF16, b);
    if (std::isnan(g)) continue;
    ASSERT_EQ(encode(DType::BF16, g), b) << std::hex << b;
    ASSERT_EQ(encode(DType::BF16, static_cast<double>(g)), b) << std::hex << b;
  }
  for (std::uint32_t b = 0; b < 256; ++b) {
    for (DType d : {DType::F8_E4M3, DType::F8_E5M2}) {
      const float f = decode<float>(d, b);
      if (std::isnan(f)) continue;
      ASSERT_EQ(encode(d, f), b) << dtype_name(d) << " " << std::hex << b;
    }
  }
}

TEST(DType, EncodingRoundsToNearestEvenOnce) {
  EXPECT_EQ(encode(DType::F16, 1.0 + std::ldexp(1.0, -11)), 0x3C00u);      // tie -> even
  EXPECT_EQ(encode(DType::F16, 1.0 + 3 * std::ldexp(1.0, -11)), 0x3C02u);  // tie -> even (up)
  EXPECT_EQ(encode(DType::F16, 65520.0), 0x7C00u);                         // overflow -> inf
  EXPECT_EQ(encode(DType::F16, std::ldexp(1.0, -25)), 0x0000u);            // half the smallest subnormal -> 0
  EXPECT_EQ(encode(DType::F16, std::ldexp(1.5, -25)), 0x0001u);
  // Double rounding through float would give 1.0 here (1 + 2^-8 + 2^-30 -> float 1 + 2^-8 -> tie -> even).
  EXPECT_EQ(encode(DType::BF16, 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -30)), 0x3F81u);
  EXPECT_EQ(encode(DType::BF16, 1.0f + std::ldexp(1.0f, -8)), 0x3F80u);
  EXPECT_EQ(encode(DType::F8_E4M3, 464.0), 0x7Eu);  // tie between 448 and 480 (NaN) -> 448
  EXPECT_EQ(encode(DType::F8_E4M3, 500.0), 0x7Fu);  // overflow -> NaN, as torch's float8_e4m3fn
  EXPECT_EQ(encode(DType::F8_E5M2, 1e6), 0x7Cu);    // overflow -> inf
  EXPECT_EQ(encode(DType::F8_E4M3, -1.0), 0xB8u);
  EXPECT_EQ(encode(DType::F8_E8M0, 8.0), 130u);
  EXPECT_EQ(encode(DType::I16, std::int64_t(-3)), 0xFFFDu);
  kmoe::test::expect_input_error([] { encode(DType::U8, std::int64_t(300)); }, {"does not fit"});
  kmoe::test::expect_input_error([] { encode(DType::C64, 1.0); }, {"C64"});
}

}  // namespace
