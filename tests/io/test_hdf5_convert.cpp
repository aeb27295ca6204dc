// Hugging Face checkpoint -> kmoe HDF5 checkpoint -> Hugging Face directory, on every testdata set: byte-identical
// files with unchanged weights, trained (changed) MoE weights land in the right tensors, MoE layers re-slice to any
// expert range, and a checkpoint converted against the wrong original is a spec mismatch.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <kmoe/core/error.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>
#include <sstream>

#include "kmoe_test.hpp"

namespace {

namespace fs = std::filesystem;
using kmoe::io::HfCheckpoint;
using kmoe::io::Hdf5Checkpoint;

std::vector<fs::path> hf_dirs() {
  std::vector<fs::path> dirs;
  for (const char* set : {"mixtral-tiny", "granitemoe-tiny", "granitemoeshared-tiny", "qwen2_moe-tiny", "qwen3_moe-tiny",
                          "olmoe-tiny", "deepseek_v3-tiny", "gpt_oss-tiny", "granitemoehybrid-tiny"})
    dirs.push_back(kmoe::test::testdata_dir() / set / "hf_save_pretrained");
  dirs.push_back(kmoe::test::repo_data_dir() / "granitemoe-tiny");
  return dirs;
}



// One process saves the whole model state of `hf` at step 0 (every expert, every tensor), weights as float;
// `perturb` may change the MoE weights before saving.
void save_model(const HfCheckpoint& hf, const fs::path& dir,
                const std::function<void(int, kmoe::io::MoeLayerWeights<float>&)>& perturb = {}) {
  const auto& spec = kmoe::io::spec_for(hf.config().architecture);
  kmoe::io::CheckpointContents c;
  c.step = 0;
  c.architecture = spec.architecture;
  c.expert_ranges = {{0, hf.config().num_experts}};
  c.source = kmoe::io::source_plan_of(hf);
  for (int layer : kmoe::io::find_moe_layers(hf, spec)) {
    auto w = kmoe::io::load_moe_layer<float>(hf, layer);
    if (perturb) perturb(layer, w);
    kmoe::io::add_moe_layer(c, layer, w, 0, true);
  }
  kmoe::io::add_non_moe_tensors(c, hf, spec);
  kmoe::io::save_hdf5_checkpoint(dir, c);
}

TEST(Hdf5Convert, UnchangedWeightsReproduceEveryFileByteForByte) {
  for (const auto& src : hf_dirs()) {
    SCOPED_TRACE(src.string());
    kmoe::test::ScratchDir tmp("hdf5-convert");
    const auto hf = HfCheckpoint::open(src);
    save_model(hf, tmp.path() / "checkpoint-0");
    const auto ck = Hdf5Checkpoint::open(tmp.path() / "checkpoint-0");
    kmoe::io::check_same_model(ck, hf);
    EXPECT_EQ(kmoe::io::moe_layers(ck), kmoe::io::find_moe_layers(hf, kmoe::io::spec_for(ck.architecture())));
    kmoe::io::convert_to_hf(ck, tmp.path() / "hf", src);
    kmoe::test::expect_same_files(src, tmp.path() / "hf");
    // Without the original directory: the config files recorded in the checkpoint.
    kmoe::io::convert_to_hf(ck, tmp.path() / "hf2");
    kmoe::test::expect_same_files(src, tmp.path() / "hf2");
    // Converting again over the output of a previous conversion replaces it atomically, when asked to.
    kmoe::io::convert_to_hf(ck, tmp.path() / "hf", src, /*replace_existing=*/true);
    kmoe::test::expect_same_files(src, tmp.path() / "hf");
  }
}

// Re-slicing: the experts of any range equal the Hugging Face checkpoint's.
TEST(Hdf5Convert, MoeLayersLoadIntoAnyExpertRange) {
  for (const auto& src : hf_dirs()) {
    SCOPED_TRACE(src.string());
    kmoe::test::ScratchDir tmp("hdf5-reslice");
    const auto hf = HfCheckpoint::open(src);
    save_model(hf, tmp.path() / "checkpoint-0");
    const auto ck = Hdf5Checkpoint::open(tmp.path() / "checkpoint-0");
    for (int layer : kmoe::io::moe_layers(ck)) {
      const auto full = kmoe::io::load_moe_layer<double>(hf, layer);
      const std::int64_t E = static_cast<std::int64_t>(full.router.extent(0));
      for (int ranks : {1, 2, 3, 4}) {
        for (const auto& [b, e] : kmoe::io::contiguous_expert_ranges(E, ranks)) {
          const auto part = kmoe::io::load_moe_layer<double>(ck, layer, b, e);
          ASSERT_EQ(part.w1.extent(0), std::size_t(e - b));
          for (std::int64_t x = b; x < e; ++x)
            for (std::size_t i = 0; i < part.w1.extent(1); ++i)
              for (std::size_t j = 0; j < part.w1.extent(2); ++j) {
                ASSERT_EQ(part.w1(x - b, i, j), full.w1(x, i, j));
                ASSERT_EQ(part.w3(x - b, i, j), full.w3(x, i, j));
                ASSERT_EQ(part.w2(x - b, j, i), full.w2(x, j, i));
              }
          for (std::size_t i = 0; i < part.router.size(); ++i) ASSERT_EQ(part.router.data()[i], full.router.data()[i]);
          ASSERT_EQ(part.shared_w1.size(), full.shared_w1.size());
          for (std::size_t i = 0; i < part.shared_w2.size(); ++i)
            ASSERT_EQ(part.shared_w2.data()[i], full.shared_w2.data()[i]);
          // The tensors only some families have: replicated ones whole, expert biases re-sliced.
          auto same = [](const auto& a, const auto& b, const char* what) {
            ASSERT_EQ(a.size(), b.size()) << what;
            for (std::size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a.data()[i], b.data()[i]) << what;
          };
          same(part.router_bias, full.router_bias, "router_bias");
          same(part.score_bias, full.score_bias, "score_bias");
          same(part.shared_gate, full.shared_gate, "shared_gate");
          for (const auto& [p, f] : {std::pair{part.w1_bias, full.w1_bias}, std::pair{part.w3_bias, full.w3_bias},
                                     std::pair{part.w2_bias, full.w2_bias}}) {
            ASSERT_EQ(p.extent(0), f.extent(0) ? std::size_t(e - b) : 0u);
            for (std::int64_t x = b; x < e && f.extent(0); ++x)
              for (std::size_t i = 0; i < f.extent(1); ++i) ASSERT_EQ(p(x - b, i), f(x, i));
          }
        }
      }
      EXPECT_THROW(kmoe::io::load_moe_layer<double>(ck, layer, 0, E + 1), kmoe::InputError);
    }
    EXPECT_THROW(kmoe::io::load_moe_layer<double>(ck, 99, 0, 1), kmoe::InputError);
  }
}

// Changed MoE weights go to the MoE tensors (and only there), rounded to the source dtype.
TEST(Hdf5Convert, ChangedMoeWeightsLandInTheirTensors) {
  const fs::path src = kmoe::test::testdata_dir() / "granitemoeshared-tiny" / "hf_save_pretrained";
  kmoe::test::ScratchDir tmp("hdf5-convert-changed");
  const auto hf = HfCheckpoint::open(src);
  save_model(hf, tmp.path() / "checkpoint-0", [](int layer, kmoe::io::MoeLayerWeights<float>& w) {
    if (layer != 0) return;
    w.w3(1, 2, 3) = 0.5f;        // expert 1: row F+2 of input_linear
    w.shared_w2(4, 5) = -0.25f;  // shared_mlp.output_linear (4, 5)
  });
  const auto ck = Hdf5Checkpoint::open(tmp.path() / "checkpoint-0");
  kmoe::io::convert_to_hf(ck, tmp.path() / "hf", src);
  const auto out = HfCheckpoint::open(tmp.path() / "hf");
  for (const auto& name : hf.tensor_names()) {
    const auto& a = hf.tensor(name);
    const auto& b = out.tensor(name);
    ASSERT_EQ(a.nbytes, b.nbytes) << name;
    const bool same = std::memcmp(a.data, b.data, a.nbytes) == 0;
    const bool changed = name == "model.layers.0.block_sparse_moe.input_linear.weight" ||
                         name == "model.layers.0.shared_mlp.output_linear.weight";
    EXPECT_EQ(same, !changed) << name;
  }
  const auto w = kmoe::io::load_moe_layer<float>(out, 0);
  EXPECT_EQ(w.w3(1, 2, 3), 0.5f);
  EXPECT_EQ(w.shared_w2(4, 5), -0.25f);
  EXPECT_EQ(kmoe::io::load_moe_layer<float>(out, 1).w3(1, 2, 3), kmoe::io::load_moe_layer<float>(hf, 1).w3(1, 2, 3));
}

// GPT-OSS: a changed gate entry and gate bias land at their interleaved (and, for the weights, transposed) positions.
TEST(Hdf5Convert, ChangedGptOssWeightsAndBiasesLandInTheirTensors) {
  const fs::path src = kmoe::test::testdata_dir() / "gpt_oss-tiny" / "hf_save_pretrained";
  kmoe::test::ScratchDir tmp("hdf5-convert-gptoss");
  const auto hf = HfCheckpoint::open(src);
  save_model(hf, tmp.path() / "checkpoint-0", [](int layer, kmoe::io::MoeLayerWeights<float>& w) {
    if (layer != 1) return;
    w.w3(2, 5, 7) = 0.75f;      // gate_up_proj[2, 7, 2 * 5 + 1]
    w.w1_bias(3, 4) = -1.5f;    // gate_up_proj_bias[3, 8]
    w.router_bias(6) = 0.125f;  // router.bias[6]
  });
  kmoe::io::convert_to_hf(Hdf5Checkpoint::open(tmp.path() / "checkpoint-0"), tmp.path() / "hf", src);
  const auto out = HfCheckpoint::open(tmp.path() / "hf");
  const std::string p = "model.layers.1.mlp.";
  for (const auto& name : hf.tensor_names()) {
    const auto& a = hf.tensor(name);
    const auto& b = out.tensor(name);
    ASSERT_EQ(a.nbytes, b.nbytes) << name;
    const bool changed =
        name == p + "experts.gate_up_proj" || name == p + "experts.gate_up_proj_bias" || name == p + "router.bias";
    EXPECT_EQ(std::memcmp(a.data, b.data, a.nbytes) == 0, !changed) << name;
  }
  EXPECT_EQ(kmoe::io::to_host_view_3d<float>(out.tensor(p + "experts.gate_up_proj"))(2, 7, 11), 0.75f);
  EXPECT_EQ(kmoe::io::to_host_view_2d<float>(out.tensor(p + "experts.gate_up_proj_bias"))(3, 8), -1.5f);
  EXPECT_EQ(kmoe::io::to_host_view<float>(out.tensor(p + "router.bias"))(6), 0.125f);
}

TEST(Hdf5Convert, WrongOriginalIsASpecMismatch) {
  const fs::path mixtral = kmoe::test::testdata_dir() / "mixtral-tiny" / "hf_save_pretrained";
  const fs::path granite = kmoe::test::testdata_dir() / "granitemoe-tiny" / "hf_save_pretrained";
  const fs::path shared = kmoe::test::testdata_dir() / "granitemoeshared-tiny" / "hf_save_pretrained";
  kmoe::test::ScratchDir tmp("hdf5-mismatch");
  save_model(HfCheckpoint::open(granite), tmp.path() / "checkpoint-0");
  const auto ck = Hdf5Checkpoint::open(tmp.path() / "checkpoint-0");
  for (const auto& other : {mixtral, shared}) {
    try {
      kmoe::io::convert_to_hf(ck, tmp.path() / "hf", other);
      FAIL() << "expected a spec mismatch against " << other;
    } catch (const kmoe::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("spec mismatch"), std::string::npos) << e.what();
    }
  }
  EXPECT_FALSE(fs::exists(tmp.path() / "hf"));
}

