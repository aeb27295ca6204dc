/// \file router_losses.hpp
/// \brief The router losses (<kmoe/core/router_losses.hpp>) over the global batch: their statistics summed over the
/// ranks that hold its tokens.
///
/// Under data and expert parallelism every rank routes its own tokens. The load-balancing loss is a product of two
/// means over all tokens, so it is not a sum of per-rank losses; its statistics are (per-expert counts and probability
/// sums, the token count, the z-loss sum). One allreduce of 2E + 2 doubles gives every rank the statistics of the
/// global batch, hence the same loss as one process on all tokens; core::router_loss_backward with them gives each
/// rank the gradient w.r.t. its own tokens' logits, and the router gradients summed over the world (GradientSet's
/// replicated kind) are the single-process ones.
#pragma once

#include <kmoe/comm/communicator.hpp>
#include <kmoe/core/router_losses.hpp>

#include <vector>

namespace kmoe::comm {

/// Sums `stats` over the ranks of `group`, in place (host memory; blocks). Collective: every rank passes statistics
/// of the same expert count and top_k (a rank without tokens passes RouterLossStats::zeros(E, k), or what
/// core::router_loss_statistics leaves for zero tokens). UsageError when `stats` is empty.
inline void allreduce_router_loss_stats(Communicator& group, core::RouterLossStats& stats) {
  KMOE_CHECK_USAGE(!stats.empty(), "kmoe::comm::allreduce_router_loss_stats: empty statistics (take them with "
                                   "core::router_loss_statistics, or RouterLossStats::zeros for a rank without tokens)");
  std::vector<double> v = stats.pack();
  group.allreduce_sum_host(v.data(), static_cast<std::int64_t>(v.size()));
  stats.unpack(v);
}

}  // namespace kmoe::comm
