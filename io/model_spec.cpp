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
      s.shared_intermediate_keys = {"shared_intermediate_size"};
      const std::string shared = "model.layers.{layer}.shared_mlp.";
      s.shared_w1 = {shared + "input_linear.weight", false, RowPart::FirstHalf};
      s.shared_w3 = {shared + "input_linear.weight", false, RowPart::SecondHalf};
      s.shared_w2 = {shared + "output_linear.weight"};
      v.push_back(s);
    }
    {
      ModelSpec s = v.back();  // Granite 4: GraniteMoeShared's MoE block in every layer, Mamba and attention alike
      s.architecture = "GraniteMoeHybridForCausalLM";
      s.model_type = "granitemoehybrid";
      s.summary = "Granite 4 (hybrid Mamba/attention stack): as GraniteMoeShared in every layer";
      v.push_back(s);
    }
    {
      ModelSpec s;  // Qwen3-MoE: per-expert gate/up/down_proj, router 'mlp.gate'; renormalise iff norm_topk_prob
      s.architecture = "Qwen3MoeForCausalLM";
      s.model_type = "qwen3_moe";
      s.summary = "per-expert gate_proj/up_proj/down_proj, router 'mlp.gate'; softmax, renormalise iff norm_topk_prob";
      s.num_experts_keys = {"num_experts", "num_local_experts"};
      s.intermediate_keys = {"moe_intermediate_size"};
      s.routing.renormalize = false;  // transformers' default norm_topk_prob
      s.renormalize_key = "norm_topk_prob";
      s.sparse_step_key = "decoder_sparse_step";
      s.mlp_only_key = "mlp_only_layers";
      const std::string moe = "model.layers.{layer}.mlp.";
      s.router = {moe + "gate.weight"};
      s.w1 = {moe + "experts.{expert}.gate_proj.weight", true};
      s.w3 = {moe + "experts.{expert}.up_proj.weight", true};
      s.w2 = {moe + "experts.{expert}.down_proj.weight", true};
      v.push_back(s);
    }
    {
      ModelSpec s = v.back();  // Qwen2-MoE: Qwen3-MoE plus a shared expert scaled by sigmoid(shared_expert_gate x)
      s.architecture = "Qwen2MoeForCausalLM";
      s.model_type = "qwen2_moe";
      s.summary = "as Qwen3-MoE, plus a shared expert mlp.shared_expert.* scaled by sigmoid(mlp.shared_expert_gate x)";
      s.shared_intermediate_keys = {"shared_expert_intermediate_size"};
      const std::string moe = "model.layers.{layer}.mlp.";
      s.shared_w1 = {moe + "shared_expert.gate_proj.weight"};
      s.shared_w3 = {moe + "shared_expert.up_proj.weight"};
      s.shared_w2 = {moe + "shared_expert.down_proj.weight"};
      s.shared_gate = {moe + "shared_expert_gate.weight"};
      v.push_back(s);
    }
    {
      ModelSpec s;  // OLMoE: the Qwen3-MoE layout with the expert width under "intermediate_size", every layer MoE
      s.architecture = "OlmoeForCausalLM";
      s.model_type = "olmoe";
      s.summary = "per-expert gate_proj/up_proj/down_proj, router 'mlp.gate'; softmax, renormalise iff norm_topk_prob";
      s.num_experts_keys = {"num_experts", "num_local_experts"};
      s.routing.renormalize = false;
      s.renormalize_key = "norm_topk_prob";
      const std::string moe = "model.layers.{layer}.mlp.";
      s.router = {moe + "gate.weight"};
      s.w1 = {moe + "experts.{expert}.gate_proj.weight", true};
      s.w3 = {moe + "experts.{expert}.up_proj.weight", true};
      s.w2 = {moe + "experts.{expert}.down_proj.weight", true};
      v.push_back(s);
    }
    {
      ModelSpec s;  // DeepSeek-V3: sigmoid scores, selection bias, group-limited top-k, scaling; first layers dense
      s.architecture = "DeepseekV3ForCausalLM";
      s.model_type = "deepseek_v3";
      s.summary = "per-expert gate_proj/up_proj/down_proj, router 'mlp.gate' with e_score_correction_bias (F32), "
                  "shared experts mlp.shared_experts.*; layers < first_k_dense_replace dense";
      s.num_experts_keys = {"n_routed_experts"};
      s.intermediate_keys = {"moe_intermediate_size"};
      s.shared_count_key = "n_shared_experts";
      s.routing.score = core::ScoreFunction::Sigmoid;
      s.routing.renorm_epsilon = 1e-20;
      s.routing.group_score_topk = 2;  // DeepseekV3TopkRouter: a group scores the sum of its top-2
      s.renormalize_key = "norm_topk_prob";
      s.n_group_key = "n_group";
      s.topk_group_key = "topk_group";
      s.scaling_key = "routed_scaling_factor";
      s.first_dense_key = "first_k_dense_replace";
      const std::string moe = "model.layers.{layer}.mlp.";
      s.router = {moe + "gate.weight"};
      s.score_bias = {moe + "gate.e_score_correction_bias", false, RowPart::All, false, DType::F32};
      s.w1 = {moe + "experts.{expert}.gate_proj.weight", true};
      s.w3 = {moe + "experts.{expert}.up_proj.weight", true};
      s.w2 = {moe + "experts.{expert}.down_proj.weight", true};
      s.shared_w1 = {moe + "shared_experts.gate_proj.weight"};
      s.shared_w3 = {moe + "shared_experts.up_proj.weight"};
      s.shared_w2 = {moe + "shared_experts.down_proj.weight"};
      v.push_back(s);
    }
    {
      ModelSpec s;  // GPT-OSS: router bias, softmax over the chosen k; biased, interleaved, transposed experts
      s.architecture = "GptOssForCausalLM";
      s.model_type = "gpt_oss";
      s.summary = "router 'mlp.router' with bias; experts gate_up_proj [E,H,2F] (transposed, gate/up interleaved) "
                  "and down_proj [E,F,H] (transposed), with biases";
      s.routing.softmax_over_topk = true;
      s.routing.renormalize = false;
      s.expert = ExpertVariant::ClampedSwiGLU;
      s.swiglu_limit_key = "swiglu_limit";
      const std::string moe = "model.layers.{layer}.mlp.";
      s.router = {moe + "router.weight"};
      s.router_bias = {moe + "router.bias"};
      s.w1 = {moe + "experts.gate_up_proj", false, RowPart::Even, true};
      s.w3 = {moe + "experts.gate_up_proj", false, RowPart::Odd, true};
      s.w2 = {moe + "experts.down_proj", false, RowPart::All, true};
      s.w1_bias = {moe + "experts.gate_up_proj_bias", false, RowPart::Even};
      s.w3_bias = {moe + "experts.gate_up_proj_bias", false, RowPart::Odd};
      s.w2_bias = {moe + "experts.down_proj_bias"};
      v.push_back(s);
    }
    return v;
  }();
  return specs;
}

