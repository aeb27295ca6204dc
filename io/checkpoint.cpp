// Hugging Face checkpoint directories: config.json, index json + shards or a single file; the index writer.
#include <kmoe/io/checkpoint.hpp>

#include <kmoe/io/atomic_file.hpp>
#include <kmoe/io/model_spec.hpp>

#include "detail/file_util.hpp"
#include "detail/json.hpp"

#include <algorithm>
#include <set>

namespace kmoe::io {
namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

detail::json read_json_file(const std::filesystem::path& path) {
  return detail::parse_json_text(detail::read_regular_file(path, detail::kMaxJsonFileBytes), path.string());
}

/// The first of `keys` present (and not null) in `j`, or end().
detail::json::const_iterator find_key(const detail::json& j, const std::vector<std::string>& keys) {
  for (const auto& k : keys)
    if (const auto it = j.find(k); it != j.end() && !it->is_null()) return it;
  return j.end();
}

/// "a" or "a" (or "b")
std::string key_text(const std::vector<std::string>& keys) {
  std::string s;
  for (std::size_t i = 0; i < keys.size(); ++i) s += (i ? " (or \"" : "\"") + keys[i] + (i ? "\")" : "\"");
  return s;
}

std::int64_t config_int(const detail::json& j, const std::vector<std::string>& keys,
                        const std::filesystem::path& path, bool required, std::int64_t fallback = 0) {
  const auto it = find_key(j, keys);
  if (it == j.end()) {
    KMOE_CHECK_INPUT(!required, path.string(), ": missing ", key_text(keys));
    return fallback;
  }
  KMOE_CHECK_INPUT(it->is_number_integer() && it->get<std::int64_t>() >= 0, path.string(), ": \"", it.key(),
                   "\" must be a non-negative integer, got ", detail::json_brief(*it));
  return it->get<std::int64_t>();
}

std::int64_t config_int(const detail::json& j, const std::string& key, const std::filesystem::path& path,
                        bool required, std::int64_t fallback = 0) {
  return config_int(j, std::vector<std::string>{key}, path, required, fallback);
}

double config_double(const detail::json& j, const std::string& key, const std::filesystem::path& path,
                     double fallback) {
  const auto it = j.find(key);
  if (key.empty() || it == j.end() || it->is_null()) return fallback;
  KMOE_CHECK_INPUT(it->is_number(), path.string(), ": \"", key, "\" must be a number, got ", detail::json_brief(*it));
  return it->get<double>();
}

bool config_bool(const detail::json& j, const std::string& key, const std::filesystem::path& path, bool fallback) {
  const auto it = j.find(key);
  if (key.empty() || it == j.end() || it->is_null()) return fallback;
  KMOE_CHECK_INPUT(it->is_boolean(), path.string(), ": \"", key, "\" must be true or false, got ", detail::json_brief(*it));
  return it->get<bool>();
}

std::vector<int> config_int_list(const detail::json& j, const std::string& key, const std::filesystem::path& path) {
  const auto it = j.find(key);
  if (key.empty() || it == j.end() || it->is_null()) return {};
  bool ok = it->is_array();
  std::vector<int> out;
  if (ok)
    for (const auto& v : *it) {
      ok = ok && v.is_number_integer() && v.get<std::int64_t>() >= 0 && v.get<std::int64_t>() < (1 << 30);
      if (ok) out.push_back(v.get<int>());
    }
  KMOE_CHECK_INPUT(ok, path.string(), ": \"", key, "\" must be a list of layer indices, got ", detail::json_brief(*it));
  return out;
}

std::string config_string(const detail::json& j, const std::string& key, const std::filesystem::path& path) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "";
  KMOE_CHECK_INPUT(it->is_string(), path.string(), ": \"", key, "\" must be a string, got ", detail::json_brief(*it));
  return it->get<std::string>();
}

