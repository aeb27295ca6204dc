// kmoe finetune: fine-tune the MoE blocks of a checkpoint (the main job).
#include "cli.hpp"

#include <iostream>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe finetune --checkpoint HF_DIR --steps N --out RUN_DIR [options]\n\n"
    "fine-tune the MoE blocks of a checkpoint (the main job).\n"
    "(not built yet)\n";

int run(int, char**, const std::vector<std::string>& argv) {
  Args args("kmoe finetune", argv, {});  // names any option it does not know
  (void)args;
  std::cerr << "kmoe finetune: not built yet\n";
  return 2;
}

}  // namespace

const Subcommand& finetune_command() {
  static const Subcommand cmd{"finetune", "fine-tune the MoE blocks of a checkpoint (the main job)", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
