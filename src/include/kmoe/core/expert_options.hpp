/// \file expert_options.hpp
/// \brief The activation variants of the expert MLP (kmoe::core::grouped_mlp_* / scatter_mlp_* and the layer), as one
/// plain struct that model specs and weights carry without pulling in the kernels.
///
/// With h1 = W1 x (+ b1) and h3 = W3 x (+ b3) per row:
///   SwiGLU         act = silu(h1) * h3                                             (Mixtral, Qwen, DeepSeek, OLMoE)
///   ClampedSwiGLU  g = min(h1, limit), u = clamp(h3, -limit, limit),
///                  act = (u + up_offset) * g * sigmoid(alpha * g)                  (GPT-OSS: alpha 1.702, limit 7, +1)
/// and out = W2 act (+ b2). The clamps pass no gradient where they bite (h1 > limit, |h3| > limit), as torch.clamp.
#pragma once

#include <string>

namespace kmoe::core {

/// The expert activation.
enum class Activation {
  SwiGLU,         ///< silu(h1) * h3
  ClampedSwiGLU,  ///< GPT-OSS: (clamp(h3, ±limit) + up_offset) * g * sigmoid(alpha g), g = min(h1, limit)
};

/// The expert variant. Expert biases are not options: the kernels take them as Views (empty = none).
struct ExpertOptions {
  Activation activation = Activation::SwiGLU;
  double alpha = 1.702;    ///< ClampedSwiGLU: the sigmoid's slope
  double limit = 7.0;      ///< ClampedSwiGLU: the clamp
  double up_offset = 1.0;  ///< ClampedSwiGLU: added to the clamped up projection

  bool is_default() const { return activation == Activation::SwiGLU; }
};

/// "swiglu" or "clamped swiglu (alpha 1.702, limit 7, up + 1)".
std::string describe(const ExpertOptions& options);

}  // namespace kmoe::core
