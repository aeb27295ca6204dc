// kmoe inspect: list the tensors of a .safetensors file or a Hugging Face checkpoint directory (with its
// architecture, model spec and the MoE layers found). Reads headers only: the tensor data is never touched.
#include "cli.hpp"

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <kmoe/io/safetensors.hpp>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <iomanip>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe inspect PATH\n\n"
    "List the tensors of a .safetensors file (name, dtype, shape, bytes) and its metadata, or of a Hugging Face\n"
    "checkpoint directory (config.json + model.safetensors or model.safetensors.index.json and shards), with the\n"
    "architecture, kmoe's model spec for it (routing, expert and shared-expert variants) and the MoE layers found.\n\n"
    "exit codes: 0 ok, 1 bad input (corrupt or missing file, a path the system refuses; the message names the file\n"
    "and tensor), 2 bad usage\n";

struct Row {
  std::string name, dtype, shape, bytes, file;
};

void print_rows(std::ostream& os, const std::vector<Row>& rows, bool with_file) {
  std::size_t wn = 4, wd = 5, ws = 5, wb = 5;
  for (const auto& r : rows) {
    wn = std::max(wn, r.name.size());
    wd = std::max(wd, r.dtype.size());
    ws = std::max(ws, r.shape.size());
    wb = std::max(wb, r.bytes.size());
  }
  os << "  " << std::left << std::setw(static_cast<int>(wn)) << "name" << "  " << std::setw(static_cast<int>(wd))
     << "dtype" << "  " << std::setw(static_cast<int>(ws)) << "shape" << "  " << std::right
     << std::setw(static_cast<int>(wb)) << "bytes" << (with_file ? "  file" : "") << "\n";
  for (const auto& r : rows) {
    os << "  " << std::left << std::setw(static_cast<int>(wn)) << r.name << "  " << std::setw(static_cast<int>(wd))
       << r.dtype << "  " << std::setw(static_cast<int>(ws)) << r.shape << "  " << std::right
       << std::setw(static_cast<int>(wb)) << r.bytes;
    if (with_file) os << "  " << r.file;
    os << "\n";
  }
}

/// Names, metadata and paths come from files: printed escaped (no newline or terminal escape reaches the screen).
std::string shown(const std::string& s) { return kmoe::detail::printable(s, 4096); }

Row row_of(const io::TensorView& t, const std::string& file) {
  return {shown(t.name), io::dtype_name(t.dtype), t.shape_string(), std::to_string(t.nbytes), shown(file)};
}

void print_metadata(std::ostream& os, const io::SafetensorsFile& f) {
  if (!f.has_metadata()) {
    os << "metadata: none\n";
    return;
  }
  os << "metadata:";
  if (f.metadata_entries().empty()) os << " {}";
  for (const auto& [k, v] : f.metadata_entries()) os << " " << shown(k) << "=" << shown(v);  // header order
  os << "\n";
}

void inspect_file(const std::filesystem::path& path) {
  const auto f = io::SafetensorsFile::open(path);
  std::uint64_t data = 0;
  for (const auto& t : f.tensors()) data += t.nbytes;
  std::cout << "file: " << shown(path.string()) << " (" << f.file_size() << " bytes: 8 + header " << f.header_size()
            << " + data " << data << ")\n";
  print_metadata(std::cout, f);
  std::cout << "tensors: " << f.tensors().size() << "\n";
  std::vector<Row> rows;
  for (const auto& t : f.tensors()) rows.push_back(row_of(t, ""));
  print_rows(std::cout, rows, false);
}

void inspect_dir(const std::filesystem::path& dir) {
  const auto ck = io::HfCheckpoint::open(dir);
  const auto& c = ck.config();
  auto& os = std::cout;
  os << "checkpoint: " << dir.string() << "\n";
  os << "architecture: " << (c.architecture.empty() ? "(none)" : c.architecture) << " (model_type "
     << (c.model_type.empty() ? "?" : c.model_type) << ", dtype " << (c.dtype.empty() ? "?" : c.dtype) << ")\n";
  os << "config: hidden_size " << c.hidden_size << ", intermediate_size " << c.intermediate_size << ", experts "
     << c.num_experts << ", top_k " << c.top_k << ", layers " << c.num_layers << ", shared_intermediate_size "
     << c.shared_intermediate_size << ", hidden_act " << c.hidden_act << "\n";
  const auto files = ck.shard_files();
  os << "files: " << files.size() << (ck.is_sharded() ? " shard(s) + model.safetensors.index.json" : "")
     << "; total_size " << ck.total_size() << " bytes, total_parameters " << ck.total_parameters() << "\n";
  const io::ModelSpec* spec = io::find_spec(c.architecture);
  if (!spec) {
    std::string known;
    for (const auto& s : io::model_specs()) known += (known.empty() ? "" : ", ") + s.architecture;
    os << "spec: none (kmoe knows " << known << ")\n";
  } else {
    os << "spec: " << spec->architecture << ": " << spec->summary << "\n";
    os << "routing: " << core::describe(c.routing) << (spec->router_bias.present() ? "; router bias" : "")
       << (spec->score_bias.present() ? "; selection bias (choice only)" : "") << "\n";
    os << "experts: " << io::describe(spec->expert, c.swiglu_limit)
       << "; shared expert: " << io::shared_variant_name(spec->shared_variant()) << "\n";
    const auto layers = io::find_moe_layers(ck, *spec);
    os << "MoE layers: " << layers.size() << " of " << c.num_layers;
    for (std::size_t i = 0; i < layers.size(); ++i) os << (i ? ", " : " (") << layers[i] << (i + 1 == layers.size() ? ")" : "");
    for (int l = 0, n = 0; l < c.num_layers; ++l)  // the others pass through untouched
      if (std::find(layers.begin(), layers.end(), l) == layers.end()) os << (n++ ? ", " : "; dense: ") << l;
    os << "\n";
    if (!c.layer_types.empty()) {
      os << "layer types:";
      for (const auto& t : c.layer_types) os << " " << t;
      os << "\n";
    }
    for (int l : layers) {
      const auto expected = io::moe_layer_tensors(*spec, c, l);
      std::int64_t bytes = 0;
      for (const auto& e : expected) bytes += static_cast<std::int64_t>(ck.tensor(e.name).nbytes);
      os << "  layer " << l << ": " << expected.size() << " tensors, " << bytes << " bytes: router "
         << expected.front().name << " " << ck.tensor(expected.front().name).shape_string() << "\n";
    }
  }
  for (const auto& file : files) {
    os << "shard " << file << ": ";
    print_metadata(os, ck.shard(file));
  }
  os << "tensors: " << ck.shard_plan().size() << "\n";
  std::vector<Row> rows;
  for (const auto& e : ck.shard_plan()) rows.push_back(row_of(ck.tensor(e.tensor), e.file));
  print_rows(os, rows, true);
}

int run(int, char**, const std::vector<std::string>& argv) {
  Args args("kmoe inspect", argv, {});
  args.expect_positionals(1, 1, "PATH");
  const std::filesystem::path path = args.positionals()[0];
  KMOE_CHECK_INPUT(std::filesystem::exists(path), path.string(), ": no such file or directory");
  if (std::filesystem::is_directory(path))
    inspect_dir(path);
  else
    inspect_file(path);
  return 0;
}

}  // namespace

const Subcommand& inspect_command() {
  static const Subcommand cmd{"inspect", "list the tensors of a .safetensors file or a checkpoint directory", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