// ---- hostile checkpoints and output directories ---------------------------------------------------------------

fs::path granite_src() { return kmoe::test::testdata_dir() / "granitemoe-tiny" / "hf_save_pretrained"; }

// Saves granitemoe-tiny with `edit` applied to the source plan the manifest records.
void save_with_plan(const fs::path& dir, const std::function<void(kmoe::io::SourcePlan&)>& edit) {
  const auto hf = HfCheckpoint::open(granite_src());
  const auto& spec = kmoe::io::spec_for(hf.config().architecture);
  kmoe::io::CheckpointContents c;
  c.architecture = spec.architecture;
  c.expert_ranges = {{0, hf.config().num_experts}};
  c.source = kmoe::io::source_plan_of(hf);
  edit(c.source);
  for (int layer : kmoe::io::find_moe_layers(hf, spec))
    kmoe::io::add_moe_layer(c, layer, kmoe::io::load_moe_layer<float>(hf, layer), 0, true);
  kmoe::io::add_non_moe_tensors(c, hf, spec);
  kmoe::io::save_hdf5_checkpoint(dir, c);
}

void copy_files(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) {
    fs::copy_file(e.path(), to / e.path().filename(), fs::copy_options::overwrite_existing);
    fs::permissions(to / e.path().filename(), fs::perms::owner_write, fs::perm_options::add);
  }
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const kmoe::InputError& e) {
    return e.what();
  } catch (const kmoe::UsageError& e) {
    return std::string("usage: ") + e.what();
  }
  return "(no error)";
}

