// kmoe convert: convert a kmoe checkpoint back to the original Hugging Face layout.
#include "cli.hpp"

#include <iostream>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe convert CHECKPOINT_DIR OUTPUT_DIR ORIGINAL_HF_DIR\n\n"
    "convert a kmoe checkpoint back to the original Hugging Face layout.\n"
    "(not built yet)\n";

int run(int, char**, const std::vector<std::string>& argv) {
  Args args("kmoe convert", argv, {});  // names any option it does not know
  (void)args;
  std::cerr << "kmoe convert: not built yet\n";
  return 2;
}

}  // namespace

const Subcommand& convert_command() {
  static const Subcommand cmd{"convert", "convert a kmoe checkpoint back to the original Hugging Face layout", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
