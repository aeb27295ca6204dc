/// \file grouped_gemm.hpp
/// \brief Dense and grouped (per-expert) GEMMs on row-major Views: KokkosBlas::gemm (BLAS TPL) or kmoe's own kernel.
///
/// A group g owns rows [offsets[g], offsets[g+1]) of the row-stacked operands; offsets live on the host (the loop over
/// groups runs there, one GEMM per non-empty group). All calls block: they return when C is written (the BLAS runs on
/// the calling thread after a fence of `space`; the Kokkos kernel is followed by a fence).
/// Which one Auto picks and why: docs/kernels.md (BLAS: ~20x faster than the portable kernel on the CPU).
#pragma once

#include <kmoe/core/kernel_common.hpp>

#include <KokkosBlas3_gemm.hpp>
#include <climits>
#include <vector>

namespace kmoe::core {

namespace detail {

/// The portable GEMM: one thread per element of C, a dot product over K in the accumulation type.
/// Correct on every backend; not tuned (the BLAS is the fast path on the CPU).
template <bool TA, bool TB, class AV, class BV, class CV>
struct KokkosGemmFunctor {
  using T = typename CV::non_const_value_type;
  using A = accum_t<T>;
  AV a;
  BV b;
  CV c;
  T alpha, beta;
  std::int64_t k;
  KOKKOS_INLINE_FUNCTION void operator()(const std::int64_t i, const std::int64_t j) const {
    A sum = 0;
    for (std::int64_t l = 0; l < k; ++l) {
      const A av = TA ? A(a(l, i)) : A(a(i, l));
      const A bv = TB ? A(b(j, l)) : A(b(l, j));
      sum += av * bv;
    }
    // beta == 0 must not read C: it may hold uninitialised memory (NaN bit patterns).
    c(i, j) = beta == T(0) ? T(A(alpha) * sum) : T(A(alpha) * sum + A(beta) * A(c(i, j)));
  }
};

template <bool TA, bool TB, class ExecSpace, class AV, class BV, class CV>
void kokkos_gemm_impl(const ExecSpace& space, typename CV::non_const_value_type alpha, const AV& a, const BV& b,
                      typename CV::non_const_value_type beta, const CV& c, std::int64_t k) {
  using Policy = Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>, Kokkos::IndexType<std::int64_t>>;
  const std::int64_t m = c.extent(0), n = c.extent(1);
  Kokkos::parallel_for("kmoe::gemm[kokkos]", Policy(space, {0, 0}, {m, n}),
                       KokkosGemmFunctor<TA, TB, AV, BV, CV>{a, b, c, alpha, beta, k});
}

inline bool is_trans(char t) { return t == 'T' || t == 't'; }

}  // namespace detail

/// C = alpha * op(A) * op(B) + beta * C on row-major 2-D Views (op = transpose when trans is 'T').
/// beta == 0 never reads C. Blocks until C is written.
/// \param space   [in] execution space instance the work runs on
/// \param trans_a [in] 'N' or 'T'
/// \param trans_b [in] 'N' or 'T'
/// \param alpha   [in] scale of the product
/// \param a       [in] op(A) is [M,K]
/// \param b       [in] op(B) is [K,N]
/// \param beta    [in] scale of the old C
/// \param c       [in,out] [M,N]
/// \param algo    [in] Blas (KokkosBlas::gemm: the BLAS TPL on the host), Kokkos (portable kernel), Auto (Blas)
template <class ExecSpace, class AV, class BV, class CV>
void gemm(const ExecSpace& space, char trans_a, char trans_b, typename CV::non_const_value_type alpha, const AV& a,
          const BV& b, typename CV::non_const_value_type beta, const CV& c, GemmAlgo algo = GemmAlgo::Auto) {
  detail::static_check_view<AV, 2>();
  detail::static_check_view<BV, 2>();
  detail::static_check_view<CV, 2>();
  using T = typename CV::non_const_value_type;
  const bool ta = detail::is_trans(trans_a), tb = detail::is_trans(trans_b);
  const std::int64_t m = ta ? a.extent(1) : a.extent(0);
  const std::int64_t k = ta ? a.extent(0) : a.extent(1);
  const std::int64_t kb = tb ? b.extent(1) : b.extent(0);
  const std::int64_t n = tb ? b.extent(0) : b.extent(1);
  KMOE_CHECK_INPUT(m == static_cast<std::int64_t>(c.extent(0)) && n == static_cast<std::int64_t>(c.extent(1)) && k == kb,
                   "kmoe::core::gemm: op(A) is [", m, ",", k, "], op(B) is [", kb, ",", n, "], C is [", c.extent(0), ",",
                   c.extent(1), "]");
  if (m == 0 || n == 0) return;
  // The BLAS needs A, B and C of one float/double type (bf16 operands with a float C take the portable kernel);
  // `if constexpr` keeps KokkosBlas::gemm from being instantiated for the others.
  constexpr bool blas_type = (std::is_same<T, float>::value || std::is_same<T, double>::value) &&
                             std::is_same<typename AV::non_const_value_type, T>::value &&
                             std::is_same<typename BV::non_const_value_type, T>::value;
  const bool use_blas = blas_type && algo != GemmAlgo::Kokkos && k > 0;
  if constexpr (blas_type) if (use_blas) {
    // The BLAS takes int sizes and leading dimensions.
    KMOE_CHECK_INPUT(m < INT_MAX && n < INT_MAX && k < INT_MAX && a.stride(0) < INT_MAX && b.stride(0) < INT_MAX &&
                         c.stride(0) < INT_MAX,
                     "kmoe::core::gemm: [", m, ",", n, ",", k, "] exceeds the BLAS' 32-bit sizes");
    space.fence();  // the BLAS runs on the calling thread: earlier kernels on `space` must be done
    Kokkos::Profiling::pushRegion("kmoe::gemm[blas]");
    const char tas[2] = {ta ? 'T' : 'N', 0}, tbs[2] = {tb ? 'T' : 'N', 0};
    KokkosBlas::gemm(tas, tbs, alpha, a, b, beta, c);
    Kokkos::Profiling::popRegion();
    return;
  }
  // k == 0 included: the BLAS wrapper would leave C untouched, the portable kernel writes beta * C.
  if (ta && tb) detail::kokkos_gemm_impl<true, true>(space, alpha, a, b, beta, c, k);
  else if (ta) detail::kokkos_gemm_impl<true, false>(space, alpha, a, b, beta, c, k);
  else if (tb) detail::kokkos_gemm_impl<false, true>(space, alpha, a, b, beta, c, k);
  else detail::kokkos_gemm_impl<false, false>(space, alpha, a, b, beta, c, k);
  space.fence();
}

/// gemm on the default instance of ExecSpace.
template <class ExecSpace = Kokkos::DefaultExecutionSpace, class AV, class BV, class CV>
void gemm(char trans_a, char trans_b, typename CV::non_const_value_type alpha, const AV& a, const BV& b,
          typename CV::non_const_value_type beta, const CV& c, GemmAlgo algo = GemmAlgo::Auto) {
  gemm(ExecSpace(), trans_a, trans_b, alpha, a, b, beta, c, algo);
}

namespace detail {
inline void check_offsets(const char* fn, const std::vector<std::int64_t>& offsets, std::int64_t groups,
                          std::int64_t rows) {
  KMOE_CHECK_INPUT(static_cast<std::int64_t>(offsets.size()) == groups + 1, fn, ": ", offsets.size(),
                   " offsets for ", groups, " groups (expected ", groups + 1, ")");
  KMOE_CHECK_INPUT(offsets.front() == 0 && offsets.back() <= rows, fn, ": offsets span [", offsets.front(), ",",
                   offsets.back(), ") but there are ", rows, " rows");
  for (std::int64_t g = 0; g < groups; ++g)
    KMOE_CHECK_INPUT(offsets[g] <= offsets[g + 1], fn, ": offsets decrease at group ", g);
}
}  // namespace detail

/// Grouped GEMM over row blocks: for each group g, C[rows_g] = alpha * A[rows_g] * op(B[g]) + beta * C[rows_g].
/// With trans_b = 'T' and B = W1 [G,F,H] this is the expert up-projection x·W1ᵀ; with 'N' and B = W2 [G,H,F] the
/// backward dY·W2. Rows past offsets[G] are not touched.
/// \param a       [in] [R,K] rows grouped by expert
/// \param b       [in] [G,N,K] (trans_b 'T') or [G,K,N] (trans_b 'N')
/// \param offsets [in] host, G+1 entries, offsets[0] = 0, nondecreasing
/// \param c       [in,out] [R,N]
template <class ExecSpace, class AV, class BV, class CV>
void grouped_gemm(const ExecSpace& space, char trans_b, typename CV::non_const_value_type alpha, const AV& a,
                  const BV& b, const std::vector<std::int64_t>& offsets, typename CV::non_const_value_type beta,
                  const CV& c, GemmAlgo algo = GemmAlgo::Auto) {
  detail::static_check_view<BV, 3>();
  const std::int64_t groups = b.extent(0);
  detail::check_offsets("kmoe::core::grouped_gemm", offsets, groups, a.extent(0));
  KMOE_CHECK_INPUT(a.extent(0) == c.extent(0), "kmoe::core::grouped_gemm: A has ", a.extent(0), " rows, C has ",
                   c.extent(0));
  for (std::int64_t g = 0; g < groups; ++g) {
    if (offsets[g + 1] == offsets[g]) continue;
    const auto rows = Kokkos::make_pair(offsets[g], offsets[g + 1]);
    gemm(space, 'N', trans_b, alpha, Kokkos::subview(a, rows, Kokkos::ALL), Kokkos::subview(b, g, Kokkos::ALL, Kokkos::ALL),
         beta, Kokkos::subview(c, rows, Kokkos::ALL), algo);
  }
}

/// Grouped weight-gradient GEMM: for each group g, C[g] = alpha * A[rows_g]ᵀ * B[rows_g] + beta * C[g].
/// A group without rows gets C[g] = beta * C[g] (zero when beta = 0).
/// \param a       [in] [R,M]
/// \param b       [in] [R,N]
/// \param offsets [in] host, G+1 entries
/// \param c       [in,out] [G,M,N]
template <class ExecSpace, class AV, class BV, class CV>
void grouped_gemm_tn(const ExecSpace& space, typename CV::non_const_value_type alpha, const AV& a, const BV& b,
                     const std::vector<std::int64_t>& offsets, typename CV::non_const_value_type beta, const CV& c,
                     GemmAlgo algo = GemmAlgo::Auto) {
  detail::static_check_view<CV, 3>();
  const std::int64_t groups = c.extent(0);
  detail::check_offsets("kmoe::core::grouped_gemm_tn", offsets, groups, a.extent(0));
  KMOE_CHECK_INPUT(a.extent(0) == b.extent(0), "kmoe::core::grouped_gemm_tn: A has ", a.extent(0), " rows, B has ",
                   b.extent(0));
  for (std::int64_t g = 0; g < groups; ++g) {
    const auto rows = Kokkos::make_pair(offsets[g], offsets[g + 1]);
    gemm(space, 'T', 'N', alpha, Kokkos::subview(a, rows, Kokkos::ALL), Kokkos::subview(b, rows, Kokkos::ALL), beta,
         Kokkos::subview(c, g, Kokkos::ALL, Kokkos::ALL), algo);
  }
}

}  // namespace kmoe::core