/// Every file under `root` whose name contains `part`.
std::vector<fs::path> files_named(const fs::path& root, const std::string& part) {
  std::vector<fs::path> out;
  for (const auto& e : fs::recursive_directory_iterator(root))
    if (e.path().filename().string().find(part) != std::string::npos) out.push_back(e.path());
  return out;
}

TEST(Hdf5Convert, NamesFromTheManifestNeverEscapeTheOutput) {
  kmoe::test::ScratchDir tmp("hdf5-convert-names");
  const std::vector<std::string> names = {"../escaped-1.safetensors", "../../escaped-2.safetensors",
                                          (tmp.path() / "escaped-3.safetensors").string(), "sub/escaped-4.safetensors",
                                          "escaped\n5.safetensors", "..", ""};
  int i = 0;
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    const fs::path run = tmp.path() / ("run-" + std::to_string(i++)) / "a";
    save_with_plan(run / "checkpoint-0", [&](kmoe::io::SourcePlan& plan) {
      const std::string old = plan.files[0].name;
      plan.files[0].name = name;
      for (auto& t : plan.tensors)
        if (t.file == old) t.file = name;
    });
    const auto ck = Hdf5Checkpoint::open(run / "checkpoint-0");
    const std::string msg = error_of([&] { kmoe::io::convert_to_hf(ck, run / "out" / "hf"); });
    EXPECT_NE(msg.find("is not a plain file name"), std::string::npos) << msg;
    EXPECT_FALSE(fs::exists(run / "out" / "hf"));
  }
  EXPECT_TRUE(files_named(tmp.path(), "escaped").empty());
  // A text file the manifest records under a name a conversion does not write.
  const fs::path run = tmp.path() / "run-text";
  save_with_plan(run / "checkpoint-0", [](kmoe::io::SourcePlan& plan) { plan.text_files["evil.sh"] = "rm -rf ~"; });
  const std::string msg =
      error_of([&] { kmoe::io::convert_to_hf(Hdf5Checkpoint::open(run / "checkpoint-0"), run / "hf"); });
  EXPECT_NE(msg.find("records a text file 'evil.sh'"), std::string::npos) << msg;
  EXPECT_TRUE(files_named(tmp.path(), "evil").empty());
}

