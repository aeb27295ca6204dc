// Device queries and the smallest kernel of kmoe (the device script's first check that kmoe's .cu code runs).
#include "common.cuh"

#include <string>

namespace kmoe::core::cuda {

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later queries start clean
    return 0;
  }
  return n;
}

std::string device_description() {
  int dev = 0;
  KMOE_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  KMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
         std::to_string(prop.multiProcessorCount) + " SMs, " + std::to_string(prop.totalGlobalMem >> 20) + " MiB)";
}

namespace {
__global__ void axpy_kernel(float a, const float* __restrict__ x, float* __restrict__ y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    y[i] += a * x[i];
}
__global__ void fill_random_bf16_kernel(bf16_t* out, std::int64_t n, float scale, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + std::uint64_t(i);  // splitmix64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = float(z >> 40) * (1.f / 16777216.f);  // [0,1)
    out[i] = detail::float_to_bf16((2.f * u - 1.f) * 1.7320508f * scale);  // uniform, variance scale^2
  }
}
}  // namespace

void fill_random_bf16(bf16_t* out, std::int64_t n, float scale, std::uint64_t seed, cudaStream_t stream) {
  if (n <= 0) return;
  fill_random_bf16_kernel<<<detail::grid_for(n, 256, 65536), 256, 0, stream>>>(out, n, scale, seed);
  KMOE_CUDA_CHECK_LAUNCH("fill_random_bf16_kernel");
}

void axpy(float a, const float* x, float* y, std::int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  const std::int64_t blocks = (n + threads - 1) / threads;
  axpy_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads, 0, stream>>>(a, x, y, n);
  KMOE_CUDA_CHECK_LAUNCH("axpy_kernel");
}

}  // namespace kmoe::core::cuda
