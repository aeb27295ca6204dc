/// \file checkpoint.hpp
/// \brief Hugging Face checkpoint directories: config.json, a single model.safetensors or an index json + shards.
///
/// The layout is what transformers' `save_pretrained(safe_serialization=True)` writes: `config.json`, and either
/// `model.safetensors` or `model.safetensors.index.json` ({"metadata": {"total_parameters", "total_size"},
/// "weight_map": {tensor: shard file}}) with `model-0000K-of-0000N.safetensors` shards. Tensors are looked up by name
/// across shards. Writing reproduces transformers' index json byte for byte (indent 2, sorted keys, trailing newline).
#pragma once

#include <kmoe/core/routing_options.hpp>
#include <kmoe/io/safetensors.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::io {

/// The fields of config.json kmoe needs. Key names come from the architecture's ModelSpec (model_spec.hpp), so a
/// model that calls them differently (e.g. "num_experts", "n_routed_experts") is one table entry.
struct ModelConfig {
  std::string architecture;   ///< architectures[0], e.g. "MixtralForCausalLM" ("" when absent)
  std::string model_type;     ///< e.g. "mixtral"
  std::string hidden_act;     ///< e.g. "silu"
  std::string dtype;          ///< "dtype" (or legacy "torch_dtype"), e.g. "bfloat16"; "" when absent
  std::int64_t hidden_size = 0;               ///< H
  std::int64_t intermediate_size = 0;         ///< F (per expert)
  std::int64_t num_experts = 0;               ///< E ("num_local_experts", "num_experts", "n_routed_experts")
  std::int64_t top_k = 0;                     ///< k ("num_experts_per_tok")
  std::int64_t num_layers = 0;                ///< "num_hidden_layers"
  std::int64_t shared_intermediate_size = 0;  ///< S of the shared expert; 0 if none
  std::vector<int> moe_layers;                ///< the layers the config makes MoE, ascending (others are dense)
  std::vector<std::string> layer_types;       ///< "layer_types" when present (e.g. Mamba vs attention layers)
  core::RoutingOptions routing;               ///< the architecture's routing with this config's values
  double swiglu_limit = 7.0;                  ///< the clamp of a clamped SwiGLU ("swiglu_limit", GPT-OSS)
};
/// Reads config.json. Missing or ill-typed fields the architecture needs: kmoe::InputError naming the file and key.
/// An architecture with no ModelSpec still reads (with the default key names), so `kmoe inspect` can show it.
ModelConfig read_model_config(const std::filesystem::path& config_json);

/// As read_model_config, from the text of a config.json; `config_json` names it in messages.
ModelConfig parse_model_config(const std::string& text, const std::filesystem::path& config_json);

/// Where one tensor of a checkpoint lives.
struct ShardEntry {
  std::string tensor;  ///< tensor name
  std::string file;    ///< shard file name, relative to the checkpoint directory
};

/// A Hugging Face checkpoint directory, every shard memory-mapped.
class HfCheckpoint {
 public:
  /// Opens `dir`: config.json, then model.safetensors.index.json (and every shard it names) or model.safetensors.
  /// Throws kmoe::InputError naming the file (and tensor) for: a missing config/index/shard, a corrupt shard, a tensor
  /// the index names but its shard lacks, a shard tensor the index does not list, an index path escaping `dir`.
  static HfCheckpoint open(const std::filesystem::path& dir);

  const ModelConfig& config() const { return config_; }
  const std::filesystem::path& dir() const { return dir_; }
  /// True when the checkpoint has an index json (even with one shard).
  bool is_sharded() const { return sharded_; }
  /// True when some shard holds `name`.
  bool has(const std::string& name) const;
  /// The tensor `name`, from whichever shard holds it; InputError naming the checkpoint and tensor when absent.
  const TensorView& tensor(const std::string& name) const;
  /// Every tensor name, in index order (the index's sorted weight_map; file order for a single file).
  std::vector<std::string> tensor_names() const;
  /// The file of each tensor, in index order (what a converter reproduces to keep transformers' sharding).
  const std::vector<ShardEntry>& shard_plan() const { return plan_; }
  /// Shard file names, sorted (model-00001-of-0000N first).
  std::vector<std::string> shard_files() const;
  /// An opened shard by file name (relative to dir()).
  const SafetensorsFile& shard(const std::string& file) const;
  /// The index's metadata.total_size / total_parameters (computed from the tensors for a single file).
  std::int64_t total_size() const { return total_size_; }
  std::int64_t total_parameters() const { return total_parameters_; }

 private:
  std::filesystem::path dir_;
  ModelConfig config_;
  bool sharded_ = false;
  std::vector<ShardEntry> plan_;
  std::map<std::string, SafetensorsFile> shards_;
  std::map<std::string, std::string> file_of_;
  std::int64_t total_size_ = 0, total_parameters_ = 0;
};

/// The index json text transformers writes: json.dumps({"metadata": {"total_parameters", "total_size"},
/// "weight_map": {...}}, indent=2, sort_keys=True) + "\n".
std::string index_json_text(const std::vector<ShardEntry>& weight_map, std::int64_t total_size,
                            std::int64_t total_parameters);

/// Writes index_json_text atomically to `path`.
void write_index_json(const std::filesystem::path& path, const std::vector<ShardEntry>& weight_map,
                      std::int64_t total_size, std::int64_t total_parameters);

/// Writes `tensors` into `dir` following `plan` (each tensor into the shard file the plan names; every tensor must be
/// in the plan and every plan entry must have a tensor), each shard with {"format":"pt"} metadata, then, when
/// `with_index`, model.safetensors.index.json with total_size (bytes) and total_parameters: `total_parameters` when
/// given, else every element. transformers counts parameters only, not buffers (DeepSeek-V3's
/// e_score_correction_bias is a buffer): to reproduce a checkpoint's index pass its HfCheckpoint::total_parameters().
/// Atomic per file.
void write_checkpoint_tensors(const std::filesystem::path& dir, const std::vector<TensorToWrite>& tensors,
                              const std::vector<ShardEntry>& plan, bool with_index,
                              std::optional<std::int64_t> total_parameters = std::nullopt);

}  // namespace kmoe::io
