// The kmoe command: shared pieces of the subcommands (argument parsing, the runtime guard, the subcommand table).
#pragma once

#include <kmoe/config.hpp>
#include <kmoe/core/error.hpp>
#include <kmoe/core/kernel_common.hpp>
#if KMOE_ENABLE_MPI
#include <kmoe/comm/communicator.hpp>
#endif

#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::cli {

/// The values a numeric option accepts: [min, max], either end excluded when its flag is set. A number must also be
/// finite (NaN and infinities are refused whatever the range).
struct Range {
  double min = -std::numeric_limits<double>::infinity();
  double max = std::numeric_limits<double>::infinity();
  bool min_excluded = false, max_excluded = false;
};

/// A subcommand's options, parsed from `--name value` / `--name=value` / `--flag` and positionals.
/// UsageError naming the argument for: an unknown option, a missing or empty value, an option given twice, a value
/// given as a separate argument that starts with `--` (most likely a forgotten value; `--name=--x` passes one), a flag
/// given a value, an empty positional argument or a wrong count of positionals.
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
  /// A decimal integer within [min, max] (`fallback` when absent, not checked); UsageError naming the option, the
  /// value and the range for anything else (garbage, overflow, out of range).
  long long get_int(const std::string& name, long long fallback, long long min, long long max) const;
  /// A finite number within `range` (`fallback` when absent, not checked); UsageError naming the option, the value
  /// and the range for anything else (garbage, NaN, infinities, overflow, underflow, out of range).
  double get_double(const std::string& name, double fallback, const Range& range) const;
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

/// "PATH: reason" (both paths for a two-path operation) of a filesystem error, in one line.
std::string describe(const std::filesystem::filesystem_error& e);

/// `body()`, with a std::filesystem::filesystem_error escaping it turned into an InputError naming the path and the
/// reason (a symlink loop, a permission, a name too long: the environment of a path the user gave, not a bug).
template <class Body>
auto translating_filesystem_errors(Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const std::filesystem::filesystem_error& e) {
    throw InputError(describe(e));
  }
}

/// The memory this process may use in bytes: the machine's physical memory, or its control group's limit when
/// lower (containers, batch jobs).
double usable_memory_bytes();

/// UsageError "`option` `value`: `what` needs at least X GiB, more than this machine's Y GiB of memory" when `bytes`
/// exceeds usable_memory_bytes(): the check that comes before allocating for a size the user chose.
void check_fits_in_memory(const std::string& option, const std::string& value, double bytes, const std::string& what);

/// A named path for messages: {"CHECKPOINT_DIR", "run/checkpoint-8"}.
struct NamedPath {
  std::string name;
  std::filesystem::path path;
};

/// The absolute path with symbolic links of its existing part resolved, without a trailing separator; InputError
/// naming `p` when it cannot be resolved (a symlink loop, a permission).
std::filesystem::path resolved_path(const NamedPath& p);

/// True when `inner` is `outer` or lies below it, component by component (/a/bc is not inside /a/b).
bool path_within(const std::filesystem::path& inner, const std::filesystem::path& outer);

/// UsageError when the output directory `out` (which a command builds beside itself and renames into place,
/// replacing what was there) is, contains or lies inside one of `inputs` (symbolic links resolved): replacing it
/// would delete an input. InputError when a path cannot be resolved (a symlink loop, a permission).
void check_output_apart(const NamedPath& out, const std::vector<NamedPath>& inputs);

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