/// The architecture's routing with the config's values; checked against E and k, naming the keys.
core::RoutingOptions config_routing(const detail::json& j, const ModelSpec& spec, const ModelConfig& c,
                                    const std::filesystem::path& path) {
  core::RoutingOptions r = spec.routing;
  r.renormalize = config_bool(j, spec.renormalize_key, path, r.renormalize);
  if (!spec.n_group_key.empty()) r.n_group = config_int(j, spec.n_group_key, path, false, r.n_group);
  if (!spec.topk_group_key.empty()) r.topk_group = config_int(j, spec.topk_group_key, path, false, r.topk_group);
  if (!spec.group_score_topk_key.empty())
    r.group_score_topk = config_int(j, spec.group_score_topk_key, path, false, r.group_score_topk);
  r.scaling_factor = config_double(j, spec.scaling_key, path, r.scaling_factor);
  const std::string ng = spec.n_group_key.empty() ? "n_group" : spec.n_group_key;
  const std::string tg = spec.topk_group_key.empty() ? "topk_group" : spec.topk_group_key;
  KMOE_CHECK_INPUT(r.n_group >= 1 && r.n_group <= 64 && c.num_experts % r.n_group == 0, path.string(), ": \"", ng,
                   "\" = ", r.n_group, " must be in [1, 64] and divide the ", c.num_experts, " experts");
  if (r.n_group > 1) {
    const std::int64_t size = c.num_experts / r.n_group;
    KMOE_CHECK_INPUT(r.topk_group >= 1 && r.topk_group <= r.n_group, path.string(), ": \"", tg, "\" = ",
                     r.topk_group, " must be in [1, ", ng, " = ", r.n_group, "]");
    KMOE_CHECK_INPUT(r.group_score_topk >= 1 && r.group_score_topk <= size, path.string(), ": a group of ", size,
                     " experts cannot score its top ", r.group_score_topk, " (\"", ng, "\" = ", r.n_group, ")");
    KMOE_CHECK_INPUT(c.top_k <= r.topk_group * size, path.string(), ": top_k = ", c.top_k, " exceeds the ",
                     r.topk_group * size, " experts of the ", tg, " = ", r.topk_group, " kept groups");
  }
  KMOE_CHECK_INPUT(r.scaling_factor == r.scaling_factor && r.scaling_factor != 0, path.string(), ": \"",
                   spec.scaling_key, "\" = ", r.scaling_factor, " must be a non-zero number");
  return r;
}

/// The layers the config makes MoE (see ModelSpec::first_dense_key).
std::vector<int> config_moe_layers(const detail::json& j, const ModelSpec& spec, std::int64_t num_layers,
                                   const std::filesystem::path& path) {
  const std::int64_t first_dense = spec.first_dense_key.empty() ? 0 : config_int(j, spec.first_dense_key, path, false);
  std::int64_t step = spec.sparse_step_key.empty() ? 1 : config_int(j, spec.sparse_step_key, path, false, 1);
  KMOE_CHECK_INPUT(step >= 1, path.string(), ": \"", spec.sparse_step_key, "\" must be positive, got ", step);
  const std::vector<int> dense = config_int_list(j, spec.mlp_only_key, path);
  std::vector<int> out;
  for (int l = 0; l < num_layers; ++l)
    if (l >= first_dense && (l + 1) % step == 0 && std::find(dense.begin(), dense.end(), l) == dense.end())
      out.push_back(l);
  return out;
}

/// A shard name from the index must stay inside the checkpoint directory.
void check_shard_name(const std::string& file, const std::filesystem::path& index) {
  const std::filesystem::path p(file);
  bool ok = !file.empty() && p.is_relative() && file.find('\0') == std::string::npos;
  for (const auto& part : p) ok = ok && part != "..";
  KMOE_CHECK_INPUT(ok, index.string(), ": shard file '", kmoe::detail::printable(file),
                   "' is not a file inside the checkpoint directory");
}

}  // namespace

ModelConfig read_model_config(const std::filesystem::path& config_json) {
  return parse_model_config(detail::read_regular_file(config_json, detail::kMaxJsonFileBytes), config_json);
}

