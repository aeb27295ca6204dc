/// \file openmp_env.hpp
/// \brief Puts idle OpenMP threads to sleep for programs that mix Kokkos' OpenMP kernels with a threaded BLAS.
///
/// With OpenMP's default wait policy, idle Kokkos workers spin on the cores OpenBLAS' own threads need between Kokkos
/// kernels: the CPU expert MLP ran ~2x slower on 2 cores (docs/kernels.md). libgomp reads OMP_WAIT_POLICY only when it
/// loads, so setting it from main() is too late; the process has to start again with it.
#pragma once

namespace kmoe::core {

/// When OMP_WAIT_POLICY is unset: sets it to "passive" (and OMP_PROC_BIND/OMP_PLACES to Kokkos' recommended values
/// when unset) and re-executes the running program with the same arguments (same pid, so mpirun keeps track of it).
/// Returns only when nothing was to be done or the re-execution failed (then the program runs on as it is).
/// Call first thing in main(), before MPI or Kokkos start. A user's own OMP_WAIT_POLICY is always respected.
void reexec_with_passive_openmp_wait(char** argv);

}  // namespace kmoe::core
