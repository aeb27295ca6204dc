/// \file model_spec.hpp
/// \brief Model specs: one table entry per architecture maps its config.json keys and checkpoint tensor names to
/// kmoe's MoE layout, and back, and names the routing and expert variants the architecture needs.
///
/// kmoe's layout of one MoE layer (row-major): router [E,H]; W1 and W3 [E,F,H]; W2 [E,H,F]; optional shared expert
/// W1 and W3 [S,H], W2 [H,S]. y = sum_k w_k W2[e_k] (act(W1[e_k] x) * W3[e_k] x) (+ shared_w2 (act(shared_w1 x) *
/// shared_w3 x)). Families with more carry more tensors: a router bias [E] (GPT-OSS), a selection bias [E]
/// (DeepSeek-V3's e_score_correction_bias), expert biases W1/W3 [E,F] and W2 [E,H] (GPT-OSS), a shared-expert gate
/// [1,H] (Qwen2-MoE). Each kmoe tensor is described by a TensorRule: a name pattern, whether the checkpoint stores
/// one matrix per expert (stacked by kmoe along dim 0), which rows of the checkpoint matrix it is (fused gate/up
/// matrices hold W1 and W3 as halves or interleaved rows), whether the checkpoint stores it transposed, and a dtype
/// the checkpoint keeps it in. Adding an architecture = one entry in model_specs() (io/model_spec.cpp);
/// docs/adding-a-model.md says how.
#pragma once

#include <kmoe/core/routing_options.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::io {

/// Which rows of the checkpoint matrix a kmoe tensor is: the second-to-last dimension of a matrix (after undoing a
/// transposed layout), the last dimension of a vector per expert (a bias [E, 2F]).
enum class RowPart {
  All,         ///< the whole matrix
  FirstHalf,   ///< rows [0, R/2) of a fused [.., 2F, H] matrix (W1 / gate)
  SecondHalf,  ///< rows [R/2, R) (W3 / up)
  Even,        ///< rows 0, 2, 4, ... of an interleaved fused matrix (GPT-OSS's gate)
  Odd,         ///< rows 1, 3, 5, ... (GPT-OSS's up)
};

/// Where one kmoe tensor lives in a checkpoint.
struct TensorRule {
  std::string pattern;      ///< name with {layer} (and {expert} when per_expert); "" = the architecture has none
  bool per_expert = false;  ///< one checkpoint matrix per expert (kmoe stacks them along dim 0)
  RowPart rows = RowPart::All;
  bool transposed = false;  ///< the checkpoint stores the matrix with its last two dimensions swapped (GPT-OSS)
  std::optional<DType> keep_dtype = std::nullopt;  ///< the checkpoint keeps this tensor in this dtype whatever the model's dtype
  bool present() const { return !pattern.empty(); }
};

/// The activation arrangement of the routed experts.
enum class ExpertVariant {
  SwiGLU,         ///< W2 (act(W1 x) * W3 x)
  ClampedSwiGLU,  ///< GPT-OSS: biases; gate = min(W1 x + b1, limit), up = clamp(W3 x + b3, ±limit);
                  ///< W2 ((up + 1) * gate * sigmoid(1.702 gate)) + b2
};

/// How the shared expert (if any) enters the output.
enum class SharedVariant {
  None,          ///< no shared expert
  Plain,         ///< y += shared(x)
  SigmoidGated,  ///< y += sigmoid(shared_gate · x) * shared(x) (Qwen2-MoE)
};

/// One architecture: how its config.json and tensor names map to kmoe, and which variants its MoE block needs.
struct ModelSpec {
  using Keys = std::vector<std::string>;  ///< config.json keys for one field, the first one present wins

  std::string architecture;  ///< config.json architectures[0], e.g. "MixtralForCausalLM"
  std::string model_type;    ///< config.json model_type, e.g. "mixtral"
  std::string summary;       ///< one line for `kmoe inspect`

  // config.json keys (defaults are Mixtral's / Granite's)
  Keys num_experts_keys = {"num_local_experts"};
  Keys top_k_keys = {"num_experts_per_tok"};
  Keys intermediate_keys = {"intermediate_size"};
  Keys shared_intermediate_keys;  ///< the shared expert's width S; empty = none, or see shared_count_key
  /// When set (DeepSeek-V3: "n_shared_experts"), S = expert width * this count and a count of 0 means no shared
  /// expert.
  std::string shared_count_key;
  /// config.json `hidden_act` values kmoe computes for this architecture: its expert MLP is SwiGLU, i.e. SiLU
  /// ("swish" is transformers' other name for it). Any other activation is refused by name, never run as SiLU.
  std::vector<std::string> hidden_acts = {"silu", "swish"};

  /// The family's routing; the keys below, when set and present in config.json, override its fields.
  core::RoutingOptions routing;
  std::string renormalize_key;  ///< bool, e.g. "norm_topk_prob"
  std::string n_group_key, topk_group_key, group_score_topk_key;
  std::string scaling_key;  ///< e.g. "routed_scaling_factor"

