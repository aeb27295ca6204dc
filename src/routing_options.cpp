// The one-line descriptions of a routing and an expert variant (kmoe inspect, error messages).
#include <kmoe/core/expert_options.hpp>
#include <kmoe/core/routing_options.hpp>

#include <sstream>

namespace kmoe::core {

std::string describe(const RoutingOptions& o) {
  std::ostringstream os;
  os << score_function_name(o.score);
  if (o.softmax_over_topk)
    os << ", top-k of the logits, softmax over the k";
  else if (o.n_group > 1)
    os << ", group-limited top-k (" << o.n_group << " groups, keep " << o.topk_group << ", group score = sum of top "
       << o.group_score_topk << ")";
  else
    os << ", top-k";
  if (o.renormalize) {
    os << ", renormalise";
    if (o.renorm_epsilon != 0) os << " (+" << o.renorm_epsilon << ")";
  } else if (!o.softmax_over_topk) {
    os << ", no renormalisation";
  }
  if (o.scaling_factor != 1) os << ", scale " << o.scaling_factor;
  return os.str();
}

std::string describe(const ExpertOptions& o) {
  if (o.activation == Activation::SwiGLU) return "swiglu";
  std::ostringstream os;
  os << "clamped swiglu (alpha " << o.alpha << ", limit " << o.limit << ", up + " << o.up_offset << ")";
  return os.str();
}

}  // namespace kmoe::core
