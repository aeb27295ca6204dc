// Helpers for kmoe's GPU tests: skip without a GPU, poison device buffers, move data between host and device.
#pragma once

#include <gtest/gtest.h>

#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/kernels.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

/// First line of every GPU test: skips with a message when this machine has no CUDA device.
#define KMOE_REQUIRE_GPU()                                                                  \
  do {                                                                                      \
    if (::kmoe::core::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device present";  \
  } while (0)

namespace kmoe::test {

/// A device allocation that frees itself.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n > 0) KMOE_CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    KMOE_ASSERT(host.size() == n_);
    if (n_) KMOE_CUDA_CHECK(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    KMOE_CUDA_CHECK(cudaDeviceSynchronize());
    if (n_) KMOE_CUDA_CHECK(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  /// Fills every byte with 0xFF: a NaN in float and bf16, -1 in integers, so unwritten elements fail the checks.
  void poison() {
    if (n_) KMOE_CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T)));
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace kmoe::test
