#include <gtest/gtest.h>

#include <kmoe/core/error.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace {

TEST(Error, CheckMacrosThrowTheRightTypeWithTheMessage) {
  try {
    KMOE_CHECK_INPUT(1 + 1 == 3, "tensor '", "w1", "' has shape [", 4, "]");
    FAIL() << "no throw";
  } catch (const kmoe::InputError& e) {
    EXPECT_STREQ(e.what(), "tensor 'w1' has shape [4]");
  }
  EXPECT_THROW(KMOE_CHECK_USAGE(false, "bad"), kmoe::UsageError);
  EXPECT_NO_THROW(KMOE_CHECK_INPUT(true, "never"));
}

TEST(Error, AssertNamesConditionAndLocation) {
  try {
    KMOE_ASSERT(2 < 1, "extra ", 7);
    FAIL() << "no throw";
  } catch (const kmoe::InternalError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("2 < 1"), std::string::npos) << msg;
    EXPECT_NE(msg.find("test_error.cpp"), std::string::npos) << msg;
    EXPECT_NE(msg.find("extra 7"), std::string::npos) << msg;
  }
}

TEST(Error, MessagesAreOnePrintableLine) {
  // A name from a file with a newline, an ANSI escape, DEL, a C1 control (CSI) and a byte that is not UTF-8.
  const std::string name = std::string("a\nb\x1b[31mred\x7f") + "\xc2\x9b" + "\xff" + "\xc3\xa9";
  try {
    KMOE_CHECK_INPUT(false, "tensor '", name, "': bad");
    FAIL() << "no throw";
  } catch (const kmoe::InputError& e) {
    EXPECT_STREQ(e.what(), "tensor 'a\\nb\\x1b[31mred\\x7f\\u009b\\xff\xc3\xa9': bad");
  }
  const kmoe::UsageError u("one\ntwo\r");
  EXPECT_STREQ(u.what(), "one\\ntwo\\r");
}

TEST(Error, LongMessagesAndValuesAreCut) {
  const std::string huge(10'000'000, 'x');
  const kmoe::InputError e("tensor '" + huge + "'");
  const std::string msg = e.what();
  EXPECT_LT(msg.size(), kmoe::detail::kMaxMessageBytes + 64);
  EXPECT_NE(msg.find("more bytes)"), std::string::npos);
  EXPECT_EQ(kmoe::detail::printable("abcdef", 3), "abc...(3 more bytes)");
  // A multi-byte character is never cut in two: U+00E9 is 2 bytes.
  EXPECT_EQ(kmoe::detail::printable("a\xc3\xa9", 2), "a...(2 more bytes)");
}

TEST(Error, LongShapesAreShortened) {
  EXPECT_EQ(kmoe::detail::dims_text(std::vector<std::int64_t>{6, 96, 64}), "[6, 96, 64]");
  EXPECT_EQ(kmoe::detail::dims_text(std::vector<std::int64_t>{}), "[]");
  const std::vector<std::int64_t> deep(100'000, 1);
  EXPECT_EQ(kmoe::detail::dims_text(deep, 3), "[1, 1, 1, ... (100000 dimensions)]");
  EXPECT_LT(kmoe::detail::dims_text(deep).size(), 64u);
}

}  // namespace
