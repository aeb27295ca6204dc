/// \file model_spec.hpp
/// \brief Model specs: one table entry per architecture maps checkpoint tensor names to kmoe's expert layout, and back.
///
/// kmoe's layout of one MoE layer (row-major): router [E,H]; W1 and W3 [E,F,H]; W2 [E,H,F]; optional shared expert
/// W1 and W3 [S,H], W2 [H,S]. y = sum_k w_k W2[e_k] (act(W1[e_k] x) * W3[e_k] x) (+ shared_w2 (act(shared_w1 x) *
/// shared_w3 x)). Each kmoe tensor is described by a TensorRule: a name pattern, whether the checkpoint stores one
/// matrix per expert (stacked by kmoe along dim 0), and which rows of the checkpoint matrix it is (fused gate/up
/// matrices hold W1 in their first half of rows and W3 in the second). Adding an architecture = one entry in
/// model_specs() (io/model_spec.cpp); docs/adding-a-model.md says how.
#pragma once

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe::io {

/// Which rows (second-to-last dimension) of the checkpoint matrix a kmoe tensor is.
enum class RowPart {
  All,         ///< the whole matrix
  FirstHalf,   ///< rows [0, R/2) of a fused [.., 2F, H] matrix (W1 / gate)
  SecondHalf,  ///< rows [R/2, R) (W3 / up)
};

/// Where one kmoe tensor lives in a checkpoint.
struct TensorRule {
  std::string pattern;      ///< name with {layer} (and {expert} when per_expert); "" = the architecture has none
  bool per_expert = false;  ///< one checkpoint matrix per expert (kmoe stacks them along dim 0)
  RowPart rows = RowPart::All;
  bool present() const { return !pattern.empty(); }
};

/// One architecture: how its config.json and tensor names map to kmoe.
struct ModelSpec {
  std::string architecture;  ///< config.json architectures[0], e.g. "MixtralForCausalLM"
  std::string model_type;    ///< config.json model_type, e.g. "mixtral"
  std::string summary;       ///< one line for `kmoe inspect`

  // config.json keys (defaults are Mixtral's / Granite's)
  std::string num_experts_key = "num_local_experts";
  std::string top_k_key = "num_experts_per_tok";
  std::string intermediate_key = "intermediate_size";
  std::string shared_intermediate_key;  ///< "" = no shared expert
  /// config.json `hidden_act` values kmoe computes for this architecture: its expert MLP is SwiGLU, i.e. SiLU
  /// ("swish" is transformers' other name for it). Any other activation is refused by name, never run as SiLU.
  std::vector<std::string> hidden_acts = {"silu", "swish"};

  TensorRule router;                         ///< kmoe [E,H]
  TensorRule w1, w3, w2;                     ///< kmoe [E,F,H], [E,F,H], [E,H,F]
  TensorRule shared_w1, shared_w3, shared_w2;  ///< kmoe [S,H], [S,H], [H,S]; not present() = no shared expert

  bool has_shared_expert() const { return shared_w1.present(); }
};

/// Every architecture kmoe knows, in table order.
const std::vector<ModelSpec>& model_specs();

/// The spec of `architecture`; nullptr when unknown.
const ModelSpec* find_spec(const std::string& architecture);

/// The spec of `architecture`; kmoe::InputError naming it and listing the known architectures when unknown.
const ModelSpec& spec_for(const std::string& architecture);

/// One checkpoint tensor a MoE layer needs, with the shape the config implies.
struct ExpectedTensor {
  std::string name;
  std::vector<std::int64_t> shape;
};

/// Throws kmoe::InputError naming `where` and the activation unless spec.hidden_acts holds config.hidden_act.
void check_hidden_act(const ModelSpec& spec, const ModelConfig& config, const std::string& where);

/// The checkpoint tensors of MoE layer `layer` (in the spec's order: router, experts, shared expert), with shapes.
std::vector<ExpectedTensor> moe_layer_tensors(const ModelSpec& spec, const ModelConfig& config, int layer);

/// True when `name` is a MoE tensor of the spec (any layer, any expert); *layer receives its layer when non-null.
bool is_moe_tensor(const ModelSpec& spec, const std::string& name, int* layer = nullptr);

/// The layers of the checkpoint whose MoE tensors are all present (every layer, for the architectures known).
std::vector<int> find_moe_layers(const HfCheckpoint& checkpoint, const ModelSpec& spec);

/// One MoE layer's weights in kmoe's layout, as host Views (LayoutRight, row-major like the checkpoint).
template <class T>
struct MoeLayerWeights {
  using Matrix = Kokkos::View<T**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  using Stack = Kokkos::View<T***, Kokkos::LayoutRight, Kokkos::HostSpace>;
  Matrix router;                          ///< [E,H]
  Stack w1, w3;                           ///< [E,F,H]
  Stack w2;                               ///< [E,H,F]
  Matrix shared_w1, shared_w3;            ///< [S,H]; empty (extent 0) without a shared expert
  Matrix shared_w2;                       ///< [H,S]; empty without a shared expert
  bool has_shared_expert() const { return shared_w1.extent(0) != 0; }
};

/// Loads MoE layer `layer` of `checkpoint` (its architecture's spec) as T = float, double or kmoe::bf16 (bf16 bits
/// preserved; bf16 -> float exact). kmoe::InputError for an unknown architecture, a layer out of range, a missing
/// tensor or one of the wrong shape: the message names the tensor and lists every expected tensor with its shape.
template <class T>
MoeLayerWeights<T> load_moe_layer(const HfCheckpoint& checkpoint, int layer);

/// As above with an explicit spec and config (e.g. for a checkpoint whose config the caller has adjusted).
template <class T>
MoeLayerWeights<T> load_moe_layer(const HfCheckpoint& checkpoint, const ModelSpec& spec, const ModelConfig& config,
                                  int layer);

/// The reverse map: kmoe-layout weights of layer `layer` as the checkpoint tensors of `spec` (names, shapes, bytes
/// encoded as `dtype`, e.g. DType::BF16 for a bf16 checkpoint; lossless when the values are representable, as they
/// are after load_moe_layer of that checkpoint), in moe_layer_tensors order. Fused matrices are re-assembled.
/// kmoe::InputError when the weights' shapes disagree with each other.
template <class T>
std::vector<NamedTensorBytes> moe_layer_to_checkpoint(const ModelSpec& spec, int layer,
                                                      const MoeLayerWeights<T>& weights, DType dtype);

}  // namespace kmoe::io
