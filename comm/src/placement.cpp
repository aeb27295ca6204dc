#include <kmoe/comm/placement.hpp>
#include <kmoe/core/error.hpp>

#include <algorithm>

namespace kmoe::comm {

Range contiguous_split(std::int64_t n, int parts, int part) {
  KMOE_ASSERT(parts > 0 && part >= 0 && part < parts && n >= 0, "n=", n, " parts=", parts, " part=", part);
  const std::int64_t base = n / parts, rem = n % parts;
  Range r;
  r.begin = part * base + std::min<std::int64_t>(part, rem);
  r.count = base + (part < rem ? 1 : 0);
  return r;
}

ExpertPlacement ExpertPlacement::make(std::int64_t num_experts, int world, int ep) {
  KMOE_CHECK_USAGE(num_experts >= 1, "expert placement: the layer has ", num_experts, " experts (need at least 1)");
  KMOE_CHECK_USAGE(world >= 1, "expert placement: world size ", world, " (need at least 1 rank)");
  KMOE_CHECK_USAGE(ep >= 1, "expert placement: --ep ", ep, " (need at least 1)");
  KMOE_CHECK_USAGE(ep <= num_experts, "expert placement: --ep ", ep, " exceeds the ", num_experts,
                   " experts of the layer (every rank of an ep group needs at least one expert)");
  KMOE_CHECK_USAGE(world % ep == 0, "expert placement: the world of ", world, " ranks is not a multiple of --ep ", ep,
                   " (world = replicas x ep)");
  ExpertPlacement p;
  p.num_experts_ = num_experts;
  p.world_ = world;
  p.ep_ = ep;
  return p;
}

int ExpertPlacement::owner_of(std::int64_t expert) const {
  KMOE_ASSERT(expert >= 0 && expert < num_experts_, "expert ", expert, " of ", num_experts_);
  // Inverse of contiguous_split: the first `rem` ranks own base + 1 experts each.
  const std::int64_t base = num_experts_ / ep_, rem = num_experts_ % ep_;
  const std::int64_t big = rem * (base + 1);
  return static_cast<int>(expert < big ? expert / (base + 1) : rem + (expert - big) / base);
}

}  // namespace kmoe::comm
