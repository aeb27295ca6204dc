/// \file kernel_common.hpp
/// \brief What kmoe's kernels share: the accumulation type, the GEMM algorithm switch, shape checks.
///
/// Data layout of every kernel: row-major (Kokkos::LayoutRight) Views in the execution space's memory space.
///   x [T,H] tokens, router G [E,H], W1/W3 [E,F,H], W2 [E,H,F], shared W1/W3 [S,H], shared W2 [H,S],
///   topk_idx [T,k] int64, topk_weight [T,k]; "pair" p = t*k + s names slot s of token t.
#pragma once

#include <kmoe/core/detail/kokkos_compat.hpp>
#include <kmoe/core/error.hpp>

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <type_traits>

namespace kmoe::core {

/// The type softmax and reductions run in: float64 for double data, float32 otherwise (float, bf16-stored weights).
template <class T>
using accum_t = std::conditional_t<std::is_same<std::remove_cv_t<T>, double>::value, double, float>;

/// Which GEMM implementation a kernel uses — the one engine choice of every layer. Auto = the measured-faster one (the
/// BLAS TPL for float/double on host memory; on the bf16 CUDA layer, CUTLASS or cuBLAS by expert size, see
/// docs/kernels.md); Blas = the vendor BLAS (KokkosBlas, cuBLAS); Kokkos = kmoe's own kernel (portable, or the
/// hand-written grouped CUDA kernel of the bf16 layer; parity tests force it); Cutlass = CUTLASS' Hopper grouped
/// GEMMs (the bf16 CUDA layer only, in builds with KMOE_ENABLE_CUTLASS).
enum class GemmAlgo { Auto, Blas, Kokkos, Cutlass };

namespace detail {

/// Compile-time check that V is a rank-R, row-major View.
template <class V, int R>
constexpr void static_check_view() {
  static_assert(Kokkos::is_view<V>::value, "kmoe kernels take Kokkos::View arguments");
  static_assert(static_cast<int>(V::rank) == R, "wrong View rank");
  static_assert(std::is_same<typename V::array_layout, Kokkos::LayoutRight>::value,
                "kmoe kernels take row-major (LayoutRight) Views");
}

/// Throws InputError "<fn>: <what> has extent(<dim>) = <got>, expected <want>" when they differ.
template <class V>
void check_extent(const char* fn, const char* what, const V& v, int dim, std::int64_t want) {
  KMOE_CHECK_INPUT(static_cast<std::int64_t>(v.extent(dim)) == want, fn, ": ", what, " has extent(", dim,
                   ") = ", v.extent(dim), ", expected ", want);
}

/// The logistic sigmoid 1 / (1 + exp(-a)); silu(a) = a * sigmoid(a).
template <class A>
KOKKOS_INLINE_FUNCTION A sigmoid(A a) {
  return A(1) / (A(1) + ::kmoe::detail::exp(-a));
}

}  // namespace detail
}  // namespace kmoe::core