  /// Which layers are MoE: layer l is when l >= config[first_dense_key], (l + 1) % config[sparse_step_key] == 0
  /// and l is not in config[mlp_only_key]; an unset or absent key does not restrict. The others are dense (their
  /// tensors pass through untouched).
  std::string first_dense_key, sparse_step_key, mlp_only_key;

  ExpertVariant expert = ExpertVariant::SwiGLU;
  std::string swiglu_limit_key;  ///< ClampedSwiGLU: config key of the clamp limit (default 7)

  TensorRule router;                           ///< kmoe [E,H]
  TensorRule router_bias;                      ///< kmoe [E], added to the logits
  TensorRule score_bias;                       ///< kmoe [E], the selection bias (choice only)
  TensorRule w1, w3, w2;                       ///< kmoe [E,F,H], [E,F,H], [E,H,F]
  TensorRule w1_bias, w3_bias, w2_bias;        ///< kmoe [E,F], [E,F], [E,H]
  TensorRule shared_w1, shared_w3, shared_w2;  ///< kmoe [S,H], [S,H], [H,S]; not present() = no shared expert
  TensorRule shared_gate;                      ///< kmoe [1,H]: the shared expert's sigmoid gate

  bool has_shared_expert() const { return shared_w1.present(); }
  SharedVariant shared_variant() const {
    return !has_shared_expert() ? SharedVariant::None
                                : shared_gate.present() ? SharedVariant::SigmoidGated : SharedVariant::Plain;
  }
  /// True when the expert MLPs carry biases (w1_bias / w3_bias / w2_bias).
  bool has_expert_biases() const { return w1_bias.present() || w3_bias.present() || w2_bias.present(); }
};

/// "swiglu" / "clamped swiglu ..." and "none" / "plain" / "sigmoid-gated" (what `kmoe inspect` prints).
std::string describe(ExpertVariant expert, double swiglu_limit);
const char* shared_variant_name(SharedVariant shared);

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

/// The checkpoint tensors of MoE layer `layer` (in the spec's order: router, its biases, experts, shared expert),
/// with shapes.
std::vector<ExpectedTensor> moe_layer_tensors(const ModelSpec& spec, const ModelConfig& config, int layer);

/// True when `name` is a MoE tensor of the spec (any layer, any expert); *layer receives its layer when non-null.
bool is_moe_tensor(const ModelSpec& spec, const std::string& name, int* layer = nullptr);

/// The layers of the checkpoint that its config makes MoE (ModelConfig::moe_layers) and whose MoE tensors are all
/// present.
std::vector<int> find_moe_layers(const HfCheckpoint& checkpoint, const ModelSpec& spec);

/// One MoE layer's weights in kmoe's layout, as host Views (LayoutRight, row-major like the checkpoint). The tensors
/// an architecture lacks are empty Views (extent 0).
template <class T>
struct MoeLayerWeights {
  using Vector = Kokkos::View<T*, Kokkos::LayoutRight, Kokkos::HostSpace>;
  using Matrix = Kokkos::View<T**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  using Stack = Kokkos::View<T***, Kokkos::LayoutRight, Kokkos::HostSpace>;
  /// The selection bias is float when T is bf16 (checkpoints keep it in F32, and it only steers the choice).
  using WideVector =
      Kokkos::View<std::conditional_t<std::is_same<T, kmoe::bf16>::value, float, T>*, Kokkos::LayoutRight,
                   Kokkos::HostSpace>;
  Matrix router;                          ///< [E,H]
  Vector router_bias;                     ///< [E]
  WideVector score_bias;                  ///< [E]
  Stack w1, w3;                           ///< [E,F,H]
  Stack w2;                               ///< [E,H,F]
  Matrix w1_bias, w3_bias;                ///< [E,F]
  Matrix w2_bias;                         ///< [E,H]
  Matrix shared_w1, shared_w3;            ///< [S,H]; empty (extent 0) without a shared expert
  Matrix shared_w2;                       ///< [H,S]; empty without a shared expert
  Matrix shared_gate;                     ///< [1,H]
  bool has_shared_expert() const { return shared_w1.extent(0) != 0; }
  /// True when a tensor beyond router, W1/W3/W2 and the plain shared expert is present.
  bool has_extras() const {
    return router_bias.extent(0) || score_bias.extent(0) || w1_bias.extent(0) || w3_bias.extent(0) ||
           w2_bias.extent(0) || shared_gate.extent(0);
  }
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
/// encoded as `dtype`, e.g. DType::BF16 for a bf16 checkpoint, except a rule's keep_dtype; lossless when the values
/// are representable, as they are after load_moe_layer of that checkpoint), in moe_layer_tensors order. Fused and
/// transposed matrices are re-assembled. kmoe::InputError when the weights' shapes disagree with each other or a
/// tensor the spec needs is missing (an empty View).
template <class T>
std::vector<NamedTensorBytes> moe_layer_to_checkpoint(const ModelSpec& spec, int layer,
                                                      const MoeLayerWeights<T>& weights, DType dtype);

}  // namespace kmoe::io
