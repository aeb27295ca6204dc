#include <kmoe/comm/gradients.hpp>

#include <algorithm>
#include <cmath>

namespace kmoe::comm {

void GradientSet::reduce() {
  for (auto& e : entries_)
    e.allreduce(e.kind == GradKind::replicated ? layout_->world() : layout_->replica_group());
}

double GradientSet::global_norm() const {
  // Count each parameter once over the job: a replicated one on world rank 0 only, an expert slice on replica 0 only
  // (after reduce() the other copies are equal), then one sum over the world.
  const bool count_replicated = layout_->world().rank() == 0, count_expert = layout_->replica() == 0;
  double sumsq = 0;
  for (const auto& e : entries_) {
    const bool counted = e.kind == GradKind::replicated ? count_replicated : count_expert;
    if (counted) sumsq += e.sum_of_squares();
  }
  layout_->world().allreduce_sum_host(&sumsq, 1);
  return std::sqrt(sumsq);
}

double GradientSet::clip(double max_norm) {
  KMOE_CHECK_USAGE(max_norm > 0, "kmoe::comm::GradientSet::clip: max_norm = ", max_norm, " (must be > 0)");
  const double norm = global_norm();
  const double factor = max_norm / (norm + 1e-6);
  if (factor < 1)
    for (auto& e : entries_) e.scale(factor);
  return norm;
}

}  // namespace kmoe::comm
