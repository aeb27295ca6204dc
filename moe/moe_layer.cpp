// The common MoeLayer instantiations, compiled once: float and double on each enabled host execution space.
#include <kmoe/moe/detail/cuda_options.hpp>
#include <kmoe/moe/moe_layer.hpp>

namespace kmoe::moe {

namespace detail {
CudaBlockOptions cuda_block_options(const MoeOptions& options) {
  KMOE_CHECK_USAGE(options.block >= 1 && kCudaPaddedTileRows % options.block == 0,
                   "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>: block = ", options.block, " does not divide ",
                   kCudaPaddedTileRows, " (the CUDA padded path pads each expert to a multiple of ", kCudaPaddedTileRows,
                   " rows)");
  KMOE_CHECK_USAGE(options.cublas_streams >= 1 && options.cublas_streams <= 8,
                   "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>: cublas_streams = ", options.cublas_streams,
                   " outside [1, 8]");
  CudaBlockOptions out;
  out.padded = options.impl == ExpertImpl::Padded;
  switch (options.gemm) {
    case core::GemmAlgo::Auto: out.engine = CudaEngine::Auto; break;
    case core::GemmAlgo::Blas: out.engine = CudaEngine::Cublas; break;
    case core::GemmAlgo::Kokkos: out.engine = CudaEngine::Kernel; break;
    case core::GemmAlgo::Cutlass: out.engine = CudaEngine::Cutlass; break;
  }
  out.fuse_swiglu = options.fuse_swiglu;
  out.cublas_streams = options.cublas_streams;
  out.cublas_grouped = options.cublas_grouped;
  return out;
}

std::string cuda_block_unsupported(const core::RoutingOptions& routing, const core::ExpertOptions& expert,
                                   bool router_bias, bool score_bias, bool expert_biases, bool shared_gate) {
  std::string needs;
  auto add = [&](const std::string& what) { needs += (needs.empty() ? "" : "; ") + what; };
  if (!routing.is_default()) add("routing: " + core::describe(routing));
  if (router_bias) add("a router bias");
  if (score_bias) add("a selection bias");
  if (!expert.is_default()) add("experts: " + core::describe(expert));
  if (expert_biases) add("expert biases");
  if (shared_gate) add("a sigmoid-gated shared expert");
  return needs;
}

void throw_cuda_block_unsupported(const std::string& family, const std::string& missing) {
  const std::string who = family.empty() ? std::string("the weights") : family;
  throw UsageError("kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>: " + who + " need(s) " + missing +
                   ", which the bf16 CUDA block does not run (it runs softmax, top-k, renormalise with SwiGLU experts "
                   "and an ungated shared expert); use the portable layer (MoeLayer<float, Kokkos::Cuda>, or a host "
                   "layer: --precision fp32)");
}
}  // namespace detail

ExpertImpl parse_expert_impl(const std::string& name) {
  if (name == "scatter") return ExpertImpl::Scatter;
  if (name == "padded") return ExpertImpl::Padded;
  throw UsageError("expert implementation '" + name + "' is not one of scatter, padded");
}

#define KMOE_MOE_LAYER_INSTANTIATE(T, SPACE) \
  template class MoeLayer<T, SPACE>;         \
  template MoeWeights<T, SPACE> zeros_like(const MoeWeights<T, SPACE>&);
#ifdef KOKKOS_ENABLE_SERIAL
KMOE_MOE_LAYER_INSTANTIATE(double, Kokkos::Serial)
KMOE_MOE_LAYER_INSTANTIATE(float, Kokkos::Serial)
#endif
#ifdef KOKKOS_ENABLE_OPENMP
KMOE_MOE_LAYER_INSTANTIATE(double, Kokkos::OpenMP)
KMOE_MOE_LAYER_INSTANTIATE(float, Kokkos::OpenMP)
#endif
#ifdef KOKKOS_ENABLE_CUDA
// The portable kernels on the GPU (the reference the hand-written CUDA block is compared with).
KMOE_MOE_LAYER_INSTANTIATE(float, Kokkos::Cuda)
#endif

}  // namespace kmoe::moe