TEST(Hdf5Convert, OutputThatWouldDestroySomethingIsRefused) {
  kmoe::test::ScratchDir tmp("hdf5-convert-out");
  const fs::path run = tmp.path() / "run", ckdir = run / "checkpoint-0", original = tmp.path() / "original";
  copy_files(granite_src(), original);
  save_model(HfCheckpoint::open(original), ckdir);
  const auto ck = Hdf5Checkpoint::open(ckdir);
  const fs::path file = tmp.path() / "notes.txt";
  std::ofstream(file) << "keep me";
  fs::create_directory_symlink(ckdir, tmp.path() / "link-to-checkpoint");
  fs::create_directory_symlink(tmp.path() / "elsewhere", tmp.path() / "dangling-link");
  fs::create_directory_symlink(tmp.path() / "loop-b", tmp.path() / "loop-a");
  fs::create_directory_symlink(tmp.path() / "loop-a", tmp.path() / "loop-b");
  struct Case {
    fs::path out;
    std::string message;
  };
  const std::vector<Case> cases = {
      {ckdir, "is the checkpoint directory"},
      {ckdir / "hf", "lies inside the checkpoint directory"},
      {run, "contains the checkpoint directory"},
      {tmp.path(), "contains the checkpoint directory"},
      {original, "is the original Hugging Face directory"},
      {original / "hf", "lies inside the original Hugging Face directory"},
      {tmp.path() / "link-to-checkpoint", "is the checkpoint directory"},
      {tmp.path() / "dangling-link", "is a symbolic link"},
      {file, "exists and is not a directory"},
      {tmp.path() / "loop-a" / "hf", "cannot resolve the path"},
      {fs::path(), "usage: convert: the output directory is an empty path"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.out.string());
    const std::string msg = error_of([&] { kmoe::io::convert_to_hf(ck, c.out, original, /*replace_existing=*/true); });
    EXPECT_NE(msg.find(c.message), std::string::npos) << msg;
  }
  // Nothing was touched: the checkpoint and the original still open, the file keeps its bytes.
  EXPECT_NO_THROW(Hdf5Checkpoint::open(ckdir));
  EXPECT_NO_THROW(HfCheckpoint::open(original));
  EXPECT_EQ(kmoe::test::read_file_bytes(file), "keep me");
  EXPECT_FALSE(fs::exists(tmp.path() / "elsewhere"));

  // An existing output directory: replaced only when asked, and only when it holds what a conversion writes.
  const fs::path out = tmp.path() / "hf";
  kmoe::io::convert_to_hf(ck, out, original);
  std::string msg = error_of([&] { kmoe::io::convert_to_hf(ck, out, original); });
  EXPECT_NE(msg.find("exists: remove it, or ask to replace a previous conversion (kmoe convert --force)"),
            std::string::npos) << msg;
  kmoe::io::convert_to_hf(ck, out, original, /*replace_existing=*/true);
  kmoe::test::expect_same_files(granite_src(), out);
  std::ofstream(out / "README.md") << "my notes";
  msg = error_of([&] { kmoe::io::convert_to_hf(ck, out, original, /*replace_existing=*/true); });
  EXPECT_NE(msg.find("holds README.md, which a conversion does not write"), std::string::npos) << msg;
  EXPECT_EQ(kmoe::test::read_file_bytes(out / "README.md"), "my notes");
}

