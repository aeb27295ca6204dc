#include "cli.hpp"

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <cstdlib>
#include <kmoe/config.hpp>
#if KMOE_ENABLE_MPI
#include <mpi.h>
#endif

namespace kmoe::cli {

Args::Args(std::string program, const std::vector<std::string>& argv, const std::vector<std::string>& options,
           const std::vector<std::string>& flags)
    : program_(std::move(program)) {
  auto known = [](const std::vector<std::string>& list, const std::string& n) {
    return std::find(list.begin(), list.end(), n) != list.end();
  };
  for (std::size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
      std::string name = a.substr(2), value;
      const auto eq = name.find('=');
      const bool inline_value = eq != std::string::npos;
      if (inline_value) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      if (known(flags, name) && !inline_value) {
        flags_[name] = true;
      } else if (known(options, name)) {
        if (!inline_value) {
          KMOE_CHECK_USAGE(i + 1 < argv.size(), "option --", name, " needs a value");
          value = argv[++i];
        }
        values_[name] = value;
      } else {
        throw UsageError("unknown option '" + a + "' (see " + program_ + " --help)");
      }
    } else {
      positionals_.push_back(a);
    }
  }
}

std::string Args::required(const std::string& name) const {
  auto it = values_.find(name);
  KMOE_CHECK_USAGE(it != values_.end(), "missing required option --", name, " (see ", program_,
                   " --help)");
  return it->second;
}

std::string Args::get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

long long Args::get_int(const std::string& name, long long fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(it->second.c_str(), &end, 10);
  KMOE_CHECK_USAGE(!it->second.empty() && *end == '\0' && errno == 0, "--", name,
                   " expects an integer, got '", it->second, "'");
  return v;
}

double Args::get_double(const std::string& name, double fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(it->second.c_str(), &end);
  KMOE_CHECK_USAGE(!it->second.empty() && *end == '\0' && errno == 0, "--", name,
                   " expects a number, got '", it->second, "'");
  return v;
}

std::string Args::get_choice(const std::string& name, const std::string& fallback,
                             const std::vector<std::string>& choices) const {
  const std::string v = get(name, fallback);
  if (std::find(choices.begin(), choices.end(), v) == choices.end()) {
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "" : "|") + c;
    throw UsageError("--" + name + " must be one of " + list + ", got '" + v + "'");
  }
  return v;
}

void Args::expect_positionals(std::size_t min, std::size_t max, const char* what) const {
  KMOE_CHECK_USAGE(positionals_.size() >= min && positionals_.size() <= max, "expected ", what, ", got ",
                   positionals_.size(), " positional argument(s)");
}

core::GemmAlgo parse_engine(const std::string& name) {
  if (name == "auto") return core::GemmAlgo::Auto;
  if (name == "blas") return core::GemmAlgo::Blas;
  if (name == "kokkos") return core::GemmAlgo::Kokkos;
  if (name == "cutlass") return core::GemmAlgo::Cutlass;
  throw UsageError("--engine '" + name + "' is not one of auto, blas, kokkos, cutlass");
}

Runtime::Runtime(int& argc, char**& argv) {
#if KMOE_ENABLE_MPI
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    own_mpi_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
#endif
  // Kokkos 3.4 warns about unset OpenMP binding on every start; these are the values it recommends.
  setenv("OMP_PROC_BIND", "spread", 0);
  setenv("OMP_PLACES", "threads", 0);
  Kokkos::initialize(argc, argv);
}

Runtime::~Runtime() {
  Kokkos::finalize();
#if KMOE_ENABLE_MPI
  if (own_mpi_) MPI_Finalize();
#endif
}

}  // namespace kmoe::cli
