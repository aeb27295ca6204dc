// How MoeOptions map onto the hand-written CUDA block's settings (MoeLayer<bf16, Kokkos::Cuda>). Kept free of CUDA
// types so that CPU builds compile and test the mapping and its errors (tests/moe/test_moe_layer.cpp).
#pragma once

#include <cstdint>

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

}  // namespace kmoe::moe::detail
