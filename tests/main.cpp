// The test main shared by every kmoe test: initialises MPI (when built with it) and Kokkos, traps floating-point
// invalid operations so that a NaN produced anywhere fails the test, then runs GoogleTest.
#include <gtest/gtest.h>

#include <Kokkos_Core.hpp>
#include <cfenv>
#include <cstdlib>
#include <kmoe/config.hpp>
#if KMOE_ENABLE_MPI
#include <mpi.h>
#endif
#if KMOE_ENABLE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {
#if KMOE_ENABLE_MPI
// Under mpirun only rank 0 prints GoogleTest's report; a failure on any rank still fails the exit code.
class QuietOnOtherRanks : public ::testing::EmptyTestEventListener {};
#endif
#if KMOE_ENABLE_CUDA
// A CUDA build's default Kokkos space is Cuda, whose initialisation aborts without a GPU: skip every test instead.
bool has_cuda_device() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}
class SkipWithoutGpu : public ::testing::Environment {
 public:
  void SetUp() override { GTEST_SKIP() << "kmoe was built with CUDA but this machine has no CUDA device"; }
};
#endif
}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
#if KMOE_ENABLE_MPI
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
#endif
  setenv("OMP_PROC_BIND", "spread", 0);
  setenv("OMP_PLACES", "threads", 0);
#if KMOE_ENABLE_CUDA
  const bool run_kokkos = has_cuda_device();
  if (!run_kokkos) ::testing::AddGlobalTestEnvironment(new SkipWithoutGpu);
#else
  const bool run_kokkos = true;
#endif
  if (run_kokkos) Kokkos::initialize(argc, argv);
  // Trap after initialisation: NaN-producing probes inside library start-up are not kmoe's business.
  feenableexcept(FE_INVALID);
  int result = RUN_ALL_TESTS();
  fedisableexcept(FE_INVALID);
  if (run_kokkos) Kokkos::finalize();
#if KMOE_ENABLE_MPI
  int global = 0;
  MPI_Allreduce(&result, &global, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  result = global;
  MPI_Finalize();
#endif
  return result;
}