ModelConfig parse_model_config(const std::string& text, const std::filesystem::path& config_json) {
  const detail::json j = detail::parse_json_text(text, config_json.string());
  KMOE_CHECK_INPUT(j.is_object(), config_json.string(), ": not a JSON object");
  ModelConfig c;
  if (const auto a = j.find("architectures"); a != j.end() && !a->is_null()) {
    KMOE_CHECK_INPUT(a->is_array() && !a->empty() && (*a)[0].is_string(), config_json.string(),
                     ": \"architectures\" must be a non-empty array of strings, got ", detail::json_brief(*a));
    c.architecture = (*a)[0].get<std::string>();
  }
  c.model_type = config_string(j, "model_type", config_json);
  c.hidden_act = config_string(j, "hidden_act", config_json);
  if (c.hidden_act.empty()) c.hidden_act = "silu";  // transformers' default for every MoE family kmoe knows
  c.dtype = config_string(j, "dtype", config_json);
  if (c.dtype.empty()) c.dtype = config_string(j, "torch_dtype", config_json);
  // An architecture with a spec must have every field its MoE layers need; any other still reads, for inspection.
  const ModelSpec* spec = find_spec(c.architecture);
  const bool req = spec != nullptr;
  const ModelSpec plain;  // the default key names
  const ModelSpec& keys = spec ? *spec : plain;
  c.hidden_size = config_int(j, "hidden_size", config_json, req);
  c.num_layers = config_int(j, "num_hidden_layers", config_json, req);
  c.intermediate_size = config_int(j, keys.intermediate_keys, config_json, req);
  c.num_experts = config_int(j, keys.num_experts_keys, config_json, req);
  c.top_k = config_int(j, keys.top_k_keys, config_json, req);
  if (!spec) {
    c.shared_intermediate_size = config_int(j, "shared_intermediate_size", config_json, false);
  } else if (!spec->shared_intermediate_keys.empty()) {
    c.shared_intermediate_size = config_int(j, spec->shared_intermediate_keys, config_json, true);
  } else if (!spec->shared_count_key.empty()) {
    c.shared_intermediate_size = c.intermediate_size * config_int(j, spec->shared_count_key, config_json, false);
  }
  if (const auto lt = j.find("layer_types"); lt != j.end() && lt->is_array())
    for (const auto& v : *lt) c.layer_types.push_back(v.is_string() ? v.get<std::string>() : detail::json_brief(v));
  if (spec) {
    const std::string ik = key_text(spec->intermediate_keys), ek = key_text(spec->num_experts_keys);
    KMOE_CHECK_INPUT(c.hidden_size > 0 && c.intermediate_size > 0 && c.num_experts > 0 && c.num_layers > 0,
                     config_json.string(), ": hidden_size, ", ik, ", ", ek,
                     " and num_hidden_layers must be positive");
    KMOE_CHECK_INPUT(c.top_k >= 1 && c.top_k <= c.num_experts, config_json.string(), ": ",
                     key_text(spec->top_k_keys), " = ", c.top_k, " must be in [1, ", ek, " = ", c.num_experts, "]");
    KMOE_CHECK_INPUT(!spec->has_shared_expert() || c.shared_intermediate_size > 0, config_json.string(), ": ",
                     spec->shared_intermediate_keys.empty() ? "\"" + spec->shared_count_key + "\""
                                                            : key_text(spec->shared_intermediate_keys),
                     " must be positive for ", spec->architecture);
    c.routing = config_routing(j, *spec, c, config_json);
    c.moe_layers = config_moe_layers(j, *spec, c.num_layers, config_json);
    if (!spec->swiglu_limit_key.empty()) c.swiglu_limit = config_double(j, spec->swiglu_limit_key, config_json, 7.0);
    // The sizes of one layer's weights must be countable: E*F*H elements (and S*H) in an int64 of bytes.
    const auto fits = [](std::int64_t a, std::int64_t b, std::int64_t c) {
      constexpr std::int64_t kMax = std::int64_t(1) << 60;
      return a <= kMax / b && a * b <= kMax / c;
    };
    KMOE_CHECK_INPUT(fits(c.num_experts, c.intermediate_size, c.hidden_size) &&
                         (c.shared_intermediate_size == 0 || fits(1, c.shared_intermediate_size, c.hidden_size)),
                     config_json.string(), ": sizes ", ek, " = ", c.num_experts, ", ", ik, " = ", c.intermediate_size,
                     ", hidden_size = ", c.hidden_size, " make a layer of more than 2^60 elements");
  }
  return c;
}

