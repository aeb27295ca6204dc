// kmoe inspect: list the tensors of a .safetensors file or a checkpoint directory.
#include "cli.hpp"

#include <iostream>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe inspect PATH\n\n"
    "list the tensors of a .safetensors file or a checkpoint directory.\n"
    "(not built yet)\n";

int run(int, char**, const std::vector<std::string>& argv) {
  Args args("kmoe inspect", argv, {});  // names any option it does not know
  (void)args;
  std::cerr << "kmoe inspect: not built yet\n";
  return 2;
}

}  // namespace

const Subcommand& inspect_command() {
  static const Subcommand cmd{"inspect", "list the tensors of a .safetensors file or a checkpoint directory", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
