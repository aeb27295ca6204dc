/// \file placement.hpp
/// \brief Where experts and tokens live: contiguous ranges over a group, the remainder to the first ranks.
///
/// The world of `world` ranks is `replicas` copies of one expert-parallel (ep) group of `ep` ranks:
/// world rank w is ep rank (w % ep) of replica (w / ep), so an ep group is a run of consecutive world ranks.
/// Ep rank r owns experts [first_expert(r), first_expert(r) + num_local_experts(r)); E need not divide by ep
/// (5 experts over 2 ranks: 3 + 2; over 3 ranks: 2 + 2 + 1).
#pragma once

#include <cstdint>
#include <vector>

namespace kmoe::comm {

/// A contiguous piece [begin, begin + count) of n items split over `parts` parts, the remainder to the first parts.
struct Range {
  std::int64_t begin = 0;
  std::int64_t count = 0;
  std::int64_t end() const { return begin + count; }
};

/// Piece `part` of n items split over `parts` (> 0) parts as evenly as possible, the first n % parts parts one larger.
Range contiguous_split(std::int64_t n, int parts, int part);

/// The expert placement of a layout. Construct with make(), which checks the layout.
class ExpertPlacement {
 public:
  /// Checks and builds the layout. Throws kmoe::UsageError (identically on every rank, before any communication, so
  /// no rank hangs) when num_experts < 1, ep < 1, ep > num_experts ("--ep 4 exceeds the 3 experts ...") or world is
  /// not a multiple of ep.
  /// \param num_experts [in] E, the experts of the layer
  /// \param world       [in] ranks in the world
  /// \param ep          [in] ranks of one expert-parallel group
  static ExpertPlacement make(std::int64_t num_experts, int world, int ep);

  std::int64_t num_experts() const { return num_experts_; }
  int world() const { return world_; }
  int ep() const { return ep_; }
  int replicas() const { return world_ / ep_; }

  /// The ep rank of world rank w (w % ep) and its replica (w / ep).
  int ep_rank_of(int world_rank) const { return world_rank % ep_; }
  int replica_of(int world_rank) const { return world_rank / ep_; }

  /// The experts ep rank r owns.
  Range experts_of(int ep_rank) const { return contiguous_split(num_experts_, ep_, ep_rank); }
  /// The ep rank that owns expert e.
  int owner_of(std::int64_t expert) const;
  /// The largest number of experts any ep rank owns (ceil(E / ep)).
  std::int64_t max_local_experts() const { return (num_experts_ + ep_ - 1) / ep_; }

 private:
  std::int64_t num_experts_ = 1;
  int world_ = 1, ep_ = 1;
};

}  // namespace kmoe::comm
