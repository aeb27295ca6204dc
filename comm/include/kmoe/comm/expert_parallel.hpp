/// \file expert_parallel.hpp
/// \brief The communicators of an expert-parallel layout: the world, this rank's ep group and its replica group.
#pragma once

#include <kmoe/comm/communicator.hpp>
#include <kmoe/comm/placement.hpp>

#include <memory>

namespace kmoe::comm {

/// The world split into ep groups (consecutive ranks; all-to-all dispatch runs inside one) and replica groups (the
/// ranks holding the same expert range; expert gradients are summed over one). Collective over the world.
class ExpertParallel {
 public:
  /// Checks the layout first (ExpertPlacement::make: kmoe::UsageError on every rank, no communication before it),
  /// then splits `world` twice. `world` must outlive this object.
  /// \param world       [in] every rank of the job (MPI or NCCL backend; the groups get the same backend)
  /// \param num_experts [in] E
  /// \param ep          [in] ranks per ep group; 0 means world.size()
  ExpertParallel(Communicator& world, std::int64_t num_experts, int ep = 0);

  const ExpertPlacement& placement() const { return placement_; }
  Communicator& world() const { return *world_; }
  /// This rank's ep group: ep ranks, rank() == ep_rank().
  Communicator& ep_group() const { return *ep_group_; }
  /// This rank's replica group: replicas ranks that own the same experts.
  Communicator& replica_group() const { return *replica_group_; }
  int ep_rank() const { return ep_group_->rank(); }
  int replica() const { return replica_group_->rank(); }
  /// The experts this rank owns.
  Range local_experts() const { return placement_.experts_of(ep_rank()); }

 private:
  Communicator* world_;
  ExpertPlacement placement_;
  std::unique_ptr<Communicator> ep_group_, replica_group_;
};

}  // namespace kmoe::comm
