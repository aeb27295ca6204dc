// kmoe block: run one MoE block forward and backward on recorded inputs.
#include "cli.hpp"

#include <iostream>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe block --checkpoint DIR --layer I --inputs FILE --out FILE [--precision f64|f32] [--impl scatter|padded]\n\n"
    "run one MoE block forward and backward on recorded inputs.\n"
    "(not built yet)\n";

int run(int, char**, const std::vector<std::string>& argv) {
  Args args("kmoe block", argv, {});  // names any option it does not know
  (void)args;
  std::cerr << "kmoe block: not built yet\n";
  return 2;
}

}  // namespace

const Subcommand& block_command() {
  static const Subcommand cmd{"block", "run one MoE block forward and backward on recorded inputs", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
