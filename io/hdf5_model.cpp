// The model level of HDF5 checkpoints: a Hugging Face checkpoint's plan and tensors into a kmoe checkpoint, MoE
// layers in kmoe's layout in and out (re-sliced to any expert range), and conversion back to the Hugging Face
// directory, byte for byte when the weights are unchanged.
#include <algorithm>
#include <kmoe/core/progress.hpp>
#include <kmoe/io/atomic_file.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>
#include <set>

#include "detail/file_util.hpp"
#include "hdf5_detail.hpp"

namespace kmoe::io {

namespace fs = std::filesystem;

namespace {

// The small files of a Hugging Face directory a conversion reproduces verbatim.
const char* const kTextFiles[] = {"config.json", "generation_config.json", "model.safetensors.index.json"};
// Of those, the ones copied from ORIGINAL_HF_DIR when it is given (the index is the checkpoint's own plan).
const char* const kConfigFiles[] = {"config.json", "generation_config.json"};

std::string read_file(const fs::path& p) { return detail::read_regular_file(p, detail::kMaxJsonFileBytes); }

std::string shape_text(const std::vector<std::int64_t>& s) { return kmoe::detail::dims_text(s); }

template <class View>
std::vector<std::int64_t> dims_of(const View& v) {
  std::vector<std::int64_t> d;
  for (unsigned r = 0; r < static_cast<unsigned>(View::rank); ++r) d.push_back(static_cast<std::int64_t>(v.extent(r)));
  return d;
}

}  // namespace

const std::vector<std::string>& moe_parts() {
  static const std::vector<std::string> parts = {"router",  "router_bias", "score_bias", "w1",        "w1_bias",
                                                 "w3",      "w3_bias",     "w2",         "w2_bias",   "shared_w1",
                                                 "shared_w3", "shared_w2", "shared_gate"};
  return parts;
}

std::string moe_tensor_name(int layer, const std::string& part, const std::string& prefix) {
  return prefix + "moe." + std::to_string(layer) + "." + part;
}

SourcePlan source_plan_of(const HfCheckpoint& hf) {
  SourcePlan plan;
  for (const auto& entry : hf.shard_plan()) {
    const TensorView& t = hf.tensor(entry.tensor);
    plan.tensors.push_back({entry.tensor, entry.file, dtype_name(t.dtype), t.shape});
  }
  // Shard files in the order the plan first names them (index order), each with its header's tensor order.
  std::vector<std::string> files;
  for (const auto& entry : hf.shard_plan())
    if (std::find(files.begin(), files.end(), entry.file) == files.end()) files.push_back(entry.file);
  for (const auto& f : files) {
    const SafetensorsFile& shard = hf.shard(f);
    plan.files.push_back({f, shard.names(), shard.metadata(), shard.has_metadata()});
  }
  for (const char* name : kTextFiles) {
    const fs::path p = hf.dir() / name;
    if (detail::path_exists(p)) plan.text_files[name] = read_file(p);  // a FIFO or directory: an error
  }
  return plan;
}

template <class T>
void add_moe_layer(CheckpointContents& c, int layer, const MoeLayerWeights<T>& weights, std::int64_t first_expert,
                   bool with_replicated, const std::string& prefix) {
  auto keep = std::make_shared<MoeLayerWeights<T>>(weights);  // Views are shared: this keeps the memory alive
  c.keep_alive.push_back(keep);
  const DType dtype = dtype_of<T>();
  const std::int64_t E = static_cast<std::int64_t>(weights.router.extent(0));
  const std::int64_t local = static_cast<std::int64_t>(weights.w1.extent(0));
  KMOE_CHECK_INPUT(first_expert >= 0 && first_expert + local <= E, "add_moe_layer(layer ", layer, "): experts [",
                   first_expert, ",", first_expert + local, ") outside the ", E, " of the router");
  auto sharded = [&](const char* part, const auto& stack) {
    auto shape = dims_of(stack);
    shape[0] = E;
    c.tensors.push_back(
        {moe_tensor_name(layer, part, prefix), dtype, shape, first_expert, first_expert + local, stack.data()});
  };
  auto whole = [&](const char* part, const auto& m) {
    const auto shape = dims_of(m);
    c.tensors.push_back({moe_tensor_name(layer, part, prefix), dtype, shape, 0, shape[0], m.data()});
  };
  sharded("w1", keep->w1);
  sharded("w3", keep->w3);
  sharded("w2", keep->w2);
  // The tensors only some architectures have (see MoeLayerWeights), when present.
  if (keep->w1_bias.extent(0)) sharded("w1_bias", keep->w1_bias);
  if (keep->w3_bias.extent(0)) sharded("w3_bias", keep->w3_bias);
  if (keep->w2_bias.extent(0)) sharded("w2_bias", keep->w2_bias);
  if (with_replicated) {
    whole("router", keep->router);
    if (keep->router_bias.extent(0)) whole("router_bias", keep->router_bias);
    if (keep->score_bias.extent(0)) whole("score_bias", keep->score_bias);
    if (keep->has_shared_expert()) {
      whole("shared_w1", keep->shared_w1);
      whole("shared_w3", keep->shared_w3);
      whole("shared_w2", keep->shared_w2);
      if (keep->shared_gate.extent(0)) whole("shared_gate", keep->shared_gate);
    }
  }
}

void add_non_moe_tensors(CheckpointContents& c, const HfCheckpoint& hf, const ModelSpec& spec) {
  for (const auto& name : hf.tensor_names()) {
    if (is_moe_tensor(spec, name)) continue;
    const TensorView& t = hf.tensor(name);
    KMOE_CHECK_INPUT(!t.shape.empty(), t.where(), ": scalar tensors are not supported in a checkpoint");
    c.keep_alive.push_back(t.owner);
    c.tensors.push_back({name, t.dtype, t.shape, 0, t.shape[0], t.data});
  }
}

void add_non_moe_tensors(CheckpointContents& c, const Hdf5Checkpoint& ck) {
  for (const auto& src : ck.source().tensors) {
    if (!ck.has(src.name)) continue;  // a MoE tensor: stored in kmoe's layout
    const StoredTensorInfo& info = ck.info(src.name);
    auto bytes = std::make_shared<std::vector<unsigned char>>(ck.read(src.name));
    c.keep_alive.push_back(bytes);
    c.tensors.push_back({src.name, info.dtype, info.shape, 0, info.shape[0], bytes->data()});
  }
}

std::vector<int> moe_layers(const Hdf5Checkpoint& ck) {
  std::vector<int> layers;
  for (const auto& n : ck.names()) {
    const std::string suffix = ".router";
    if (n.rfind("moe.", 0) != 0 || n.size() <= 4 + suffix.size() ||
        n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string digits = n.substr(4, n.size() - 4 - suffix.size());
    if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    layers.push_back(std::stoi(digits));
  }
  std::sort(layers.begin(), layers.end());
  return layers;
}

template <class T>
MoeLayerWeights<T> load_moe_layer(const Hdf5Checkpoint& ck, int layer, std::int64_t expert_begin,
                                  std::int64_t expert_end, const std::string& prefix) {
  const std::string where = "checkpoint " + ck.dir().string() + ": MoE layer " + std::to_string(layer) +
                            (prefix.empty() ? "" : " (" + prefix + ")");
  auto name = [&](const char* part) { return moe_tensor_name(layer, part, prefix); };
  const std::string router = name("router");
  KMOE_CHECK_INPUT(ck.has(router), where, ": missing (no tensor ", router, ")");
  const auto rshape = ck.info(router).shape;
  KMOE_CHECK_INPUT(rshape.size() == 2, where, ": router has shape ", shape_text(rshape), ", expected [E, H]");
  const std::int64_t E = rshape[0], H = rshape[1];
  KMOE_CHECK_INPUT(0 <= expert_begin && expert_begin <= expert_end && expert_end <= E, where, ": experts [",
                   expert_begin, ",", expert_end, ") outside the ", E, " experts");
  auto info_of = [&](const char* part) -> const StoredTensorInfo& { return ck.info(name(part)); };
  const auto s1 = info_of("w1").shape, s3 = info_of("w3").shape, s2 = info_of("w2").shape;
  KMOE_CHECK_INPUT(s1.size() == 3 && s1[0] == E && s1[2] == H && s3 == s1 &&
                       s2 == (std::vector<std::int64_t>{E, H, s1[1]}),
                   where, ": inconsistent shapes router ", shape_text(rshape), ", w1 ", shape_text(s1), ", w3 ",
                   shape_text(s3), ", w2 ", shape_text(s2));
  const std::int64_t F = s1[1], local = expert_end - expert_begin;
  using M = typename MoeLayerWeights<T>::Matrix;
  using St = typename MoeLayerWeights<T>::Stack;
  auto fill = [&](auto view, const std::string& tensor, std::int64_t b, std::int64_t e) {
    const auto values = ck.read_rows_f64(tensor, b, e);
    KMOE_ASSERT(values.size() == view.size());
    std::transform(values.begin(), values.end(), view.data(), [](double v) { return static_cast<T>(v); });
    return view;
  };
  MoeLayerWeights<T> w;
  w.router = fill(M("router", E, H), router, 0, E);
  w.w1 = fill(St("w1", local, F, H), name("w1"), expert_begin, expert_end);
  w.w3 = fill(St("w3", local, F, H), name("w3"), expert_begin, expert_end);
  w.w2 = fill(St("w2", local, H, F), name("w2"), expert_begin, expert_end);
  if (ck.has(name("shared_w1"))) {
    const auto a = info_of("shared_w1").shape, b = info_of("shared_w3").shape, d = info_of("shared_w2").shape;
    KMOE_CHECK_INPUT(a.size() == 2 && a[1] == H && b == a && d == (std::vector<std::int64_t>{H, a[0]}), where,
                     ": inconsistent shared-expert shapes w1 ", shape_text(a), ", w3 ", shape_text(b), ", w2 ",
                     shape_text(d));
    w.shared_w1 = fill(M("shared_w1", a[0], H), name("shared_w1"), 0, a[0]);
    w.shared_w3 = fill(M("shared_w3", a[0], H), name("shared_w3"), 0, a[0]);
    w.shared_w2 = fill(M("shared_w2", H, a[0]), name("shared_w2"), 0, H);
  }  // else: empty Views, as io's load_moe_layer of a Hugging Face checkpoint leaves them
  // The tensors only some architectures have, when stored.
  using V = typename MoeLayerWeights<T>::Vector;
  auto shape_is = [&](const char* part, const std::vector<std::int64_t>& want) {
    const auto got = info_of(part).shape;
    KMOE_CHECK_INPUT(got == want, where, ": ", part, " has shape ", shape_text(got), ", expected ", shape_text(want));
  };
  if (ck.has(name("router_bias"))) {
    shape_is("router_bias", {E});
    w.router_bias = fill(V("router_bias", E), name("router_bias"), 0, E);
  }
  if (ck.has(name("score_bias"))) {
    shape_is("score_bias", {E});
    w.score_bias = fill(V("score_bias", E), name("score_bias"), 0, E);
  }
  for (const char* part : {"w1_bias", "w3_bias", "w2_bias"}) {
    if (!ck.has(name(part))) continue;
    const std::int64_t cols = std::string(part) == "w2_bias" ? H : F;
    shape_is(part, {E, cols});
    M b = fill(M(std::string(part), local, cols), name(part), expert_begin, expert_end);
    (std::string(part) == "w1_bias" ? w.w1_bias : std::string(part) == "w3_bias" ? w.w3_bias : w.w2_bias) = b;
  }
  if (ck.has(name("shared_gate"))) {
    shape_is("shared_gate", {1, H});
    w.shared_gate = fill(M("shared_gate", 1, H), name("shared_gate"), 0, 1);
  }
  return w;
}

void check_same_model(const Hdf5Checkpoint& ck, const HfCheckpoint& hf) {
  const std::string where = "checkpoint " + ck.dir().string() + " vs " + hf.dir().string();
  KMOE_CHECK_INPUT(ck.architecture() == hf.config().architecture, where, ": spec mismatch: architecture ",
                   ck.architecture(), " vs ", hf.config().architecture);
  const SourcePlan mine = ck.source();
  const SourcePlan theirs = source_plan_of(hf);
  std::map<std::string, const SourceTensor*> by_name;
  for (const auto& t : theirs.tensors) by_name[t.name] = &t;
  for (const auto& t : mine.tensors) {
    auto it = by_name.find(t.name);
    KMOE_CHECK_INPUT(it != by_name.end(), where, ": spec mismatch: tensor ", t.name, " is not in ", hf.dir().string());
    KMOE_CHECK_INPUT(it->second->dtype == t.dtype && it->second->shape == t.shape, where,
                     ": spec mismatch: tensor ", t.name, " is ", t.dtype, shape_text(t.shape), " in the checkpoint, ",
                     it->second->dtype, shape_text(it->second->shape), " in ", hf.dir().string());
    by_name.erase(it);
  }
  KMOE_CHECK_INPUT(by_name.empty(), where, ": spec mismatch: ", hf.dir().string(), " has tensor ",
                   by_name.empty() ? "" : by_name.begin()->first, " that the checkpoint lacks");
}

namespace {

// The Hugging Face tensors of one MoE layer, re-assembled from kmoe's layout in each dtype the source used.
std::vector<NamedTensorBytes> layer_tensors(const Hdf5Checkpoint& ck, const ModelSpec& spec, int layer,
                                            const std::map<std::string, const SourceTensor*>& source) {
  const auto weights = load_moe_layer<double>(ck, layer, 0, ck.info(moe_tensor_name(layer, "router")).shape[0]);
  std::set<std::string> dtypes;
  // Which source tensors this layer produces: ask the spec with the layer's own shapes.
  ModelConfig cfg;
  cfg.num_experts = static_cast<std::int64_t>(weights.router.extent(0));
  cfg.hidden_size = static_cast<std::int64_t>(weights.router.extent(1));
  cfg.intermediate_size = static_cast<std::int64_t>(weights.w1.extent(1));
  cfg.shared_intermediate_size = static_cast<std::int64_t>(weights.shared_w1.extent(0));
  cfg.num_layers = layer + 1;
  for (const auto& e : moe_layer_tensors(spec, cfg, layer)) {
    auto it = source.find(e.name);
    KMOE_CHECK_INPUT(it != source.end(), "checkpoint ", ck.dir().string(), ": MoE layer ", layer, " makes tensor ",
                     e.name, ", which the source checkpoint did not have");
    dtypes.insert(it->second->dtype);
  }
  std::vector<NamedTensorBytes> out;
  for (const auto& d : dtypes) {
    for (auto& t : moe_layer_to_checkpoint(spec, layer, weights, dtype_from_name(d)))
      if (source.at(t.name)->dtype == d) out.push_back(std::move(t));
  }
  return out;
}

}  // namespace

namespace {

/// `p` made absolute with every symbolic link of its existing part resolved; InputError (a loop, a bad component).
fs::path resolved(const fs::path& p, const char* what) {
  std::error_code ec;
  const fs::path r = fs::weakly_canonical(fs::absolute(p, ec), ec);
  KMOE_CHECK_INPUT(!ec, what, " ", p.string(), ": cannot resolve the path: ", ec.message());
  return r;
}

/// True when `inner` is `outer` or lies inside it (both resolved).
bool within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i) {
    if (o->empty() && std::next(o) == outer.end()) break;  // a trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

// What a conversion writes into its output directory (and what may be replaced by the next one).
bool written_by_conversion(const fs::directory_entry& e) {
  const std::string n = e.path().filename().string();
  std::error_code ec;
  if (!e.is_regular_file(ec) || e.is_symlink(ec)) return false;
  for (const char* t : kTextFiles)
    if (n == t) return true;
  return n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0;
}

/// Refuses an output directory that would destroy something: the checkpoint or the original directory (being,
/// holding or lying inside either), an existing file that is not a directory, an existing directory unless
/// `replace_existing` and it holds only what a conversion writes.
void check_output_dir(const fs::path& out_in, const fs::path& out, const fs::path& ck_dir, const fs::path& original,
                      bool replace_existing) {
  const std::string o = out_in.string();
  KMOE_CHECK_INPUT(!out.filename().empty() && out != out.root_path(), "convert: output directory '", o,
                   "' names no directory that can be created");
  const auto clash = [&](const fs::path& dir, const char* what) {
    if (dir.empty()) return;
    KMOE_CHECK_INPUT(out != dir, "convert: output directory ", o, " is the ", what, " ", dir.string());
    KMOE_CHECK_INPUT(!within(out, dir), "convert: output directory ", o, " lies inside the ", what, " ",
                     dir.string());
    KMOE_CHECK_INPUT(!within(dir, out), "convert: output directory ", o, " contains the ", what, " ", dir.string(),
                     " (replacing it would destroy it)");
  };
  clash(ck_dir, "checkpoint directory");
  clash(original, "original Hugging Face directory");
  std::error_code ec;
  const auto link = fs::symlink_status(out_in, ec);
  if (ec || !fs::exists(link)) return;
  KMOE_CHECK_INPUT(!fs::is_symlink(link), "convert: output directory ", o,
                   " is a symbolic link: give the directory it points to");
  KMOE_CHECK_INPUT(fs::is_directory(link), "convert: output directory ", o, " exists and is not a directory");
  KMOE_CHECK_INPUT(replace_existing, "convert: output directory ", o,
                   " exists: remove it, or ask to replace a previous conversion (kmoe convert --force)");
  for (const auto& e : fs::directory_iterator(out, ec)) {
    KMOE_CHECK_INPUT(written_by_conversion(e), "convert: output directory ", o, " holds ",
                     e.path().filename().string(),
                     ", which a conversion does not write: not replacing it (remove it, or choose another directory)");
  }
  KMOE_CHECK_INPUT(!ec, "convert: output directory ", o, ": cannot list: ", ec.message());
}

/// The config.json a conversion writes must describe the tensors it writes: the architecture, every MoE layer's
/// expert count and sizes (the shapes the spec derives from the config are the recorded ones), the layer count.
void check_config_matches(const Hdf5Checkpoint& ck, const ModelSpec& spec, const std::string& text,
                          const fs::path& label) {
  const ModelConfig cfg = parse_model_config(text, label);
  const std::string where = label.string();
  KMOE_CHECK_INPUT(cfg.architecture == spec.architecture, where, ": architecture '",
                   kmoe::detail::printable(cfg.architecture), "' contradicts the checkpoint's ", spec.architecture);
  check_hidden_act(spec, cfg, where);
  std::map<std::string, const SourceTensor*> source;
  for (const auto& t : ck.source().tensors) source[t.name] = &t;
  for (const int layer : moe_layers(ck)) {
    KMOE_CHECK_INPUT(layer < cfg.num_layers, where, ": num_hidden_layers = ", cfg.num_layers,
                     " contradicts the checkpoint, which has MoE layer ", layer);
    for (const auto& e : moe_layer_tensors(spec, cfg, layer)) {
      const auto it = source.find(e.name);
      KMOE_CHECK_INPUT(it != source.end() && it->second->shape == e.shape, where, ": ", spec.num_experts_keys.front(), " = ",
                       cfg.num_experts, ", hidden_size = ", cfg.hidden_size, ", ", spec.intermediate_keys.front(), " = ",
                       cfg.intermediate_size, " imply tensor ", e.name, " ", shape_text(e.shape),
                       ", which contradicts the checkpoint (",
                       it == source.end() ? std::string("no such tensor") : "it is " + shape_text(it->second->shape),
                       ")");
    }
  }
}

}  // namespace

void convert_to_hf(const Hdf5Checkpoint& ck, const fs::path& out_in, const fs::path& original_dir,
                   bool replace_existing) {
  KMOE_CHECK_USAGE(!out_in.empty(), "convert: the output directory is an empty path");
  const fs::path out = resolved(out_in, "convert: output directory");
  const fs::path ck_dir = resolved(ck.dir(), "convert: checkpoint directory");
  const fs::path original = original_dir.empty() ? fs::path() : resolved(original_dir, "convert: original directory");
  check_output_dir(out_in, out, ck_dir, original, replace_existing);
  const SourcePlan& plan = ck.source();
  KMOE_CHECK_INPUT(!plan.tensors.empty() && !plan.files.empty(), "checkpoint ", ck.dir().string(),
                   ": records no source checkpoint (tensor names and shard plan), so it cannot be converted");
  const ModelSpec& spec = spec_for(ck.architecture());
  // Every name of the manifest that becomes a path is a plain file name, each written once.
  std::set<std::string> file_names;
  for (const auto& f : plan.files) {
    detail::check_plain_file_name(f.name, "checkpoint " + ck.dir().string(), "source shard file");
    KMOE_CHECK_INPUT(file_names.insert(f.name).second, "checkpoint ", ck.dir().string(), ": source shard file ",
                     f.name, " is listed twice");
  }
  std::map<std::string, std::string> text_files = plan.text_files;
  for (const auto& [name, bytes] : text_files) {
    const bool known = std::any_of(std::begin(kTextFiles), std::end(kTextFiles), [&](const char* t) { return name == t; });
    KMOE_CHECK_INPUT(known, "checkpoint ", ck.dir().string(), ": records a text file '", kmoe::detail::printable(name),
                     "', which is none of config.json, generation_config.json, model.safetensors.index.json");
    KMOE_CHECK_INPUT(!file_names.count(name), "checkpoint ", ck.dir().string(), ": ", name,
                     " is both a shard and a text file");
  }
  fs::path config_label = ck.dir() / "manifest.h5";
  if (!original_dir.empty()) {
    const HfCheckpoint original_ck = HfCheckpoint::open(original_dir);
    check_same_model(ck, original_ck);
    for (const char* name : kConfigFiles) {
      const fs::path p = original_dir / name;
      if (detail::path_exists(p)) text_files[name] = read_file(p);
    }
    config_label = original_dir / "config.json";
  } else {
    config_label /= "source/text_files/config.json";
  }
  if (const auto c = text_files.find("config.json"); c != text_files.end())
    check_config_matches(ck, spec, c->second, config_label);
  std::map<std::string, const SourceTensor*> source;
  std::int64_t total_bytes = 0;
  for (const auto& t : plan.tensors) {
    source[t.name] = &t;
    std::int64_t n = 1;
    for (auto d : t.shape) n *= d;
    total_bytes += static_cast<std::int64_t>(dtype_nbytes(dtype_from_name(t.dtype), n).value_or(0));
  }

  const fs::path tmp = detail::sibling_temp_dir(out);
  detail::prepare_temp_dir(tmp);
  ProgressBar bar("converting " + ck.dir().filename().string(), total_bytes, ProgressBar::Unit::Bytes);
  std::int64_t done = 0;
  // MoE layers are converted once and dropped when their last tensor has been written.
  std::map<int, std::vector<NamedTensorBytes>> layers;
  std::map<int, std::size_t> pending;  // tensors of a converted layer not yet written
  for (const auto& f : plan.files) {
    std::vector<NamedTensorBytes> tensors;
    std::vector<std::shared_ptr<std::vector<unsigned char>>> buffers;
    for (const auto& name : f.tensors) {
      auto src = source.find(name);
      KMOE_CHECK_INPUT(src != source.end(), "checkpoint ", ck.dir().string(), ": shard ", f.name, " names tensor ",
                       name, " that the plan lacks");
      int layer = -1;
      if (ck.has(name)) {
        const StoredTensorInfo& info = ck.info(name);
        KMOE_CHECK_INPUT(dtype_name(info.dtype) == src->second->dtype && info.shape == src->second->shape,
                         "checkpoint ", ck.dir().string(), ": tensor ", name, " is stored as ", dtype_name(info.dtype),
                         shape_text(info.shape), ", the source had ", src->second->dtype,
                         shape_text(src->second->shape));
        buffers.push_back(std::make_shared<std::vector<unsigned char>>(ck.read(name)));
        NamedTensorBytes t;
        t.name = name;
        t.dtype = info.dtype;
        t.shape = info.shape;
        t.data = buffers.back()->data();
        tensors.push_back(std::move(t));
      } else {
        KMOE_CHECK_INPUT(is_moe_tensor(spec, name, &layer), "checkpoint ", ck.dir().string(), ": tensor ", name,
                         " is missing (neither stored nor a MoE tensor of ", spec.architecture, ")");
        if (!layers.count(layer)) {
          layers[layer] = layer_tensors(ck, spec, layer, source);
          pending[layer] = layers[layer].size();
        }
        auto& list = layers[layer];
        auto it = std::find_if(list.begin(), list.end(), [&](const NamedTensorBytes& t) { return t.name == name; });
        KMOE_CHECK_INPUT(it != list.end(), "checkpoint ", ck.dir().string(), ": MoE layer ", layer,
                         " does not make tensor ", name);
        KMOE_CHECK_INPUT(it->shape == src->second->shape, "checkpoint ", ck.dir().string(), ": tensor ", name,
                         " comes out as ", shape_text(it->shape), ", the source had ", shape_text(src->second->shape));
        tensors.push_back(std::move(*it));
        list.erase(it);
        if (--pending[layer] == 0) {
          layers.erase(layer);
          pending.erase(layer);
        }
      }
    }
    std::optional<std::map<std::string, std::string>> metadata;
    if (f.has_metadata) metadata = f.metadata;
    write_safetensors(tmp / f.name, tensors, metadata);
    for (const auto& t : tensors) done += static_cast<std::int64_t>(t.expected_nbytes());
    bar.update(done);
  }
  for (const auto& [name, bytes] : text_files) write_file_atomic(tmp / name, bytes);
  bar.finish();
  detail::commit_directory(tmp, out, [](const std::string&) {});
}

template void add_moe_layer<float>(CheckpointContents&, int, const MoeLayerWeights<float>&, std::int64_t, bool,
                                   const std::string&);
template void add_moe_layer<double>(CheckpointContents&, int, const MoeLayerWeights<double>&, std::int64_t, bool,
                                    const std::string&);
template MoeLayerWeights<float> load_moe_layer<float>(const Hdf5Checkpoint&, int, std::int64_t, std::int64_t,
                                                      const std::string&);
template MoeLayerWeights<double> load_moe_layer<double>(const Hdf5Checkpoint&, int, std::int64_t, std::int64_t,
                                                        const std::string&);

}  // namespace kmoe::io