TEST(Hdf5Convert, OriginalConfigThatContradictsTheTensorsIsRefused) {
  kmoe::test::ScratchDir tmp("hdf5-convert-config");
  const fs::path original = tmp.path() / "original";
  copy_files(granite_src(), original);
  save_model(HfCheckpoint::open(original), tmp.path() / "checkpoint-0");
  const auto ck = Hdf5Checkpoint::open(tmp.path() / "checkpoint-0");
  const std::string config = kmoe::test::read_file_bytes(original / "config.json");
  struct Case {
    std::string from, to, message;
  };
  const std::vector<Case> cases = {
      {"\"num_local_experts\": 6", "\"num_local_experts\": 5", "contradicts the checkpoint"},
      {"\"intermediate_size\": 48", "\"intermediate_size\": 24", "contradicts the checkpoint"},
      {"\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1", "num_hidden_layers = 1 contradicts the checkpoint"},
      {"\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", "hidden_act 'gelu' is not supported"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.to);
    std::string edited = config;
    const auto at = edited.find(c.from);
    ASSERT_NE(at, std::string::npos);
    std::ofstream(original / "config.json", std::ios::trunc) << edited.replace(at, c.from.size(), c.to);
    const std::string msg = error_of([&] { kmoe::io::convert_to_hf(ck, tmp.path() / "hf", original); });
    EXPECT_NE(msg.find(c.message), std::string::npos) << msg;
    EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
    EXPECT_FALSE(fs::exists(tmp.path() / "hf"));
  }
}

}  // namespace