HfCheckpoint HfCheckpoint::open(const std::filesystem::path& dir) {
  HfCheckpoint ck;
  ck.dir_ = dir;
  KMOE_CHECK_INPUT(detail::path_type(dir) == std::filesystem::file_type::directory, dir.string(),
                   ": not a checkpoint directory");
  ck.config_ = read_model_config(dir / "config.json");
  const auto index_path = dir / kIndexName;
  if (detail::path_exists(index_path)) {
    ck.sharded_ = true;
    const detail::json j = read_json_file(index_path);
    KMOE_CHECK_INPUT(j.is_object(), index_path.string(), ": not a JSON object");
    const auto wm = j.find("weight_map");
    KMOE_CHECK_INPUT(wm != j.end() && wm->is_object(), index_path.string(), ": missing \"weight_map\" object");
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      KMOE_CHECK_INPUT(it->is_string(), index_path.string(), ": weight_map entry of '", it.key(),
                       "' must be a file name, got ", detail::json_brief(*it));
      const std::string file = it->get<std::string>();
      check_shard_name(file, index_path);
      ck.plan_.push_back({it.key(), file});
      ck.file_of_[it.key()] = file;
    }
    for (const auto& e : ck.plan_) {
      if (ck.shards_.count(e.file)) continue;
      const auto shard_path = dir / e.file;
      KMOE_CHECK_INPUT(detail::path_exists(shard_path), shard_path.string(), ": missing shard (", kIndexName,
                       " lists it for tensor '", e.tensor, "')");
      ck.shards_.emplace(e.file, SafetensorsFile::open(shard_path));
    }
    for (const auto& e : ck.plan_)
      KMOE_CHECK_INPUT(ck.shards_.at(e.file).has(e.tensor), (dir / e.file).string(), ": no tensor '", e.tensor,
                       "' although ", kIndexName, " places it in this shard");
    for (const auto& [file, shard] : ck.shards_)
      for (const auto& t : shard.tensors())
        KMOE_CHECK_INPUT(ck.file_of_.count(t.name) && ck.file_of_.at(t.name) == file, t.where(), ": not listed in ",
                         kIndexName, ck.file_of_.count(t.name) ? " for this shard" : "");
    std::int64_t size = 0, params = 0;
    for (const auto& e : ck.plan_) {
      const auto& t = ck.shards_.at(e.file).tensor(e.tensor);
      size += static_cast<std::int64_t>(t.nbytes);
      params += t.numel();
    }
    ck.total_size_ = size;
    ck.total_parameters_ = params;
    if (const auto md = j.find("metadata"); md != j.end() && md->is_object()) {
      if (const auto ts = md->find("total_size"); ts != md->end() && ts->is_number_integer())
        ck.total_size_ = ts->get<std::int64_t>();
      if (const auto tp = md->find("total_parameters"); tp != md->end() && tp->is_number_integer())
        ck.total_parameters_ = tp->get<std::int64_t>();
    }
  } else {
    const auto single = dir / kSingleName;
    KMOE_CHECK_INPUT(detail::path_exists(single), dir.string(), ": neither ", kSingleName, " nor ", kIndexName);
    auto f = SafetensorsFile::open(single);
    for (const auto& t : f.tensors()) {
      ck.plan_.push_back({t.name, kSingleName});
      ck.file_of_[t.name] = kSingleName;
      ck.total_size_ += static_cast<std::int64_t>(t.nbytes);
      ck.total_parameters_ += t.numel();
    }
    ck.shards_.emplace(kSingleName, std::move(f));
  }
  return ck;
}

bool HfCheckpoint::has(const std::string& name) const { return file_of_.count(name) != 0; }

const TensorView& HfCheckpoint::tensor(const std::string& name) const {
  const auto it = file_of_.find(name);
  KMOE_CHECK_INPUT(it != file_of_.end(), dir_.string(), ": checkpoint has no tensor '", name, "'");
  return shards_.at(it->second).tensor(name);
}

