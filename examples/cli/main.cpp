// kmoe: the command-line entry point. Dispatches to a subcommand; maps kmoe's errors to exit codes:
// 0 success, 1 bad input (InputError, or a path the system refuses), 2 bad usage (UsageError), 3 internal error.
#include "cli.hpp"

#include <kmoe/core/openmp_env.hpp>
#include <kmoe/core/version.hpp>

#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <iostream>

namespace {

const kmoe::cli::Subcommand* const* subcommands() {
  static const kmoe::cli::Subcommand* table[] = {&kmoe::cli::inspect_command(), &kmoe::cli::block_command(),
                                                 &kmoe::cli::finetune_command(), &kmoe::cli::convert_command(),
                                                 nullptr};
  return table;
}

void print_usage(std::ostream& os) {
  os << "usage: kmoe <command> [options]\n"
        "       kmoe --help | --version\n\n"
        "Mixture-of-Experts layers for fine-tuning: Kokkos-portable kernels, expert parallelism, checkpoints.\n\n"
        "commands:\n";
  for (auto s = subcommands(); *s; ++s) {
    os << "  " << (*s)->name;
    for (std::size_t i = std::strlen((*s)->name); i < 10; ++i) os << ' ';
    os << (*s)->summary << "\n";
  }
  os << "\nRun 'kmoe <command> --help' for a command's options.\n";
}

}  // namespace

int main(int argc, char** argv) {
  // Kokkos' OpenMP kernels alternate with OpenBLAS' threads: idle OpenMP workers must sleep (docs/kernels.md).
  kmoe::core::reexec_with_passive_openmp_wait(argv);
  if (argc < 2) {
    std::cerr << "kmoe: missing command (inspect, block, finetune, convert); see kmoe --help\n";
    return 2;
  }
  const std::string first = argv[1];
  if (first == "--help" || first == "-h" || first == "help") {
    print_usage(std::cout);
    return 0;
  }
  if (first == "--version") {
    std::cout << kmoe::version_string() << "\n";
    return 0;
  }
  const kmoe::cli::Subcommand* cmd = nullptr;
  for (auto s = subcommands(); *s; ++s)
    if (first == (*s)->name) cmd = *s;
  if (!cmd) {
    std::cerr << "kmoe: unknown command '" << first << "' (expected inspect, block, finetune or convert)\n";
    return 2;
  }
  std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") {
      std::cout << cmd->help;
      return 0;
    }
    if (a == "--version") {
      std::cout << kmoe::version_string() << "\n";
      return 0;
    }
  }
  try {
    return cmd->run(argc, argv, args);
  } catch (const kmoe::UsageError& e) {
    std::cerr << "kmoe " << cmd->name << ": " << e.what() << "\n";
    return 2;
  } catch (const kmoe::InputError& e) {
    std::cerr << "kmoe " << cmd->name << ": " << e.what() << "\n";
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {
    // A path the user gave that the system refuses (a symlink loop, a permission): bad input, not a bug.
    std::cerr << "kmoe " << cmd->name << ": " << kmoe::cli::describe(e) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "kmoe " << cmd->name << ": " << e.what() << "\n";
    return 3;
  }
}
