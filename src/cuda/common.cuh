// Shared device helpers of kmoe's .cu files: bf16 <-> fp32, 16-byte vectors, cp.async, warp reductions.
#pragma once

#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/kernels.hpp>

#include <cuda_bf16.h>
#include <cfenv>
#include <cstdint>

namespace kmoe::core::cuda::detail {

/// Eight bf16 values moved as one 16-byte access.
struct alignas(16) Bf16x8 {
  __nv_bfloat162 v[4];
};

__device__ __forceinline__ void unpack8(const Bf16x8& in, float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(in.v[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ Bf16x8 pack8(const float (&in)[8]) {
  Bf16x8 out;
#pragma unroll
  for (int i = 0; i < 4; ++i) out.v[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
  return out;
}

__device__ __forceinline__ float bf16_to_float(bf16_t b) { return __uint_as_float(std::uint32_t(b) << 16); }
__device__ __forceinline__ bf16_t float_to_bf16(float f) {
  const __nv_bfloat16 h = __float2bfloat16_rn(f);
  return *reinterpret_cast<const bf16_t*>(&h);
}

/// cp.async of 16 bytes, of which the first `bytes` come from global memory and the rest are zero-filled
/// (bytes = 0: a zero chunk; gmem is then not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// SwiGLU, one formula for the elementwise kernels (gather_scatter.cu) and the fused GEMM epilogues (grouped_gemm.cu),
/// so fused and unfused results agree bit for bit. act = silu(h1) * h3, silu(a) = a * sigmoid(a).
__device__ __forceinline__ float sigmoidf(float a) { return 1.f / (1.f + __expf(-a)); }
__device__ __forceinline__ float swiglu(float h1, float h3) { return h1 * sigmoidf(h1) * h3; }
/// Backward of swiglu: d1 = d_act * h3 * silu'(h1), d3 = d_act * silu(h1); silu'(a) = s + a s (1 - s).
__device__ __forceinline__ void swiglu_grad(float h1, float h3, float d_act, float& d1, float& d3) {
  const float sg = sigmoidf(h1);
  const float silu = h1 * sg;
  d3 = d_act * silu;
  d1 = d_act * h3 * (sg + silu * (1.f - sg));
}
/// The value a bf16 store of f would read back (round to nearest even): the fused epilogues compute SwiGLU from the
/// rounded GEMM outputs, as the unfused pass does from the stored ones.
__device__ __forceinline__ float round_bf16(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }

inline unsigned grid_for(std::int64_t items, int threads, std::int64_t cap = 1 << 20) {
  std::int64_t b = (items + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b < cap ? b : cap);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace kmoe::core::cuda::detail

namespace kmoe::core::cuda::detail {

/// Holds the host's floating-point exception traps off for its lifetime: cuBLAS' host-side heuristics raise
/// FE_INVALID (seen on the H100 under the test main's feenableexcept), which is not a NaN in kmoe's results.
class HoldFpExceptions {
 public:
  HoldFpExceptions() { feholdexcept(&env_); }
  ~HoldFpExceptions() { fesetenv(&env_); }
  HoldFpExceptions(const HoldFpExceptions&) = delete;
  HoldFpExceptions& operator=(const HoldFpExceptions&) = delete;

 private:
  fenv_t env_;
};

/// The cuBLAS engine of the expert GEMMs (cublas_engine.cu): the semantics of grouped_gemm / grouped_gemm_tn for
/// unindexed rows (a_index, c_index, b_index nullptr), one cublasGemmEx per non-empty group, with the group offsets
/// on the host; `settings` spreads them over side streams or batches them (kernels.hpp, CublasSettings).
void grouped_gemm_cublas(const GroupedGemmArgs& args, const std::vector<std::int64_t>& host_offsets,
                         const CublasSettings& settings, cudaStream_t stream);
void grouped_gemm_tn_cublas(const GroupedGemmTNArgs& args, const std::vector<std::int64_t>& host_offsets,
                            const CublasSettings& settings, cudaStream_t stream);

}  // namespace kmoe::core::cuda::detail
