/// \file check.hpp
/// \brief Checked CUDA and cuBLAS calls: a failing call throws kmoe::InternalError naming the call,
/// the library's error string and file:line.
///
/// Included by kmoe's .cu files and by the Kokkos-side wrappers; needs only the CUDA runtime and cuBLAS headers.
#pragma once

#include <kmoe/core/error.hpp>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

namespace kmoe::core::cuda::detail {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* call, const char* file, int line) {
  throw ::kmoe::InternalError(::kmoe::detail::concat("CUDA error ", cudaGetErrorName(err), " (",
                                                     cudaGetErrorString(err), ") in ", call, " at ", file, ":", line));
}

[[noreturn]] inline void throw_cublas(cublasStatus_t st, const char* call, const char* file, int line) {
  throw ::kmoe::InternalError(::kmoe::detail::concat("cuBLAS error ", cublasGetStatusName(st), " (",
                                                     cublasGetStatusString(st), ") in ", call, " at ", file, ":",
                                                     line));
}

}  // namespace kmoe::core::cuda::detail

/// Runs a CUDA runtime call; throws kmoe::InternalError unless it returns cudaSuccess.
#define KMOE_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    const cudaError_t kmoe_err_ = (call);                                                      \
    if (kmoe_err_ != cudaSuccess) ::kmoe::core::cuda::detail::throw_cuda(kmoe_err_, #call, __FILE__, __LINE__); \
  } while (0)

/// After a kernel launch (name: a string literal): throws if the launch failed (bad configuration, no device code
/// for this GPU, an earlier asynchronous fault).
#define KMOE_CUDA_CHECK_LAUNCH(name)                                                                 \
  do {                                                                                               \
    const cudaError_t kmoe_err_ = cudaGetLastError();                                                \
    if (kmoe_err_ != cudaSuccess)                                                                    \
      ::kmoe::core::cuda::detail::throw_cuda(kmoe_err_, "launch of " name, __FILE__, __LINE__);      \
  } while (0)

/// Runs a cuBLAS call; throws kmoe::InternalError unless it returns CUBLAS_STATUS_SUCCESS.
#define KMOE_CUBLAS_CHECK(call)                                                                  \
  do {                                                                                           \
    const cublasStatus_t kmoe_st_ = (call);                                                      \
    if (kmoe_st_ != CUBLAS_STATUS_SUCCESS)                                                       \
      ::kmoe::core::cuda::detail::throw_cublas(kmoe_st_, #call, __FILE__, __LINE__);             \
  } while (0)
