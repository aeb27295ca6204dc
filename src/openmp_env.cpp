#include <kmoe/core/openmp_env.hpp>

#include <unistd.h>

#include <cstdlib>

namespace kmoe::core {

void reexec_with_passive_openmp_wait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY")) return;
  setenv("OMP_WAIT_POLICY", "passive", 1);
  setenv("OMP_PROC_BIND", "spread", 0);
  setenv("OMP_PLACES", "threads", 0);
  execv("/proc/self/exe", argv);  // returns only on failure
}

}  // namespace kmoe::core
