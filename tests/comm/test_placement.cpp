// Expert and token placement: contiguous ranges, the remainder to the first ranks, and the layout errors.
#include <gtest/gtest.h>

#include <kmoe/comm/placement.hpp>
#include <kmoe/core/error.hpp>

#include <string>

using kmoe::comm::contiguous_split;
using kmoe::comm::ExpertPlacement;

TEST(ContiguousSplit, CoversEverythingOnceRemainderFirst) {
  for (std::int64_t n : {0, 1, 5, 12, 37}) {
    for (int parts : {1, 2, 3, 4, 7}) {
      std::int64_t next = 0;
      for (int p = 0; p < parts; ++p) {
        const auto r = contiguous_split(n, parts, p);
        EXPECT_EQ(r.begin, next) << n << " over " << parts << ", part " << p;
        EXPECT_EQ(r.count, n / parts + (p < n % parts ? 1 : 0));
        next = r.end();
      }
      EXPECT_EQ(next, n);
    }
  }
}

TEST(ExpertPlacement, FiveExpertsOverTwoAndThreeRanks) {
  const auto two = ExpertPlacement::make(5, 2, 2);
  EXPECT_EQ(two.experts_of(0).begin, 0);
  EXPECT_EQ(two.experts_of(0).count, 3);
  EXPECT_EQ(two.experts_of(1).begin, 3);
  EXPECT_EQ(two.experts_of(1).count, 2);
  const auto three = ExpertPlacement::make(5, 6, 3);
  EXPECT_EQ(three.replicas(), 2);
  EXPECT_EQ(three.experts_of(2).begin, 4);
  EXPECT_EQ(three.experts_of(2).count, 1);
  EXPECT_EQ(three.max_local_experts(), 2);
  EXPECT_EQ(three.ep_rank_of(4), 1);
  EXPECT_EQ(three.replica_of(4), 1);
}

TEST(ExpertPlacement, OwnerInvertsTheRanges) {
  for (std::int64_t E : {1, 2, 5, 6, 8, 13}) {
    for (int ep = 1; ep <= E; ++ep) {
      const auto p = ExpertPlacement::make(E, ep, ep);
      for (int r = 0; r < ep; ++r) {
        const auto ex = p.experts_of(r);
        EXPECT_GE(ex.count, 1);
        for (auto e = ex.begin; e < ex.end(); ++e) EXPECT_EQ(p.owner_of(e), r) << "E=" << E << " ep=" << ep;
      }
    }
  }
}

TEST(ExpertPlacement, ImpossibleLayoutsNameTheValues) {
  try {
    ExpertPlacement::make(3, 4, 4);
    FAIL() << "ep > E accepted";
  } catch (const kmoe::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--ep 4 exceeds the 3 experts"), std::string::npos) << e.what();
  }
  try {
    ExpertPlacement::make(6, 3, 2);
    FAIL() << "world % ep != 0 accepted";
  } catch (const kmoe::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("world of 3 ranks is not a multiple of --ep 2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ExpertPlacement::make(6, 2, 0), kmoe::UsageError);
  EXPECT_THROW(ExpertPlacement::make(0, 1, 1), kmoe::UsageError);
}
