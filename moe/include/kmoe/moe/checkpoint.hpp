/// \file checkpoint.hpp
/// \brief A MoeLayer from a Hugging Face checkpoint directory and a layer index (through io's model specs).
#pragma once

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <kmoe/moe/moe_layer.hpp>

namespace kmoe::moe {

/// The expert variant of a checkpoint's architecture (its spec and config: GPT-OSS's clamp limit).
inline core::ExpertOptions expert_options(const io::ModelSpec& spec, const io::ModelConfig& config) {
  core::ExpertOptions o;
  if (spec.expert == io::ExpertVariant::ClampedSwiGLU) {
    o.activation = core::Activation::ClampedSwiGLU;
    o.limit = config.swiglu_limit;
  }
  return o;
}

/// InputError naming the checkpoint when its architecture needs a variant that the portable MoeLayer does not run,
/// so that such a model is refused rather than run with the wrong math. It runs every routing variant of
/// core::RoutingOptions (with router and selection biases), SwiGLU and the clamped SwiGLU with expert biases, and
/// plain or sigmoid-gated shared experts: every architecture of io::model_specs() today. What is left to refuse: a
/// spec whose expert variant this build does not know, and a config whose hidden_act is not SiLU (the experts'
/// activation is built on silu; a "gelu" SwiGLU-shaped model would otherwise run with the wrong function).
inline void check_layer_runs(const io::HfCheckpoint& checkpoint) {
  const auto& c = checkpoint.config();
  const io::ModelSpec& spec = io::spec_for(c.architecture);
  const bool known = spec.expert == io::ExpertVariant::SwiGLU || spec.expert == io::ExpertVariant::ClampedSwiGLU;
  KMOE_CHECK_INPUT(known, checkpoint.dir().string(), ": ", c.architecture, " needs experts ",
                   io::describe(spec.expert, c.swiglu_limit), ", which kmoe's MoE layer does not run");
  KMOE_CHECK_INPUT(c.hidden_act.empty() || c.hidden_act == "silu" || c.hidden_act == "swish",
                   checkpoint.dir().string(), ": ", c.architecture, " has hidden_act \"", c.hidden_act,
                   "\", which kmoe's MoE layer does not run (its experts use silu)");
}

/// The weights of MoE layer `layer` in kmoe's layout, widened to T (bf16 -> float/double is exact), in ExecSpace's
/// memory space (host Views are used as loaded, without a copy), with the architecture's optional tensors (router
/// and selection biases, expert biases, the shared-expert gate), its routing variant (the config's values) and expert
/// variant. InputError naming the checkpoint when `layer` is outside [0, num_hidden_layers) or whose architecture the
/// layer does not run (check_layer_runs), and io's errors for missing or misshapen tensors.
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
MoeWeights<T, ExecSpace> load_weights(const io::HfCheckpoint& checkpoint, int layer) {
  const auto& config = checkpoint.config();
  KMOE_CHECK_INPUT(layer >= 0 && layer < config.num_layers, checkpoint.dir().string(), ": layer ", layer,
                   " is out of range (the model has ", config.num_layers, " layers: 0..", config.num_layers - 1, ")");
  check_layer_runs(checkpoint);
  auto host = io::load_moe_layer<T>(checkpoint, layer);
  using Mem = typename ExecSpace::memory_space;
  MoeWeights<T, ExecSpace> w;
  for_each_weight_pair(w, host, [](auto& dst, const auto& src, const char*) {
    dst = Kokkos::create_mirror_view_and_copy(Mem(), src);
  });
  w.score_bias = Kokkos::create_mirror_view_and_copy(Mem(), host.score_bias);
  w.routing = config.routing;
  w.expert = expert_options(io::spec_for(config.architecture), config);
  w.family = config.architecture;
  return w;
}

/// MoeLayer of MoE layer `layer` of `checkpoint`; options.top_k = 0 takes k from the config (num_experts_per_tok).
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
MoeLayer<T, ExecSpace> layer_from_checkpoint(const io::HfCheckpoint& checkpoint, int layer, MoeOptions options,
                                             ExecSpace space = ExecSpace()) {
  if (options.top_k == 0) options.top_k = checkpoint.config().top_k;
  return MoeLayer<T, ExecSpace>(load_weights<T, ExecSpace>(checkpoint, layer), options, space);
}

}  // namespace kmoe::moe
