#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <kmoe/core/bf16.hpp>
#include <limits>

namespace {

TEST(Bf16, ToFloatIsExactForEveryBitPattern) {
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    // NaN patterns are skipped: moving a signalling NaN through a float register raises FE_INVALID (trapped here).
    if ((b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0) continue;
    const float f = kmoe::bf16::bits_to_float(static_cast<std::uint16_t>(b));
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    ASSERT_EQ(u, b << 16);
    ASSERT_EQ(kmoe::bf16::float_to_bits(f), b) << "round trip of 0x" << std::hex << b;
  }
}

TEST(Bf16, RoundsToNearestEven) {
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(kmoe::bf16::float_to_bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3*2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): goes up.
  EXPECT_EQ(kmoe::bf16::float_to_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  // Just above the halfway point rounds up.
  EXPECT_EQ(kmoe::bf16::float_to_bits(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)), 0x3f81);
  EXPECT_EQ(kmoe::bf16::float_to_bits(-2.0f), 0xc000);
}

TEST(Bf16, NanStaysNanAndInfStaysInf) {
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(static_cast<float>(kmoe::bf16::from_float(qnan))));
  EXPECT_EQ(kmoe::bf16::float_to_bits(std::numeric_limits<float>::infinity()), 0x7f80);
  // The largest finite float rounds to infinity in bf16, as torch does.
  EXPECT_EQ(kmoe::bf16::float_to_bits(std::numeric_limits<float>::max()), 0x7f80);
}

}  // namespace