std::vector<std::string> HfCheckpoint::tensor_names() const {
  std::vector<std::string> out;
  out.reserve(plan_.size());
  for (const auto& e : plan_) out.push_back(e.tensor);
  return out;
}

std::vector<std::string> HfCheckpoint::shard_files() const {
  std::vector<std::string> out;
  for (const auto& [file, shard] : shards_) out.push_back(file);
  return out;  // std::map: sorted
}

const SafetensorsFile& HfCheckpoint::shard(const std::string& file) const {
  const auto it = shards_.find(file);
  KMOE_CHECK_INPUT(it != shards_.end(), dir_.string(), ": no shard '", file, "'");
  return it->second;
}

std::string index_json_text(const std::vector<ShardEntry>& weight_map, std::int64_t total_size,
                            std::int64_t total_parameters) {
  // transformers: json.dumps(index, indent=2, sort_keys=True) + "\n". nlohmann's objects are sorted maps and its
  // indented dump with ensure_ascii matches Python's formatting (", " / ": " separators, \uXXXX escapes).
  detail::json j;
  j["metadata"]["total_parameters"] = total_parameters;
  j["metadata"]["total_size"] = total_size;
  j["weight_map"] = detail::json::object();
  for (const auto& e : weight_map) {
    KMOE_CHECK_INPUT(!j["weight_map"].contains(e.tensor), "index json: tensor '", e.tensor, "' listed twice");
    j["weight_map"][e.tensor] = e.file;
  }
  return j.dump(2, ' ', /*ensure_ascii=*/true) + "\n";
}

void write_index_json(const std::filesystem::path& path, const std::vector<ShardEntry>& weight_map,
                      std::int64_t total_size, std::int64_t total_parameters) {
  write_file_atomic(path, index_json_text(weight_map, total_size, total_parameters));
}

void write_checkpoint_tensors(const std::filesystem::path& dir, const std::vector<TensorToWrite>& tensors,
                              const std::vector<ShardEntry>& plan, bool with_index,
                              std::optional<std::int64_t> total_parameters) {
  std::map<std::string, const TensorToWrite*> by_name;
  for (const auto& t : tensors)
    KMOE_CHECK_INPUT(by_name.emplace(t.name, &t).second, dir.string(), ": tensor '", t.name, "' given twice");
  std::map<std::string, std::vector<TensorToWrite>> per_file;
  std::set<std::string> planned;
  std::int64_t size = 0, params = 0;
  for (const auto& e : plan) {
    check_shard_name(e.file, dir / kIndexName);
    const auto it = by_name.find(e.tensor);
    KMOE_CHECK_INPUT(it != by_name.end(), dir.string(), ": the shard plan lists tensor '", e.tensor,
                     "' but it was not given");
    KMOE_CHECK_INPUT(planned.insert(e.tensor).second, dir.string(), ": the shard plan lists tensor '", e.tensor,
                     "' twice");
    const TensorToWrite& t = *it->second;
    TensorToWrite ref;  // borrow: no copy of the bytes
    ref.name = t.name;
    ref.dtype = t.dtype;
    ref.shape = t.shape;
    ref.data = t.bytes() ? static_cast<const void*>(t.bytes()) : static_cast<const void*>("");
    KMOE_CHECK_INPUT(t.data || t.owned.size() == t.expected_nbytes(), dir.string(), ": tensor '", t.name,
                     "' holds ", t.owned.size(), " bytes, expected ", t.expected_nbytes());
    size += static_cast<std::int64_t>(t.expected_nbytes());
    std::int64_t n = 1;
    for (auto d : t.shape) n *= d;
    params += n;
    per_file[e.file].push_back(std::move(ref));
  }
  for (const auto& t : tensors)
    KMOE_CHECK_INPUT(planned.count(t.name), dir.string(), ": tensor '", t.name, "' is not in the shard plan");
  KMOE_CHECK_INPUT(with_index || per_file.size() <= 1, dir.string(), ": ", per_file.size(),
                   " shard files need an index json");
  for (const auto& [file, ts] : per_file) write_safetensors(dir / file, ts);
  if (with_index) write_index_json(dir / kIndexName, plan, size, total_parameters.value_or(params));
}

}  // namespace kmoe::io
