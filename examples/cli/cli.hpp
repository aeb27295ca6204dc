// The kmoe command: shared pieces of the subcommands (argument parsing, the runtime guard, the subcommand table).
#pragma once

#include <kmoe/config.hpp>
#include <kmoe/core/error.hpp>
#include <kmoe/core/kernel_common.hpp>
#if KMOE_ENABLE_MPI
#include <kmoe/comm/communicator.hpp>
#endif

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::cli {

/// A subcommand's options, parsed from `--name value` / `--name=value` / `--flag` and positionals.
/// Unknown options, a missing value or a wrong count of positionals throw UsageError naming the argument.
class Args {
 public:
  /// \param program [in] "kmoe block" (for messages)
  /// \param argv    [in] the arguments after the subcommand name
  /// \param options [in] the accepted `--name` options that take a value
  /// \param flags   [in] the accepted `--name` options that take none
  Args(std::string program, const std::vector<std::string>& argv, const std::vector<std::string>& options,
       const std::vector<std::string>& flags = {});

  bool has(const std::string& name) const { return values_.count(name) != 0; }
  bool flag(const std::string& name) const { return flags_.count(name) != 0; }
  /// The value of a required option; UsageError when absent.
  std::string required(const std::string& name) const;
  std::string get(const std::string& name, const std::string& fallback) const;
  long long get_int(const std::string& name, long long fallback) const;
  double get_double(const std::string& name, double fallback) const;
  /// One of `choices`; UsageError naming the option and the choices otherwise.
  std::string get_choice(const std::string& name, const std::string& fallback,
                         const std::vector<std::string>& choices) const;
  const std::vector<std::string>& positionals() const { return positionals_; }
  /// UsageError unless the positional count is within [min, max].
  void expect_positionals(std::size_t min, std::size_t max, const char* what) const;

 private:
  std::string program_;
  std::map<std::string, std::string> values_;
  std::map<std::string, bool> flags_;
  std::vector<std::string> positionals_;
};

/// Initialises MPI (when built with it) and Kokkos for a subcommand that computes; finalises in reverse order.
class Runtime {
 public:
  Runtime(int& argc, char**& argv);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  bool own_mpi_ = false;
  int rank_ = 0, size_ = 1;
};

/// "auto" | "blas" | "kokkos" | "cutlass" -> the GEMM engine (--engine of block and finetune).
core::GemmAlgo parse_engine(const std::string& name);

#if KMOE_ENABLE_MPI && KMOE_ENABLE_CUDA
/// The world as a communicator that moves device memory, for the bf16 CUDA block under expert parallelism (collective
/// over MPI_COMM_WORLD; after Runtime). `choice`:
///   "nccl" NCCL on Kokkos' device and stream (one GPU per rank: NCCL refuses two ranks on one device);
///   "mpi"  MPI over device buffers (CUDA-aware, or staged through the host): any number of ranks per GPU;
///   "auto" NCCL when built with it and no two ranks of a node share a GPU, else MPI.
/// UsageError naming the choice when it is not built in.
std::unique_ptr<comm::Communicator> device_world(const std::string& choice);
#endif

/// A subcommand: its name, a one-line summary, its --help text and its body.
/// The body receives the arguments after the subcommand name (never --help/--version) and returns the exit code.
struct Subcommand {
  const char* name;
  const char* summary;
  const char* help;
  int (*run)(int argc, char** argv, const std::vector<std::string>& args);
};

const Subcommand& inspect_command();
const Subcommand& block_command();
const Subcommand& finetune_command();
const Subcommand& convert_command();

}  // namespace kmoe::cli
