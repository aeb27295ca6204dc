// How MoeOptions map onto the hand-written CUDA block's settings (MoeLayer<bf16, Kokkos::Cuda>). Kept free of CUDA
// types so that CPU builds compile and test the mapping and its errors (tests/moe/test_moe_layer.cpp).
#pragma once

#include <kmoe/core/expert_options.hpp>
#include <kmoe/core/routing_options.hpp>

#include <cstdint>
#include <string>

namespace kmoe::moe {
struct MoeOptions;  // moe_layer.hpp (which includes this header through <kmoe/moe/cuda/moe_layer.hpp>)
}  // namespace kmoe::moe

namespace kmoe::moe::detail {

/// Rows each expert is padded to on the CUDA padded path (= kmoe::core::cuda::kGemmTileRows; the CUDA source
/// static_asserts that they agree).
inline constexpr std::int64_t kCudaPaddedTileRows = 128;

/// The GEMM engine of the CUDA block; mapped once onto the CUDA primitives' engine in moe/cuda/moe_layer.cpp.
enum class CudaEngine { Auto, Kernel, Cublas, Cutlass };

struct CudaBlockOptions {
  bool padded = false;                   ///< ExpertImpl::Padded: experts padded to 128 rows, else scattered rows
  CudaEngine engine = CudaEngine::Auto;  ///< GemmAlgo Auto -> Auto, Blas -> Cublas, Kokkos -> Kernel, Cutlass -> Cutlass
  bool fuse_swiglu = true;               ///< MoeOptions::fuse_swiglu
  int cublas_streams = 1;                ///< MoeOptions::cublas_streams (1..8)
  bool cublas_grouped = false;           ///< MoeOptions::cublas_grouped
};

/// The CUDA block's settings for `options`. UsageError when options.block does not divide 128 (the padded layout
/// pads to multiples of 128 rows, which is then a multiple of block too) or cublas_streams is outside 1..8.
/// tile_rows is a portable-path knob: unused.
CudaBlockOptions cuda_block_options(const MoeOptions& options);

/// What a block's weights need beyond the math of the bf16 CUDA block (softmax, top-k, renormalise; SwiGLU experts
/// without biases; an ungated shared expert): "" when it runs them, else the list, e.g. "routing: sigmoid, ...; a
/// selection bias". Shared with the portable side so that CPU builds test the refusal.
std::string cuda_block_unsupported(const core::RoutingOptions& routing, const core::ExpertOptions& expert,
                                   bool router_bias, bool score_bias, bool expert_biases, bool shared_gate);

/// The UsageError of check_cuda_block_runs.
[[noreturn]] void throw_cuda_block_unsupported(const std::string& family, const std::string& missing);

/// UsageError naming the family and the variants when the bf16 CUDA block cannot run `w`'s math (its weights carry
/// a routing or expert variant it does not implement): such a model is refused rather than run with the wrong math.
/// check_layer_arguments calls it for every bf16 layer, the CUDA block's constructor included.
template <class W>
void check_cuda_block_runs(const W& w) {
  const std::string missing = cuda_block_unsupported(w.routing, w.expert, w.has_router_bias(), w.has_score_bias(),
                                                     w.has_expert_biases(), w.has_shared_gate());
  if (missing.empty()) return;
  throw_cuda_block_unsupported(w.family, missing);
}

}  // namespace kmoe::moe::detail
