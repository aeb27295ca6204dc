/// \file routing_options.hpp
/// \brief The variants of the routing stage (kmoe::core::routing_forward / routing_backward) as one plain struct,
/// so that model specs and layer options can carry them without pulling in the kernels.
///
/// The stage, per token t, with the options' names:
///   1. logits  l = x·Gᵀ (+ router_bias, when one is passed)
///   2. scores  p = softmax(l) over the E experts   | sigmoid(l)                     (`score`)
///   3. choice  c = p (or l when `softmax_over_topk`) + selection_bias (when passed; the bias only steers the choice)
///      group limit (`n_group` > 1): experts form n_group groups of E/n_group consecutive ones; a group scores the sum
///      of its `group_score_topk` largest c; only the `topk_group` best groups stay eligible
///      top-k of c over the eligible experts, descending, ties to the lower index (torch.topk's order)
///   4. weights v_s = p[idx_s]  | softmax over the k chosen logits (`softmax_over_topk`)
///      w_s = v_s / (sum_j v_j + renorm_epsilon) when `renormalize`, then w_s *= `scaling_factor`
/// The default-constructed options are softmax → top-k → renormalise (Mixtral, GraniteMoe).
#pragma once

#include <cstdint>
#include <string>

namespace kmoe::core {

/// How routing turns logits into per-expert scores.
enum class ScoreFunction {
  Softmax,  ///< softmax over the E experts
  Sigmoid,  ///< an independent sigmoid per expert (DeepSeek-V3)
};

/// The routing variant. Biases are not options: routing_forward takes them as Views (empty = none).
struct RoutingOptions {
  ScoreFunction score = ScoreFunction::Softmax;
  /// Choose by the logits and weight by a softmax over the k chosen logits (GPT-OSS, Granite: top-k, then softmax).
  /// Needs ScoreFunction::Softmax; equals softmax → top-k → renormalise up to rounding and ties.
  bool softmax_over_topk = false;
  /// Divide the chosen weights by their sum (+ renorm_epsilon). Off: the chosen scores as they are (OLMoE,
  /// Qwen2-MoE with norm_topk_prob = false).
  bool renormalize = true;
  double renorm_epsilon = 0;  ///< added to the denominator of the renormalisation (DeepSeek-V3: 1e-20)
  std::int64_t n_group = 1;   ///< expert groups for group-limited selection; 1 = no group limit (at most 64)
  std::int64_t topk_group = 1;        ///< groups kept when n_group > 1
  std::int64_t group_score_topk = 2;  ///< a group's score: the sum of its this many largest choice scores
  double scaling_factor = 1;          ///< multiplies the final weights (DeepSeek-V3's routed_scaling_factor)

  /// True for the default (softmax → top-k → renormalise, no group limit, no scaling).
  bool is_default() const {
    return score == ScoreFunction::Softmax && !softmax_over_topk && renormalize && renorm_epsilon == 0 &&
           n_group == 1 && scaling_factor == 1;
  }
};

/// "softmax" or "sigmoid".
inline const char* score_function_name(ScoreFunction s) { return s == ScoreFunction::Softmax ? "softmax" : "sigmoid"; }

/// One line naming the variant, e.g. "sigmoid, group-limited top-k (4 groups, keep 2, group score = sum of top 2),
/// renormalise (+1e-20), scale 2.5" (what `kmoe inspect` prints; the biases are named by the caller).
std::string describe(const RoutingOptions& options);

}  // namespace kmoe::core
