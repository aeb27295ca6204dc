// Helpers shared by the GPU benchmarks of perf/device (bench_cuda_rows, bench_cutlass_grouped, moe_peer_bench):
// device arrays freed together, random bf16 inputs made on the device, event-timed medians, comma lists.
#pragma once

#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/kernels.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace kmoe::perf {

/// Device allocations of one benchmark case, freed together when it ends.
class DeviceArena {
 public:
  DeviceArena() = default;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  ~DeviceArena() {
    for (void* p : ptrs_) cudaFree(p);
  }
  void* alloc(std::size_t bytes) {
    void* p = nullptr;
    KMOE_CUDA_CHECK(cudaMalloc(&p, bytes));
    ptrs_.push_back(p);
    return p;
  }
  /// n elements of T (uninitialised).
  template <class T>
  T* alloc(std::int64_t n) {
    return static_cast<T*>(alloc(std::size_t(n) * sizeof(T)));
  }
  template <class T>
  T* upload(const std::vector<T>& v) {
    T* p = alloc<T>(std::int64_t(v.size()));
    KMOE_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
  }
  /// n random bf16 values of standard deviation `scale`, made on the device (never zeros: they hide unwritten
  /// outputs and time differently).
  core::cuda::bf16_t* random_bf16(std::int64_t n, float scale, std::uint64_t seed) {
    auto* p = alloc<core::cuda::bf16_t>(n);
    core::cuda::fill_random_bf16(p, n, scale, seed, nullptr);
    return p;
  }

 private:
  std::vector<void*> ptrs_;
};

/// Median milliseconds of f over `reps` calls, each between two CUDA events on the default stream, after `warmup`
/// untimed calls.
inline double median_event_ms(const std::function<void()>& f, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) f();
  KMOE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> ms(reps);
  cudaEvent_t a, b;
  KMOE_CUDA_CHECK(cudaEventCreate(&a));
  KMOE_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < reps; ++i) {
    KMOE_CUDA_CHECK(cudaEventRecord(a));
    f();
    KMOE_CUDA_CHECK(cudaEventRecord(b));
    KMOE_CUDA_CHECK(cudaEventSynchronize(b));
    float v = 0;
    KMOE_CUDA_CHECK(cudaEventElapsedTime(&v, a, b));
    ms[i] = v;
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
}

/// "a,b,,c" -> {"a", "b", "c"}.
inline std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::size_t a = 0;
  while (a <= s.size()) {
    const std::size_t b = std::min(s.find(',', a), s.size());
    if (b > a) out.push_back(s.substr(a, b - a));
    a = b + 1;
  }
  return out;
}

}  // namespace kmoe::perf
