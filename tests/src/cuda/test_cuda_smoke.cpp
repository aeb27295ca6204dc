// The GPU build works end to end: Kokkos' default space is Cuda and runs a kernel, and kmoe's own .cu kernel runs.
#include "cuda_test.hpp"

#include <Kokkos_Core.hpp>
#include <cstdio>

namespace {

TEST(CudaSmoke, DeviceName) {
  KMOE_REQUIRE_GPU();
  const std::string desc = kmoe::core::cuda::device_description();
  std::printf("device: %s\n", desc.c_str());
  EXPECT_FALSE(desc.empty());
}

// Kokkos lambdas cannot live in a TEST body (nvcc: an extended lambda's enclosing function must be public).
double kokkos_fill_and_sum(std::int64_t n) {
  Kokkos::View<double*, Kokkos::CudaSpace> v("v", n);
  Kokkos::parallel_for(
      "smoke::fill", Kokkos::RangePolicy<Kokkos::Cuda, Kokkos::IndexType<std::int64_t>>(0, n),
      KOKKOS_LAMBDA(const std::int64_t i) { v(i) = double(i % 1000); });
  double sum = 0;
  Kokkos::parallel_reduce(
      "smoke::sum", Kokkos::RangePolicy<Kokkos::Cuda, Kokkos::IndexType<std::int64_t>>(0, n),
      KOKKOS_LAMBDA(const std::int64_t i, double& acc) { acc += v(i); }, sum);
  return sum;
}

TEST(CudaSmoke, KokkosCudaKernel) {
  KMOE_REQUIRE_GPU();
  static_assert(std::is_same<Kokkos::DefaultExecutionSpace, Kokkos::Cuda>::value,
                "a CUDA build of kmoe runs on Kokkos' Cuda space by default");
  const std::int64_t n = 1 << 20;
  double want = 0;
  for (std::int64_t i = 0; i < n; ++i) want += double(i % 1000);
  EXPECT_EQ(kokkos_fill_and_sum(n), want);
}

TEST(CudaSmoke, KmoeAxpyKernel) {
  KMOE_REQUIRE_GPU();
  const std::int64_t n = 100003;  // not a multiple of the block size
  std::vector<float> x(n), y(n);
  for (std::int64_t i = 0; i < n; ++i) {
    x[i] = float(i % 17) - 8.f;
    y[i] = float(i % 5);
  }
  kmoe::test::DeviceBuffer<float> dx(x), dy(y);
  kmoe::core::cuda::axpy(2.f, dx.get(), dy.get(), n, nullptr);
  const auto out = dy.download();
  for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(out[i], y[i] + 2.f * x[i]) << "at " << i;
}

}  // namespace
