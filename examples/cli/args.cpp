#include "cli.hpp"

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <kmoe/config.hpp>
#include <unistd.h>
#if KMOE_ENABLE_MPI
#include <mpi.h>
#endif

namespace kmoe::cli {

namespace {

// A bound for messages: "1e-08", "0.999", "2147483647".
std::string number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.15g", v);
  return buf;
}

std::string range_text(const Range& r) {
  const bool lo = std::isfinite(r.min), hi = std::isfinite(r.max);
  if (lo && hi)
    return std::string("in ") + (r.min_excluded ? "(" : "[") + number_text(r.min) + ", " + number_text(r.max) +
           (r.max_excluded ? ")" : "]");
  if (lo) return (r.min_excluded ? "> " : ">= ") + number_text(r.min);
  if (hi) return (r.max_excluded ? "< " : "<= ") + number_text(r.max);
  return "";
}

}  // namespace

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
      if (known(flags, name)) {
        KMOE_CHECK_USAGE(!inline_value, "option --", name, " takes no value, got '", a, "'");
        flags_[name] = true;
      } else if (known(options, name)) {
        if (!inline_value) {
          KMOE_CHECK_USAGE(i + 1 < argv.size(), "option --", name, " needs a value");
          value = argv[++i];
          // `--out --steps 3` forgot --out's value; a value that starts with -- is passed as --out=--name.
          KMOE_CHECK_USAGE(value.compare(0, 2, "--") != 0, "option --", name, " needs a value, got the option '",
                           value, "' (write --", name, "=", value, " for a value that starts with --)");
        }
        KMOE_CHECK_USAGE(!value.empty(), "option --", name, " needs a non-empty value");
        KMOE_CHECK_USAGE(values_.count(name) == 0, "option --", name, " is given twice ('", values_[name], "' and '",
                         value, "')");
        values_[name] = value;
      } else {
        throw UsageError("unknown option '" + a + "' (see " + program_ + " --help)");
      }
    } else {
      KMOE_CHECK_USAGE(!a.empty(), "empty argument (positional argument ", positionals_.size() + 1, ")");
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

long long Args::get_int(const std::string& name, long long fallback, long long min, long long max) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  const std::string& text = it->second;
  const std::string range = max == std::numeric_limits<long long>::max()
                                ? ">= " + std::to_string(min)
                                : "in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
  // Digits after an optional sign: strtoll alone would also take leading blanks and stop at trailing garbage.
  const std::size_t first = !text.empty() && (text[0] == '+' || text[0] == '-') ? 1 : 0;
  const bool well_formed =
      first < text.size() && text.find_first_not_of("0123456789", first) == std::string::npos;
  KMOE_CHECK_USAGE(well_formed, "--", name, " expects an integer ", range, ", got '", text, "'");
  errno = 0;
  const long long v = std::strtoll(text.c_str(), nullptr, 10);
  KMOE_CHECK_USAGE(errno == 0 && v >= min && v <= max, "--", name, " must be an integer ", range, ", got '", text,
                   "'");
  return v;
}

double Args::get_double(const std::string& name, double fallback, const Range& r) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  const std::string& text = it->second;
  const std::string range = range_text(r);
  const std::string wanted = "a finite number" + (range.empty() ? "" : " " + range);
  char* end = nullptr;
  errno = 0;
  const double v = std::isspace(static_cast<unsigned char>(text[0])) ? 0.0 : std::strtod(text.c_str(), &end);
  KMOE_CHECK_USAGE(end && end != text.c_str() && *end == '\0', "--", name, " expects ", wanted, ", got '", text, "'");
  // ERANGE: beyond a double (1e999) or below its smallest normal (1e-400, which would silently become 0 or lose
  // precision).
  KMOE_CHECK_USAGE(errno != ERANGE, "--", name, " ", text, " is out of the range of a double (expects ", wanted, ")");
  const bool inside = std::isfinite(v) && (r.min_excluded ? v > r.min : v >= r.min) &&
                      (r.max_excluded ? v < r.max : v <= r.max);
  KMOE_CHECK_USAGE(inside, "--", name, " must be ", wanted, ", got '", text, "'");
  return v;
}

