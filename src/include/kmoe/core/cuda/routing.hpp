/// \file routing.hpp
/// \brief The CUDA backend of kmoe::core::routing_forward: an overload on Kokkos::Cuda for bf16 tokens
/// and router weights with fp32 logits/probs/weights, running kmoe's fused CUDA routing kernel.
/// Other value types on Cuda, and GemmAlgo::Kokkos (the parity switch), take the portable implementation.
/// <kmoe/core/routing.hpp> includes this header in CUDA builds, so callers get the overload without asking for it.
#pragma once

#include <kmoe/core/bf16.hpp>
#include <kmoe/core/kernel_common.hpp>
#include <kmoe/core/routing.hpp>

#include <Kokkos_Core.hpp>
#include <cuda_runtime_api.h>
#include <cstdint>
#include <type_traits>

namespace kmoe::core::cuda {
/// The fused routing primitive this overload runs (src/cuda/routing.cu). It belongs to kmoe's raw-pointer CUDA API
/// (<kmoe/core/cuda/kernels.hpp>), which is internal and not installed; this declaration is the one entry point the
/// installed overload needs (bf16 passed as its 16-bit pattern). Enqueued on `stream`, returns without waiting.
void routing_forward(const std::uint16_t* x, const std::uint16_t* gate, std::int64_t tokens, int hidden, int experts,
                     int k, float* logits, float* probs, std::int64_t* topk_idx, float* topk_weight,
                     cudaStream_t stream);
}  // namespace kmoe::core::cuda

namespace kmoe::core {

namespace detail {
template <class V, class T>
constexpr bool value_is = std::is_same<typename V::non_const_value_type, T>::value;
}  // namespace detail

/// Routing forward on the GPU (bf16 x and gate, fp32 outputs): logits on the tensor cores, then softmax → top-k →
/// renormalise fused in one warp per token. Same contract as the portable version: blocks until the outputs are
/// written (fences `space`). GemmAlgo::Kokkos forces the portable implementation on the same space.
template <class XV, class GV, class LV, class PV, class IV, class WV,
          std::enable_if_t<detail::value_is<XV, bf16> && detail::value_is<GV, bf16> && detail::value_is<LV, float> &&
                               detail::value_is<PV, float> && detail::value_is<WV, float>,
                           int> = 0>
void routing_forward(const Kokkos::Cuda& space, const XV& x, const GV& gate, const LV& logits, const PV& probs,
                     const IV& topk_idx, const WV& topk_weight, GemmAlgo algo = GemmAlgo::Auto) {
  if (algo == GemmAlgo::Kokkos) {
    // Explicit arguments name the portable template (this overload's parameters cannot take them).
    routing_forward<Kokkos::Cuda, XV, GV, LV, PV, IV, WV>(space, x, gate, logits, probs, topk_idx, topk_weight, algo);
    return;
  }
  detail::static_check_view<XV, 2>();
  detail::static_check_view<GV, 2>();
  detail::static_check_view<LV, 2>();
  detail::static_check_view<PV, 2>();
  detail::static_check_view<IV, 2>();
  detail::static_check_view<WV, 2>();
  static_assert(detail::value_is<IV, std::int64_t>, "topk_idx holds int64");
  const std::int64_t tokens = x.extent(0), hidden = x.extent(1), experts = gate.extent(0), k = topk_idx.extent(1);
  constexpr const char* fn = "kmoe::core::routing_forward[cuda]";
  detail::check_extent(fn, "gate", gate, 1, hidden);
  detail::check_extent(fn, "logits", logits, 0, tokens);
  detail::check_extent(fn, "logits", logits, 1, experts);
  detail::check_extent(fn, "probs", probs, 0, tokens);
  detail::check_extent(fn, "probs", probs, 1, experts);
  detail::check_extent(fn, "topk_idx", topk_idx, 0, tokens);
  detail::check_extent(fn, "topk_weight", topk_weight, 0, tokens);
  detail::check_extent(fn, "topk_weight", topk_weight, 1, k);
  static_assert(sizeof(bf16) == sizeof(std::uint16_t), "kmoe::bf16 is the bf16 bit pattern");
  KMOE_CHECK_INPUT(x.span_is_contiguous() && gate.span_is_contiguous() && logits.span_is_contiguous() &&
                       probs.span_is_contiguous() && topk_idx.span_is_contiguous() && topk_weight.span_is_contiguous(),
                   fn, ": the CUDA kernels take contiguous row-major Views");
  KMOE_CHECK_INPUT(hidden % 8 == 0, fn, ": hidden ", hidden, " is not a multiple of 8 (the CUDA kernels read 16-byte rows)");
  Kokkos::Profiling::pushRegion("kmoe::route[cuda]");
  cuda::routing_forward(reinterpret_cast<const std::uint16_t*>(x.data()), reinterpret_cast<const std::uint16_t*>(gate.data()),
                        tokens, static_cast<int>(hidden), static_cast<int>(experts), static_cast<int>(k), logits.data(),
                        probs.data(), topk_idx.data(), topk_weight.data(), space.cuda_stream());
  space.fence();
  Kokkos::Profiling::popRegion();
}

}  // namespace kmoe::core
