// kmoe convert: convert a kmoe checkpoint back to the original Hugging Face layout.
#include <kmoe/config.hpp>

#include "cli.hpp"
#if KMOE_ENABLE_HDF5
#include <kmoe/io/hdf5_checkpoint.hpp>
#endif

#include <filesystem>
#include <iostream>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe convert [--force] CHECKPOINT_DIR OUTPUT_DIR [ORIGINAL_HF_DIR]\n\n"
    "convert a kmoe checkpoint (RUN_DIR/checkpoint-K, written by kmoe finetune) back to the original Hugging Face\n"
    "layout: the original tensor names and dtypes (per-expert matrices for Mixtral, fused ones for Granite, the\n"
    "shared expert), the original shard plan and file names, model.safetensors.index.json, config.json and\n"
    "generation_config.json. With unchanged weights every file is byte-identical to the original. OUTPUT_DIR is\n"
    "written beside itself and renamed into place.\n\n"
    "arguments:\n"
    "  CHECKPOINT_DIR    a kmoe HDF5 checkpoint directory (manifest.h5 + rank-*.h5), saved by any number of ranks\n"
    "  OUTPUT_DIR        the Hugging Face directory to write: a new path, or with --force an existing directory\n"
    "                    holding only what a conversion writes (*.safetensors, model.safetensors.index.json,\n"
    "                    config.json, generation_config.json), which is replaced as a whole; never a file or a\n"
    "                    symbolic link, and never the same as, inside of or containing CHECKPOINT_DIR or\n"
    "                    ORIGINAL_HF_DIR\n"
    "  ORIGINAL_HF_DIR   the checkpoint the run started from: checked against the one recorded in CHECKPOINT_DIR\n"
    "                    (a different model is an error) and the source of config.json/generation_config.json;\n"
    "                    without it, the copies recorded in CHECKPOINT_DIR are used\n\n"
    "options:\n"
    "  --force           replace an existing OUTPUT_DIR (the output of a previous conversion)\n\n"
    "exit codes: 0 done, 1 bad input (missing/corrupt/truncated checkpoint, model mismatch, a path the system\n"
    "refuses), 2 bad usage (including an OUTPUT_DIR that exists without --force or overlaps an input)\n";

// OUTPUT_DIR is replaced as a whole: it must be a new path, or an existing directory with --force, and apart from
// the inputs (replacing the run directory holding CHECKPOINT_DIR, or CHECKPOINT_DIR itself, would delete them).
void check_output_dir(const std::vector<std::string>& p, bool force) {
  namespace fs = std::filesystem;
  const fs::path out = p[1];
  std::vector<NamedPath> inputs{{"CHECKPOINT_DIR", p[0]}};
  if (p.size() > 2) inputs.push_back({"ORIGINAL_HF_DIR", p[2]});
  check_output_apart({"OUTPUT_DIR", out}, inputs);
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(out, ec);
  const bool absent = st.type() == fs::file_type::not_found;
  KMOE_CHECK_INPUT(absent || !ec, "OUTPUT_DIR ", out.string(), ": ", ec.message());
  if (!absent) {
    KMOE_CHECK_USAGE(!fs::is_symlink(st), "OUTPUT_DIR ", out.string(),
                     " is a symbolic link: give the directory itself (it is replaced as a whole)");
    KMOE_CHECK_USAGE(fs::is_directory(st), "OUTPUT_DIR ", out.string(), " exists and is not a directory");
    KMOE_CHECK_USAGE(force, "OUTPUT_DIR ", out.string(), " exists; --force replaces it");
    // --force replaces the output of a previous conversion, never a directory holding anything else (a home
    // directory, a project): only the files a conversion writes, no subdirectory.
    for (fs::directory_iterator it(out, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
      const std::string name = it->path().filename().string();
      const bool converted = name == "config.json" || name == "generation_config.json" ||
                             name == "model.safetensors.index.json" ||
                             (name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0);
      KMOE_CHECK_USAGE(converted && it->is_regular_file(ec), "OUTPUT_DIR ", out.string(), " holds ", name,
                       ", which kmoe convert does not write: --force replaces only a previous conversion's output");
    }
    KMOE_CHECK_INPUT(!ec, "OUTPUT_DIR ", out.string(), ": ", ec.message());
  }
}

int run(int argc, char** argv, const std::vector<std::string>& rest) {
  Args args("kmoe convert", rest, {}, {"force"});
  args.expect_positionals(2, 3, "CHECKPOINT_DIR OUTPUT_DIR [ORIGINAL_HF_DIR]");
  const auto& p = args.positionals();
  check_output_dir(p, args.flag("force"));
#if KMOE_ENABLE_HDF5
  Runtime runtime(argc, argv);  // the MoE layers are re-assembled in Kokkos host Views
  const auto checkpoint = io::Hdf5Checkpoint::open(p[0]);
  io::convert_to_hf(checkpoint, p[1], p.size() > 2 ? std::filesystem::path(p[2]) : std::filesystem::path(),
                    /*replace_existing=*/args.flag("force"));
  std::cout << "kmoe convert: wrote " << p[1] << " from " << p[0] << " (step " << checkpoint.step() << ", saved by "
            << checkpoint.saved_world_size() << " rank" << (checkpoint.saved_world_size() == 1 ? "" : "s") << ")\n";
  return 0;
#else
  (void)argc, (void)argv;
  throw UsageError("this kmoe was built without HDF5 (KMOE_ENABLE_HDF5=OFF)");
#endif
}

}  // namespace

const Subcommand& convert_command() {
  static const Subcommand cmd{"convert", "convert a kmoe checkpoint back to the original Hugging Face layout", kHelp,
                              &run};
  return cmd;
}

}  // namespace kmoe::cli
