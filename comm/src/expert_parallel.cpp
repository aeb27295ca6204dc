#include <kmoe/comm/expert_parallel.hpp>

namespace kmoe::comm {

ExpertParallel::ExpertParallel(Communicator& world, std::int64_t num_experts, int ep)
    : world_(&world), placement_(ExpertPlacement::make(num_experts, world.size(), ep == 0 ? world.size() : ep)) {
  const int w = world.rank();
  // An ep group is a run of consecutive world ranks (one replica); a replica group holds one ep rank of each replica.
  ep_group_ = world.split(placement_.replica_of(w), placement_.ep_rank_of(w));
  replica_group_ = world.split(placement_.ep_rank_of(w), placement_.replica_of(w));
  KMOE_ASSERT(ep_group_->size() == placement_.ep() && ep_group_->rank() == placement_.ep_rank_of(w));
  KMOE_ASSERT(replica_group_->size() == placement_.replicas() && replica_group_->rank() == placement_.replica_of(w));
}

}  // namespace kmoe::comm