std::string describe(ExpertVariant expert, double swiglu_limit) {
  if (expert == ExpertVariant::SwiGLU) return "swiglu";
  return detail::concat("clamped swiglu (gate <= ", swiglu_limit, ", |up| <= ", swiglu_limit,
                        ", (up + 1) * gate * sigmoid(1.702 gate)), biases");
}

const char* shared_variant_name(SharedVariant shared) {
  switch (shared) {
    case SharedVariant::None: return "none";
    case SharedVariant::Plain: return "plain";
    case SharedVariant::SigmoidGated: return "sigmoid-gated";
  }
  return "?";
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

/// The kmoe tensors of a layer, in this order (MoeLayerWeights' fields): router, router_bias, score_bias, w1, w3, w2,
/// w1_bias, w3_bias, w2_bias, shared_w1, shared_w3, shared_w2, shared_gate. Absent rules have no slot.
enum SlotId { kRouter, kRouterBias, kScoreBias, kW1, kW3, kW2, kW1Bias, kW3Bias, kW2Bias, kSharedW1, kSharedW3,
              kSharedW2, kSharedGate, kSlotCount };

struct Slot {
  SlotId id;
  const TensorRule* rule;
  std::vector<std::int64_t> kmoe_shape;  // kmoe's shape ([E,R,C] for expert stacks)
  int row_dim;                           // the dimension of kmoe_shape a RowPart selects from
  bool expert_dim;                       // kmoe_shape[0] is the expert (per-expert rules split along it)
};

const TensorRule* rule_of(const ModelSpec& spec, SlotId id) {
  const TensorRule* rules[] = {&spec.router,    &spec.router_bias, &spec.score_bias, &spec.w1,       &spec.w3,
                               &spec.w2,        &spec.w1_bias,     &spec.w3_bias,    &spec.w2_bias,  &spec.shared_w1,
                               &spec.shared_w3, &spec.shared_w2,   &spec.shared_gate};
  return rules[id];
}

std::vector<Slot> slots(const ModelSpec& spec, std::int64_t E, std::int64_t H, std::int64_t F, std::int64_t S) {
  const Slot all[] = {{kRouter, nullptr, {E, H}, 0, false},         {kRouterBias, nullptr, {E}, 0, false},
                      {kScoreBias, nullptr, {E}, 0, false},         {kW1, nullptr, {E, F, H}, 1, true},
                      {kW3, nullptr, {E, F, H}, 1, true},           {kW2, nullptr, {E, H, F}, 1, true},
                      {kW1Bias, nullptr, {E, F}, 1, true},          {kW3Bias, nullptr, {E, F}, 1, true},
                      {kW2Bias, nullptr, {E, H}, 1, true},          {kSharedW1, nullptr, {S, H}, 0, false},
                      {kSharedW3, nullptr, {S, H}, 0, false},       {kSharedW2, nullptr, {H, S}, 0, false},
                      {kSharedGate, nullptr, {1, H}, 0, false}};
  std::vector<Slot> v;
  for (Slot s : all) {
    s.rule = rule_of(spec, s.id);
    if (!s.rule->present()) continue;
    if (s.id >= kSharedW1 && !spec.has_shared_expert()) continue;
    v.push_back(s);
  }
  return v;
}

/// The checkpoint shape holding a slot: drop the expert dim for per-expert matrices, double the rows when fused,
/// swap the last two dimensions when transposed.
std::vector<std::int64_t> checkpoint_shape(const Slot& s) {
  std::vector<std::int64_t> shape = s.kmoe_shape;
  int row_dim = s.row_dim;
  if (s.rule->per_expert) {
    shape.erase(shape.begin());
    --row_dim;
  }
  if (s.rule->rows != RowPart::All) shape[static_cast<std::size_t>(row_dim)] *= 2;
  if (s.rule->transposed) std::swap(shape[shape.size() - 1], shape[shape.size() - 2]);
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
  // Router and its biases first, then experts interleaved by expert (w1, w3, w2 and their biases of expert 0, then
  // of expert 1...), then the shared expert.
  std::int64_t max_e = 1;
  for (const auto& s : ss)
    if (s.expert_dim) max_e = std::max(max_e, copies(s));
  for (const auto& s : ss)
    if (s.id < kW1) add(s, 0);
  for (std::int64_t j = 0; j < max_e; ++j)
    for (const auto& s : ss)
      if (s.expert_dim && j < copies(s)) add(s, j);
  for (const auto& s : ss)
    if (s.id >= kSharedW1) add(s, 0);
  return out;
}

/// Copies between a slot's kmoe block and its part of a checkpoint tensor. The kmoe block is [L, R, C] (L = the
/// dimensions before row_dim, R = row_dim, C = those after; one expert's block for a per-expert rule); the
/// checkpoint tensor is [L, R', C] with R' = R or 2R (fused), stored [L, C, R'] when transposed.
template <class U>
void copy_part(const Slot& s, U* ck, U* km, bool to_kmoe) {
  const auto& k = s.kmoe_shape;
  std::int64_t L = 1, C = 1;
  for (int i = 0; i < s.row_dim; ++i) L *= k[static_cast<std::size_t>(i)];
  for (std::size_t i = static_cast<std::size_t>(s.row_dim) + 1; i < k.size(); ++i) C *= k[i];
  const std::int64_t R = k[static_cast<std::size_t>(s.row_dim)];
  if (s.rule->per_expert) L = 1;  // one expert's matrix at a time
  const RowPart part = s.rule->rows;
  const std::int64_t ck_rows = part == RowPart::All ? R : 2 * R;
  auto row = [&](std::int64_t r) {
    switch (part) {
      case RowPart::All: case RowPart::FirstHalf: return r;
      case RowPart::SecondHalf: return R + r;
      case RowPart::Even: return 2 * r;
      case RowPart::Odd: return 2 * r + 1;
    }
    return r;
  };
  const bool transposed = s.rule->transposed;
  for (std::int64_t l = 0; l < L; ++l)
    for (std::int64_t r = 0; r < R; ++r) {
      U* m = km + (l * R + r) * C;
      U* c = ck + l * ck_rows * C;
      const std::int64_t rr = row(r);
      if (!transposed) {
        c += rr * C;
        if (to_kmoe)
          std::copy(c, c + C, m);
        else
          std::copy(m, m + C, c);
      } else {
        for (std::int64_t j = 0; j < C; ++j) {
          if (to_kmoe)
            m[j] = c[j * ck_rows + rr];
          else
            c[j * ck_rows + rr] = m[j];
        }
      }
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
  for (int id = 0; id < kSlotCount; ++id) {
    const TensorRule* r = rule_of(spec, static_cast<SlotId>(id));
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
  const auto& config_layers = ck.config().moe_layers;
  const bool by_config = ck.config().architecture == spec.architecture;
  std::vector<int> out;
  for (int l : candidates) {
    if (by_config && std::find(config_layers.begin(), config_layers.end(), l) == config_layers.end()) continue;
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

namespace {

/// The host View of each slot of `w`, as a pointer to its data (T, or the wide type of the selection bias).
template <class W>
struct SlotViews {
  W& w;
  template <class F>
  void visit(SlotId id, F&& f) const {
    switch (id) {
      case kRouter: f(w.router); break;
      case kRouterBias: f(w.router_bias); break;
      case kScoreBias: f(w.score_bias); break;
      case kW1: f(w.w1); break;
      case kW3: f(w.w3); break;
      case kW2: f(w.w2); break;
      case kW1Bias: f(w.w1_bias); break;
      case kW3Bias: f(w.w3_bias); break;
      case kW2Bias: f(w.w2_bias); break;
      case kSharedW1: f(w.shared_w1); break;
      case kSharedW3: f(w.shared_w3); break;
      case kSharedW2: f(w.shared_w2); break;
      case kSharedGate: f(w.shared_gate); break;
      case kSlotCount: break;
    }
  }
};

template <class V>
std::vector<std::int64_t> dims(const V& v) {
  std::vector<std::int64_t> d;
  for (unsigned r = 0; r < static_cast<unsigned>(V::rank); ++r) d.push_back(static_cast<std::int64_t>(v.extent(r)));
  return d;
}

const char* slot_name(SlotId id) {
  const char* names[] = {"router", "router_bias", "score_bias", "w1",        "w3",        "w2",         "w1_bias",
                         "w3_bias", "w2_bias",    "shared_w1",  "shared_w3", "shared_w2", "shared_gate"};
  return names[id];
}

}  // namespace

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
  const SlotViews<MoeLayerWeights<T>> views{w};
  for (const auto& slot : ss)
    views.visit(slot.id, [&](auto& v) {
      using V = std::decay_t<decltype(v)>;
      const auto& k = slot.kmoe_shape;
      auto alloc = Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(slot_name(slot.id)));
      if constexpr (V::rank == 1)
        v = V(alloc, k[0]);
      else if constexpr (V::rank == 2)
        v = V(alloc, k[0], k[1]);
      else
        v = V(alloc, k[0], k[1], k[2]);
    });
  for (const auto& g : gs) {
    const TensorView& t = ck.tensor(g.tensor.name);
    for (const auto& [slot, expert] : g.parts)
      views.visit(slot->id, [&, slot = slot, expert = expert](auto& v) {
        using U = typename std::decay_t<decltype(v)>::value_type;
        auto values = to_host_view<U>(t);
        const auto& k = slot->kmoe_shape;
        std::int64_t block = 0;
        if (slot->rule->per_expert) {
          block = 1;
          for (std::size_t i = 1; i < k.size(); ++i) block *= k[i];
        }
        copy_part(*slot, values.data(), v.data() + expert * block, /*to_kmoe=*/true);
      });
  }
  return w;
}

template <class T>
std::vector<NamedTensorBytes> moe_layer_to_checkpoint(const ModelSpec& spec, int layer, const MoeLayerWeights<T>& w,
                                                      DType dtype) {
  const std::int64_t E = static_cast<std::int64_t>(w.router.extent(0)), H = static_cast<std::int64_t>(w.router.extent(1)),
                     F = static_cast<std::int64_t>(w.w1.extent(1)), S = static_cast<std::int64_t>(w.shared_w1.extent(0));
  const std::string where = detail::concat("moe_layer_to_checkpoint(", spec.architecture, ", layer ", layer, ")");
  KMOE_CHECK_INPUT(dims(w.w1) == (std::vector<std::int64_t>{E, F, H}) && dims(w.w3) == dims(w.w1) &&
                       dims(w.w2) == (std::vector<std::int64_t>{E, H, F}),
                   where, ": inconsistent shapes router ", shape_text(dims(w.router)), ", w1 ", shape_text(dims(w.w1)),
                   ", w3 ", shape_text(dims(w.w3)), ", w2 ", shape_text(dims(w.w2)));
  KMOE_CHECK_INPUT(spec.has_shared_expert() == (S > 0), where, ": ",
                   spec.has_shared_expert() ? "the architecture needs a shared expert" : "the architecture has no shared expert");
  const auto ss = slots(spec, E, H, F, S);
  MoeLayerWeights<T>& wm = const_cast<MoeLayerWeights<T>&>(w);  // read only: copy_part copies out of it
  const SlotViews<MoeLayerWeights<T>> views{wm};
  for (const auto& slot : ss)
    views.visit(slot.id, [&](auto& v) {
      KMOE_CHECK_INPUT(dims(v) == slot.kmoe_shape, where, ": ", slot_name(slot.id), " has shape ",
                       shape_text(dims(v)), ", expected ", shape_text(slot.kmoe_shape),
                       v.size() == 0 ? " (missing: the architecture has it)" : " (inconsistent shapes)");
    });
  std::vector<NamedTensorBytes> out;
  for (const auto& g : groups(ss, layer)) {
    std::int64_t n = 1;
    for (auto d : g.tensor.shape) n *= d;
    const TensorRule& rule = *g.parts.front().first->rule;
    views.visit(g.parts.front().first->id, [&](auto& first) {
      using U = typename std::decay_t<decltype(first)>::value_type;
      std::vector<U> buf(static_cast<std::size_t>(n));
      for (const auto& [slot, expert] : g.parts)
        views.visit(slot->id, [&, slot = slot, expert = expert](auto& v) {
          using V = typename std::decay_t<decltype(v)>::value_type;
          if constexpr (std::is_same<U, V>::value) {
            const auto& k = slot->kmoe_shape;
            std::int64_t block = 0;
            if (slot->rule->per_expert) {
              block = 1;
              for (std::size_t i = 1; i < k.size(); ++i) block *= k[i];
            }
            copy_part(*slot, buf.data(), v.data() + expert * block, /*to_kmoe=*/false);
          }
        });
      out.push_back(tensor_from_array(g.tensor.name, buf.data(), g.tensor.shape, rule.keep_dtype.value_or(dtype)));
    });
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
