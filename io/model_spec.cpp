// The model-spec table and the two directions of the map between checkpoint tensors and kmoe's MoE layout.
#include <kmoe/io/model_spec.hpp>

#include <algorithm>
#include <cstring>

namespace kmoe::io {

// ---- the table: adding an architecture is one entry here (docs/adding-a-model.md) -----------------------------

const std::vector<ModelSpec>& model_specs() {
  static const std::vector<ModelSpec> specs = [] {
    std::vector<ModelSpec> v;
    {
      ModelSpec s;
      s.architecture = "MixtralForCausalLM";
      s.model_type = "mixtral";
      s.summary = "per-expert w1/w3/w2 matrices, router 'gate'";
      const std::string moe = "model.layers.{layer}.block_sparse_moe.";
      s.router = {moe + "gate.weight"};
      s.w1 = {moe + "experts.{expert}.w1.weight", true};
      s.w3 = {moe + "experts.{expert}.w3.weight", true};
      s.w2 = {moe + "experts.{expert}.w2.weight", true};
      v.push_back(s);
    }
    {
      ModelSpec s;
      s.architecture = "GraniteMoeForCausalLM";
      s.model_type = "granitemoe";
      s.summary = "fused input_linear [E,2F,H] (W1 rows then W3 rows), output_linear = W2, router 'router.layer'";
      const std::string moe = "model.layers.{layer}.block_sparse_moe.";
      s.router = {moe + "router.layer.weight"};
      s.w1 = {moe + "input_linear.weight", false, RowPart::FirstHalf};
      s.w3 = {moe + "input_linear.weight", false, RowPart::SecondHalf};
      s.w2 = {moe + "output_linear.weight"};
      v.push_back(s);
    }
    {
      ModelSpec s = v.back();  // Granite plus a shared expert
      s.architecture = "GraniteMoeSharedForCausalLM";
      s.model_type = "granitemoeshared";
      s.summary = "as GraniteMoe, plus a shared expert shared_mlp.input_linear [2S,H] / output_linear [H,S]";
      s.shared_intermediate_key = "shared_intermediate_size";
      const std::string shared = "model.layers.{layer}.shared_mlp.";
      s.shared_w1 = {shared + "input_linear.weight", false, RowPart::FirstHalf};
      s.shared_w3 = {shared + "input_linear.weight", false, RowPart::SecondHalf};
      s.shared_w2 = {shared + "output_linear.weight"};
      v.push_back(s);
    }
    return v;
  }();
  return specs;
}

const ModelSpec* find_spec(const std::string& architecture) {
  for (const auto& s : model_specs())
    if (s.architecture == architecture) return &s;
  return nullptr;
}

const ModelSpec& spec_for(const std::string& architecture) {
  if (const ModelSpec* s = find_spec(architecture)) return *s;
  std::string known;
  for (const auto& s : model_specs()) known += (known.empty() ? "" : ", ") + s.architecture;
  throw InputError(detail::concat("unknown architecture '", architecture, "' (kmoe knows: ", known,
                                  "; docs/adding-a-model.md says how to add one)"));
}

void check_hidden_act(const ModelSpec& spec, const ModelConfig& config, const std::string& where) {
  if (std::find(spec.hidden_acts.begin(), spec.hidden_acts.end(), config.hidden_act) != spec.hidden_acts.end()) return;
  std::string known;
  for (const auto& a : spec.hidden_acts) known += (known.empty() ? "" : ", ") + a;
  throw InputError(detail::concat(where, ": hidden_act '", kmoe::detail::printable(config.hidden_act),
                                  "' is not supported for ", spec.architecture, " (kmoe computes: ", known, ")"));
}

// ---- shared machinery ---------------------------------------------------------------------------------------

namespace {

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (std::size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  return s;
}

std::string tensor_name(const TensorRule& r, int layer, std::int64_t expert) {
  std::string s = replace_all(r.pattern, "{layer}", std::to_string(layer));
  return r.per_expert ? replace_all(s, "{expert}", std::to_string(expert)) : s;
}

std::string shape_text(const std::vector<std::int64_t>& s) { return kmoe::detail::dims_text(s); }

/// The kmoe tensors of a layer: which rule, which kmoe shape. Order: router, w1, w3, w2, shared w1, w3, w2.
struct Slot {
  const TensorRule* rule;
  std::vector<std::int64_t> kmoe_shape;  // [E,R,C] for expert stacks, [R,C] otherwise
  bool stacked;                          // kmoe tensor has the leading expert dimension
};

std::vector<Slot> slots(const ModelSpec& spec, std::int64_t E, std::int64_t H, std::int64_t F, std::int64_t S) {
  std::vector<Slot> v = {{&spec.router, {E, H}, false},
                         {&spec.w1, {E, F, H}, true},
                         {&spec.w3, {E, F, H}, true},
                         {&spec.w2, {E, H, F}, true}};
  if (spec.has_shared_expert()) {
    v.push_back({&spec.shared_w1, {S, H}, false});
    v.push_back({&spec.shared_w3, {S, H}, false});
    v.push_back({&spec.shared_w2, {H, S}, false});
  }
  return v;
}

/// The checkpoint shape holding a slot: drop the expert dim for per-expert matrices, double the rows when fused.
std::vector<std::int64_t> checkpoint_shape(const Slot& s) {
  std::vector<std::int64_t> shape = s.kmoe_shape;
  if (s.rule->per_expert) shape.erase(shape.begin());
  if (s.rule->rows != RowPart::All) shape[shape.size() - 2] *= 2;
  return shape;
}

/// Experts a slot's pattern expands to (1 unless per-expert).
std::int64_t copies(const Slot& s) { return s.rule->per_expert ? s.kmoe_shape[0] : 1; }

/// The checkpoint tensors of a layer, each once, with the slots that live in it.
struct Group {
  ExpectedTensor tensor;
  std::vector<std::pair<const Slot*, std::int64_t>> parts;  // slot, expert (per-expert) or 0
};

std::vector<Group> groups(const std::vector<Slot>& ss, int layer) {
  std::vector<Group> out;
  auto add = [&](const Slot& s, std::int64_t j) {
    const std::string name = tensor_name(*s.rule, layer, j);
    for (auto& g : out)
      if (g.tensor.name == name) {
        g.parts.push_back({&s, j});
        return;
      }
    out.push_back({{name, checkpoint_shape(s)}, {{&s, j}}});
  };
  // Router first, then experts interleaved by expert (w1, w3, w2 of expert 0, then of expert 1...), then shared.
  add(ss[0], 0);
  std::int64_t max_e = 1;
  for (std::size_t i = 1; i < 4; ++i) max_e = std::max(max_e, copies(ss[i]));
  for (std::int64_t j = 0; j < max_e; ++j)
    for (std::size_t i = 1; i < 4; ++i)
      if (j < copies(ss[i])) add(ss[i], j);
  for (std::size_t i = 4; i < ss.size(); ++i) add(ss[i], 0);
  return out;
}

/// Copies between a slot's kmoe block and its part of a checkpoint matrix. The checkpoint matrix has shape
/// [L, 2R or R, C] viewed flat (L = experts for a fused stack, else 1); the kmoe block is [L, R, C].
template <class T>
void copy_part(const Slot& s, RowPart part, T* ck, T* km, bool to_kmoe) {
  const auto& k = s.kmoe_shape;
  const std::int64_t C = k.back(), R = k[k.size() - 2];
  std::int64_t L = 1;
  for (std::size_t i = 0; i + 2 < k.size(); ++i) L *= k[i];
  if (s.rule->per_expert) L = 1;  // one expert's matrix at a time
  const std::int64_t ck_rows = part == RowPart::All ? R : 2 * R, r0 = part == RowPart::SecondHalf ? R : 0;
  for (std::int64_t l = 0; l < L; ++l) {
    T* c = ck + (l * ck_rows + r0) * C;
    T* m = km + l * R * C;
    if (to_kmoe)
      std::copy(c, c + R * C, m);
    else
      std::copy(m, m + R * C, c);
  }
}

std::string expected_list(const std::vector<Group>& gs, const ModelSpec& spec, int layer, std::int64_t E) {
  // Per-expert names are folded into one "{0..E-1}" entry per pattern so the line stays readable.
  std::string out;
  std::vector<std::string> seen;
  for (const auto& g : gs) {
    const TensorRule* r = g.parts.front().first->rule;
    std::string name = g.tensor.name;
    if (r->per_expert) {
      name = replace_all(replace_all(r->pattern, "{layer}", std::to_string(layer)), "{expert}",
                         "{0.." + std::to_string(E - 1) + "}");
      if (std::find(seen.begin(), seen.end(), name) != seen.end()) continue;
      seen.push_back(name);
    }
    out += (out.empty() ? "" : ", ") + name + " " + shape_text(g.tensor.shape);
  }
  (void)spec;
  return out;
}

}  // namespace

std::vector<ExpectedTensor> moe_layer_tensors(const ModelSpec& spec, const ModelConfig& c, int layer) {
  const auto ss = slots(spec, c.num_experts, c.hidden_size, c.intermediate_size, c.shared_intermediate_size);
  std::vector<ExpectedTensor> out;
  for (const auto& g : groups(ss, layer)) out.push_back(g.tensor);
  return out;
}

namespace {

/// Matches `name` against a pattern whose {layer} and {expert} stand for decimal numbers; *layer gets {layer}.
bool match_pattern(const std::string& pattern, const std::string& name, int* layer) {
  std::size_t p = 0, n = 0;
  while (p < pattern.size()) {
    if (pattern[p] == '{') {
      const std::size_t close = pattern.find('}', p);
      const std::string field = pattern.substr(p + 1, close - p - 1);
      const std::size_t start = n;
      while (n < name.size() && n - start < 9 && name[n] >= '0' && name[n] <= '9') ++n;
      if (n == start) return false;
      if (field == "layer" && layer) *layer = std::stoi(name.substr(start, n - start));
      p = close + 1;
    } else {
      if (n >= name.size() || name[n] != pattern[p]) return false;
      ++p;
      ++n;
    }
  }
  return n == name.size();
}

}  // namespace

bool is_moe_tensor(const ModelSpec& spec, const std::string& name, int* layer) {
  for (const TensorRule* r : {&spec.router, &spec.w1, &spec.w3, &spec.w2, &spec.shared_w1, &spec.shared_w3,
                              &spec.shared_w2}) {
    int l = -1;
    if (r->present() && match_pattern(r->pattern, name, &l)) {
      if (layer) *layer = l;
      return true;
    }
  }
  return false;
}

std::vector<int> find_moe_layers(const HfCheckpoint& ck, const ModelSpec& spec) {
  std::vector<int> candidates;
  for (const auto& name : ck.tensor_names()) {
    int l = -1;
    if (is_moe_tensor(spec, name, &l) && std::find(candidates.begin(), candidates.end(), l) == candidates.end())
      candidates.push_back(l);
  }
  std::sort(candidates.begin(), candidates.end());
  std::vector<int> out;
  for (int l : candidates) {
    const auto expected = moe_layer_tensors(spec, ck.config(), l);
    if (std::all_of(expected.begin(), expected.end(), [&](const ExpectedTensor& e) { return ck.has(e.name); }))
      out.push_back(l);
  }
  return out;
}

template <class T>
MoeLayerWeights<T> load_moe_layer(const HfCheckpoint& ck, int layer) {
  return load_moe_layer<T>(ck, spec_for(ck.config().architecture), ck.config(), layer);
}

template <class T>
MoeLayerWeights<T> load_moe_layer(const HfCheckpoint& ck, const ModelSpec& spec, const ModelConfig& c, int layer) {
  const std::string where = detail::concat(ck.dir().string(), ": layer ", layer, " of ", spec.architecture);
  KMOE_CHECK_INPUT(layer >= 0 && layer < c.num_layers, where, ": layer out of range (num_hidden_layers = ",
                   c.num_layers, ")");
  const std::int64_t E = c.num_experts, H = c.hidden_size, F = c.intermediate_size, S = c.shared_intermediate_size;
  const auto ss = slots(spec, E, H, F, S);
  const auto gs = groups(ss, layer);
  check_hidden_act(spec, c, ck.dir().string() + "/config.json");
  // Every tensor present and of the shape the config implies before anything is allocated: the config's sizes are
  // only trusted once the file's tensors agree with them.
  for (const auto& g : gs) {
    KMOE_CHECK_INPUT(ck.has(g.tensor.name), where, ": missing tensor '", g.tensor.name,
                     "' (expected: ", expected_list(gs, spec, layer, E), ")");
    const TensorView& t = ck.tensor(g.tensor.name);
    KMOE_CHECK_INPUT(t.shape == g.tensor.shape, where, ": tensor '", g.tensor.name, "' has shape ", t.shape_string(),
                     ", expected ", shape_text(g.tensor.shape), " (expected: ", expected_list(gs, spec, layer, E),
                     ")");
  }
  MoeLayerWeights<T> w;
  using M = typename MoeLayerWeights<T>::Matrix;
  using St = typename MoeLayerWeights<T>::Stack;
  auto alloc = Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe_layer"));
  w.router = M(alloc, E, H);
  w.w1 = St(alloc, E, F, H);
  w.w3 = St(alloc, E, F, H);
  w.w2 = St(alloc, E, H, F);
  if (spec.has_shared_expert()) {
    w.shared_w1 = M(alloc, S, H);
    w.shared_w3 = M(alloc, S, H);
    w.shared_w2 = M(alloc, H, S);
  }
  T* dest[] = {w.router.data(), w.w1.data(), w.w3.data(), w.w2.data(),
               w.shared_w1.data(), w.shared_w3.data(), w.shared_w2.data()};
  for (const auto& g : gs) {
    const TensorView& t = ck.tensor(g.tensor.name);
    auto values = to_host_view<T>(t);
    for (const auto& [slot, expert] : g.parts) {
      const std::size_t idx = static_cast<std::size_t>(slot - ss.data());
      const auto& k = slot->kmoe_shape;
      const std::int64_t block = slot->rule->per_expert ? k[1] * k[2] : 0;
      copy_part(*slot, slot->rule->rows, values.data(), dest[idx] + expert * block, /*to_kmoe=*/true);
    }
  }
  return w;
}

template <class T>
std::vector<NamedTensorBytes> moe_layer_to_checkpoint(const ModelSpec& spec, int layer, const MoeLayerWeights<T>& w,
                                                      DType dtype) {
  const std::int64_t E = static_cast<std::int64_t>(w.router.extent(0)), H = static_cast<std::int64_t>(w.router.extent(1)),
                     F = static_cast<std::int64_t>(w.w1.extent(1)), S = static_cast<std::int64_t>(w.shared_w1.extent(0));
  auto dims = [](const auto& v) {
    std::vector<std::int64_t> d;
    for (unsigned r = 0; r < static_cast<unsigned>(std::decay_t<decltype(v)>::rank); ++r)
      d.push_back(static_cast<std::int64_t>(v.extent(r)));
    return d;
  };
  const std::string where = detail::concat("moe_layer_to_checkpoint(", spec.architecture, ", layer ", layer, ")");
  KMOE_CHECK_INPUT(dims(w.w1) == (std::vector<std::int64_t>{E, F, H}) && dims(w.w3) == dims(w.w1) &&
                       dims(w.w2) == (std::vector<std::int64_t>{E, H, F}),
                   where, ": inconsistent shapes router ", shape_text(dims(w.router)), ", w1 ", shape_text(dims(w.w1)),
                   ", w3 ", shape_text(dims(w.w3)), ", w2 ", shape_text(dims(w.w2)));
  KMOE_CHECK_INPUT(spec.has_shared_expert() == (S > 0), where, ": ",
                   spec.has_shared_expert() ? "the architecture needs a shared expert" : "the architecture has no shared expert");
  if (S > 0)
    KMOE_CHECK_INPUT(dims(w.shared_w3) == (std::vector<std::int64_t>{S, H}) &&
                         dims(w.shared_w2) == (std::vector<std::int64_t>{H, S}),
                     where, ": inconsistent shared-expert shapes w1 ", shape_text(dims(w.shared_w1)), ", w3 ",
                     shape_text(dims(w.shared_w3)), ", w2 ", shape_text(dims(w.shared_w2)));
  const auto ss = slots(spec, E, H, F, S);
  const T* src[] = {w.router.data(), w.w1.data(), w.w3.data(), w.w2.data(),
                    w.shared_w1.data(), w.shared_w3.data(), w.shared_w2.data()};
  std::vector<NamedTensorBytes> out;
  for (const auto& g : groups(ss, layer)) {
    std::int64_t n = 1;
    for (auto d : g.tensor.shape) n *= d;
    std::vector<T> buf(static_cast<std::size_t>(n));
    for (const auto& [slot, expert] : g.parts) {
      const std::size_t idx = static_cast<std::size_t>(slot - ss.data());
      const auto& k = slot->kmoe_shape;
      const std::int64_t block = slot->rule->per_expert ? k[1] * k[2] : 0;
      copy_part(*slot, slot->rule->rows, buf.data(), const_cast<T*>(src[idx]) + expert * block, /*to_kmoe=*/false);
    }
    out.push_back(tensor_from_array(g.tensor.name, buf.data(), g.tensor.shape, dtype));
  }
  return out;
}

#define KMOE_IO_SPEC(T)                                                                                          \
  template MoeLayerWeights<T> load_moe_layer<T>(const HfCheckpoint&, int);                                      \
  template MoeLayerWeights<T> load_moe_layer<T>(const HfCheckpoint&, const ModelSpec&, const ModelConfig&, int); \
  template std::vector<NamedTensorBytes> moe_layer_to_checkpoint<T>(const ModelSpec&, int,                      \
                                                                    const MoeLayerWeights<T>&, DType);
KMOE_IO_SPEC(float)
KMOE_IO_SPEC(double)
KMOE_IO_SPEC(kmoe::bf16)
#undef KMOE_IO_SPEC

}  // namespace kmoe::io
