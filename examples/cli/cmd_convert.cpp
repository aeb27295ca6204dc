// kmoe convert: convert a kmoe checkpoint back to the original Hugging Face layout.
#include <kmoe/config.hpp>

#include "cli.hpp"
#if KMOE_ENABLE_HDF5
#include <kmoe/io/hdf5_checkpoint.hpp>
#endif

#include <iostream>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe convert CHECKPOINT_DIR OUTPUT_DIR [ORIGINAL_HF_DIR]\n\n"
    "convert a kmoe checkpoint (RUN_DIR/checkpoint-K, written by kmoe finetune) back to the original Hugging Face\n"
    "layout: the original tensor names and dtypes (per-expert matrices for Mixtral, fused ones for Granite, the\n"
    "shared expert), the original shard plan and file names, model.safetensors.index.json, config.json and\n"
    "generation_config.json. With unchanged weights every file is byte-identical to the original. OUTPUT_DIR is\n"
    "written beside itself and renamed into place (an existing OUTPUT_DIR is replaced).\n\n"
    "arguments:\n"
    "  CHECKPOINT_DIR    a kmoe HDF5 checkpoint directory (manifest.h5 + rank-*.h5), saved by any number of ranks\n"
    "  OUTPUT_DIR        the Hugging Face directory to write\n"
    "  ORIGINAL_HF_DIR   the checkpoint the run started from: checked against the one recorded in CHECKPOINT_DIR\n"
    "                    (a different model is an error) and the source of config.json/generation_config.json;\n"
    "                    without it, the copies recorded in CHECKPOINT_DIR are used\n\n"
    "exit codes: 0 done, 1 bad input (missing/corrupt/truncated checkpoint, model mismatch), 2 bad usage\n";

int run(int argc, char** argv, const std::vector<std::string>& rest) {
  Args args("kmoe convert", rest, {});
  args.expect_positionals(2, 3, "CHECKPOINT_DIR OUTPUT_DIR [ORIGINAL_HF_DIR]");
#if KMOE_ENABLE_HDF5
  Runtime runtime(argc, argv);  // the MoE layers are re-assembled in Kokkos host Views
  const auto& p = args.positionals();
  const auto checkpoint = io::Hdf5Checkpoint::open(p[0]);
  io::convert_to_hf(checkpoint, p[1], p.size() > 2 ? std::filesystem::path(p[2]) : std::filesystem::path());
  std::cout << "kmoe convert: wrote " << p[1] << " from " << p[0] << " (step " << checkpoint.step() << ", saved by "
            << checkpoint.saved_world_size() << " rank" << (checkpoint.saved_world_size() == 1 ? "" : "s") << ")\n";
  return 0;
#else
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
