#include <gtest/gtest.h>

#include <kmoe/core/error.hpp>

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

}  // namespace