std::string Args::get_choice(const std::string& name, const std::string& fallback,
                             const std::vector<std::string>& choices) const {
  const std::string v = get(name, fallback);
  if (std::find(choices.begin(), choices.end(), v) == choices.end()) {
    std::string list;
    for (const auto& c : choices)
      if (!c.empty()) list += (list.empty() ? "" : "|") + c;  // "" stands for the default, never typed
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

std::string describe(const std::filesystem::filesystem_error& e) {
  auto name = [](const std::filesystem::path& p) { return p.empty() ? std::string("(empty path)") : p.string(); };
  std::string where = name(e.path1());
  if (!e.path2().empty()) where += " -> " + name(e.path2());
  return where + ": " + e.code().message();
}

std::filesystem::path resolved_path(const NamedPath& p) {
  std::error_code ec;
  std::filesystem::path r = std::filesystem::absolute(p.path, ec);
  if (!ec) r = std::filesystem::weakly_canonical(r, ec);
  KMOE_CHECK_INPUT(!ec, p.name, " ", p.path.string(), ": ", ec.message());
  r = r.lexically_normal();
  if (r.has_parent_path() && r.filename().empty()) r = r.parent_path();
  return r;
}

bool path_within(const std::filesystem::path& inner, const std::filesystem::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

void check_output_apart(const NamedPath& out, const std::vector<NamedPath>& inputs) {
  const std::filesystem::path o = resolved_path(out);
  for (const auto& in : inputs) {
    if (in.path.empty()) continue;
    const std::filesystem::path i = resolved_path(in);
    const bool inside = path_within(o, i), contains = path_within(i, o);
    KMOE_CHECK_USAGE(!inside && !contains, out.name, " ", out.path.string(),
                     inside && contains ? " is " : contains ? " contains " : " lies inside ", in.name, " ",
                     in.path.string(), ": choose an output directory apart from the inputs");
  }
}

double usable_memory_bytes() {
  double bytes = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
  // cgroup v2, then v1; "max" or an absurd value means no limit.
  for (const char* limit : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream f(limit);
    double v = 0;
    if (f >> v && v > 0 && v < bytes) bytes = v;
  }
  return bytes;
}

void check_fits_in_memory(const std::string& option, const std::string& value, double bytes, const std::string& what) {
  const double limit = usable_memory_bytes();
  if (bytes <= limit) return;
  char line[96];
  std::snprintf(line, sizeof line, "needs at least %.3g GiB, more than this machine's %.3g GiB of memory",
                bytes / 1073741824.0, limit / 1073741824.0);
  throw UsageError("--" + option + " " + value + ": " + what + " " + line);
}

Runtime::Runtime(int& argc, char**& argv) {
  // MPI and Kokkos see the program name only: every other argument is kmoe's (its parser has taken them already),
  // and a value of kmoe's options, such as a path named --kokkos-help, must not reach their parsers.
  static char* program_only[] = {argc > 0 ? argv[0] : nullptr, nullptr};
  int runtime_argc = argc > 0 ? 1 : 0;
  char** runtime_argv = program_only;
#if KMOE_ENABLE_MPI
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(&runtime_argc, &runtime_argv, MPI_THREAD_FUNNELED, &provided);
    own_mpi_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
#endif
  // Kokkos 3.4 warns about unset OpenMP binding on every start; these are the values it recommends.
  setenv("OMP_PROC_BIND", "spread", 0);
  setenv("OMP_PLACES", "threads", 0);
  Kokkos::initialize(runtime_argc, runtime_argv);
}

Runtime::~Runtime() {
  Kokkos::finalize();
#if KMOE_ENABLE_MPI
  if (own_mpi_) MPI_Finalize();
#endif
}

}  // namespace kmoe::cli
