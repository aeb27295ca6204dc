/// \file checkpoint.hpp
/// \brief A MoeLayer from a Hugging Face checkpoint directory and a layer index (through io's model specs).
#pragma once

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <kmoe/moe/moe_layer.hpp>

namespace kmoe::moe {

/// InputError naming the checkpoint when its architecture needs a routing, expert or shared-expert variant that
/// MoeLayer does not run (it runs softmax → top-k → renormalise, SwiGLU experts and an ungated shared expert), so
/// that such a model is refused rather than run with the wrong math. The spec and config say what it needs.
inline void check_layer_runs(const io::HfCheckpoint& checkpoint) {
  const auto& c = checkpoint.config();
  const io::ModelSpec& spec = io::spec_for(c.architecture);
  std::string needs;
  auto add = [&](const std::string& what) { needs += (needs.empty() ? "" : "; ") + what; };
  if (!c.routing.is_default()) add("routing: " + core::describe(c.routing));
  if (spec.router_bias.present()) add("a router bias");
  if (spec.score_bias.present()) add("a selection bias");
  if (spec.expert != io::ExpertVariant::SwiGLU) add("experts: " + io::describe(spec.expert, c.swiglu_limit));
  if (spec.shared_variant() == io::SharedVariant::SigmoidGated) add("a sigmoid-gated shared expert");
  KMOE_CHECK_INPUT(needs.empty(), checkpoint.dir().string(), ": ", c.architecture, " needs ", needs,
                   ", which kmoe's MoE layer does not run yet (it runs softmax, top-k, renormalise with SwiGLU "
                   "experts and an ungated shared expert)");
}

/// The weights of MoE layer `layer` in kmoe's layout, widened to T (bf16 -> float/double is exact), in ExecSpace's
/// memory space (host Views are used as loaded, without a copy). InputError naming the checkpoint when `layer` is
/// outside [0, num_hidden_layers) or whose architecture the layer does not run (check_layer_runs), and io's errors
/// for missing or misshapen tensors.
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
