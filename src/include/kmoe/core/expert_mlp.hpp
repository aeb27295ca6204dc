/// \file expert_mlp.hpp
/// \brief The SwiGLU expert MLP y = W2 (silu(W1 x) * W3 x), forward and backward, in two data paths (and its
/// variants, ExpertExtras: biases on W1/W3/W2 and GPT-OSS's clamped SwiGLU, <kmoe/core/expert_options.hpp>):
///
/// - grouped: rows already grouped by expert in one buffer (expert g owns rows [offsets[g], offsets[g+1])). The
///   MegaBlocks-style path runs it on the padded gather, expert parallelism on the rows an all-to-all delivered, the
///   shared expert on all tokens as one group.
/// - scatter (ScatterMoE-style): reads token rows of x through the dispatch plan; there is no gathered copy of x.
///   The portable version stages tiles of at most `tile_rows` rows through a small buffer so the BLAS can run on them
///   (a fused CUDA kernel loads the rows straight into shared memory instead).
///
/// Saved activations: h1 = x·W1ᵀ (+ b1) and h3 = x·W3ᵀ (+ b3) per row ([rows, F]); the activation is recomputed in
/// the backward.
/// Every function blocks until its outputs are written.
#pragma once

#include <kmoe/core/dispatch_plan.hpp>
#include <kmoe/core/expert_options.hpp>
#include <kmoe/core/gather_scatter.hpp>
#include <kmoe/core/grouped_gemm.hpp>
#include <kmoe/core/kernel_common.hpp>

#include <algorithm>

namespace kmoe::core {

/// act = silu(h1) * h3, elementwise on [R,F].
template <class ExecSpace, class H1V, class H3V, class ActV>
void swiglu_forward(const ExecSpace& space, const H1V& h1, const H3V& h3, const ActV& act) {
  using T = typename ActV::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t rows = act.extent(0), cols = act.extent(1);
  Kokkos::parallel_for(
      "kmoe::swiglu_forward", detail::Range2D<ExecSpace>(space, {0, 0}, {rows, cols}),
      KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) {
        const A a = A(h1(i, j));
        act(i, j) = T(a * detail::sigmoid(a) * A(h3(i, j)));
      });
  space.fence();
}

/// Backward of swiglu_forward: dh1 = dact * h3 * silu'(h1), dh3 = dact * silu(h1). dh1 may alias dact.
template <class ExecSpace, class H1V, class H3V, class DActV, class DH1V, class DH3V>
void swiglu_backward(const ExecSpace& space, const H1V& h1, const H3V& h3, const DActV& dact, const DH1V& dh1,
                     const DH3V& dh3) {
  using T = typename DH1V::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t rows = dh1.extent(0), cols = dh1.extent(1);
  Kokkos::parallel_for(
      "kmoe::swiglu_backward", detail::Range2D<ExecSpace>(space, {0, 0}, {rows, cols}),
      KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) {
        const A a = A(h1(i, j)), sg = detail::sigmoid(a), d = A(dact(i, j));
        dh3(i, j) = T(d * a * sg);
        dh1(i, j) = T(d * A(h3(i, j)) * sg * (A(1) + a * (A(1) - sg)));
      });
  space.fence();
}

/// act = the activation of `options` on [R,F] (swiglu_forward for the default).
template <class ExecSpace, class H1V, class H3V, class ActV>
void swiglu_forward(const ExecSpace& space, const H1V& h1, const H3V& h3, const ActV& act,
                    const ExpertOptions& options) {
  if (options.is_default()) return swiglu_forward(space, h1, h3, act);
  using T = typename ActV::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t rows = act.extent(0), cols = act.extent(1);
  const A limit = A(options.limit), alpha = A(options.alpha), offset = A(options.up_offset);
  Kokkos::parallel_for(
      "kmoe::clamped_swiglu_forward", detail::Range2D<ExecSpace>(space, {0, 0}, {rows, cols}),
      KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) {
        const A a = A(h1(i, j)), b = A(h3(i, j));
        const A g = a < limit ? a : limit;
        const A u = b < -limit ? -limit : b > limit ? limit : b;
        act(i, j) = T((u + offset) * g * detail::sigmoid(alpha * g));
      });
  space.fence();
}

/// Backward of swiglu_forward with `options`. The clamps pass no gradient where they bite (h1 > limit,
/// |h3| > limit; at the limit itself they pass it, as torch.clamp). dh1 may alias dact.
template <class ExecSpace, class H1V, class H3V, class DActV, class DH1V, class DH3V>
void swiglu_backward(const ExecSpace& space, const H1V& h1, const H3V& h3, const DActV& dact, const DH1V& dh1,
                     const DH3V& dh3, const ExpertOptions& options) {
  if (options.is_default()) return swiglu_backward(space, h1, h3, dact, dh1, dh3);
  using T = typename DH1V::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t rows = dh1.extent(0), cols = dh1.extent(1);
  const A limit = A(options.limit), alpha = A(options.alpha), offset = A(options.up_offset);
  Kokkos::parallel_for(
      "kmoe::clamped_swiglu_backward", detail::Range2D<ExecSpace>(space, {0, 0}, {rows, cols}),
      KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) {
        const A a = A(h1(i, j)), b = A(h3(i, j)), d = A(dact(i, j));
        const A g = a < limit ? a : limit;
        const A u = b < -limit ? -limit : b > limit ? limit : b;
        const A sg = detail::sigmoid(alpha * g);
        dh3(i, j) = T(b >= -limit && b <= limit ? d * g * sg : A(0));
        dh1(i, j) = T(a <= limit ? d * (u + offset) * sg * (A(1) + alpha * g * (A(1) - sg)) : A(0));
      });
  space.fence();
}

/// What an expert MLP has beyond W1/W3/W2 and SwiGLU: biases (empty Views = none) and the activation variant.
/// Default-constructed: the plain SwiGLU MLP.
template <class T, class MemSpace>
struct ExpertExtras {
  using bias_matrix = Kokkos::View<const T**, Kokkos::LayoutRight, MemSpace>;
  bias_matrix b1, b3;  ///< [G,F] added to x·W1ᵀ, x·W3ᵀ, or extent 0
  bias_matrix b2;      ///< [G,H] added to the output, or extent 0
  ExpertOptions activation;
};

/// The bias gradients an expert MLP backward writes (overwritten; empty Views = not wanted).
template <class T, class MemSpace>
struct ExpertBiasGrads {
  using matrix = Kokkos::View<T**, Kokkos::LayoutRight, MemSpace>;
  matrix db1, db3;  ///< [G,F]
  matrix db2;       ///< [G,H]
};

namespace detail {
/// m(i, :) += b(g, :) for every row i of m.
template <class ExecSpace, class MV, class BV>
void add_bias_row(const ExecSpace& space, const MV& m, const BV& b, std::int64_t g) {
  using T = typename MV::non_const_value_type;
  const std::int64_t rows = m.extent(0), cols = m.extent(1);
  if (rows == 0) return;
  Kokkos::parallel_for(
      "kmoe::expert_mlp::add_bias", detail::Range2D<ExecSpace>(space, {0, 0}, {rows, cols}),
      KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) { m(i, j) = T(m(i, j) + b(g, j)); });
}

/// db(g, :) (+)= the column sums of d (overwritten unless accumulate).
template <class ExecSpace, class DV, class DBV>
void bias_grad_row(const ExecSpace& space, const DV& d, const DBV& db, std::int64_t g, bool accumulate) {
  using T = typename DBV::non_const_value_type;
  using A = accum_t<T>;
  const std::int64_t rows = d.extent(0), cols = db.extent(1);
  Kokkos::parallel_for(
      "kmoe::expert_mlp::bias_grad", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space, 0, cols),
      KOKKOS_LAMBDA(const std::int64_t j) {
        A sum = accumulate ? A(db(g, j)) : A(0);
        for (std::int64_t i = 0; i < rows; ++i) sum += A(d(i, j));
        db(g, j) = T(sum);
      });
}

/// The rows of group g of a [R, *] matrix.
template <class MV>
auto group_rows(const MV& m, const std::vector<std::int64_t>& offsets, std::size_t g) {
  return Kokkos::subview(m, Kokkos::make_pair(offsets[g], offsets[g + 1]), Kokkos::ALL);
}

/// m(rows of group g, :) += b(g, :) for every group; nothing when b is empty.
template <class ExecSpace, class MV, class BV>
void add_group_bias(const ExecSpace& space, const MV& m, const BV& b, const std::vector<std::int64_t>& offsets) {
  if (b.extent(0) == 0) return;
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g) add_bias_row(space, group_rows(m, offsets, g), b, g);
  space.fence();
}

/// db(g, :) = the column sums of d over group g's rows, every group; nothing when db is empty.
template <class ExecSpace, class DV, class DBV>
void group_bias_grad(const ExecSpace& space, const DV& d, const DBV& db, const std::vector<std::int64_t>& offsets) {
  if (db.extent(0) == 0) return;
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g) bias_grad_row(space, group_rows(d, offsets, g), db, g, false);
  space.fence();
}

template <class T, class MemSpace, class W1V, class W2V>
void check_expert_extras(const char* fn, const ExpertExtras<T, MemSpace>& extras, const W1V& w1, const W2V& w2) {
  const std::int64_t g = w1.extent(0), f = w1.extent(1), h = w2.extent(1);
  auto check = [&](const char* what, const auto& b, std::int64_t cols) {
    if (b.extent(0) == 0) return;
    check_extent(fn, what, b, 0, g);
    check_extent(fn, what, b, 1, cols);
  };
  check("b1", extras.b1, f);
  check("b3", extras.b3, f);
  check("b2", extras.b2, h);
}
template <class T, class MemSpace, class W1V, class W2V>
void check_bias_grads(const char* fn, const ExpertBiasGrads<T, MemSpace>& grads, const W1V& w1, const W2V& w2) {
  const std::int64_t g = w1.extent(0), f = w1.extent(1), h = w2.extent(1);
  auto check = [&](const char* what, const auto& b, std::int64_t cols) {
    if (b.extent(0) == 0) return;
    check_extent(fn, what, b, 0, g);
    check_extent(fn, what, b, 1, cols);
  };
  check("db1", grads.db1, f);
  check("db3", grads.db3, f);
  check("db2", grads.db2, h);
}

template <class V>
using scratch_matrix = Kokkos::View<typename V::non_const_value_type**, Kokkos::LayoutRight, typename V::memory_space>;

template <class ExecSpace, class XV, class W1V, class W3V, class W2V>
void check_expert_weights(const char* fn, const XV& x, const W1V& w1, const W3V& w3, const W2V& w2) {
  static_check_view<XV, 2>();
  static_check_view<W1V, 3>();
  static_check_view<W3V, 3>();
  static_check_view<W2V, 3>();
  const std::int64_t g = w1.extent(0), f = w1.extent(1), h = x.extent(1);
  check_extent(fn, "w1", w1, 2, h);
  check_extent(fn, "w3", w3, 0, g);
  check_extent(fn, "w3", w3, 1, f);
  check_extent(fn, "w3", w3, 2, h);
  check_extent(fn, "w2", w2, 0, g);
  check_extent(fn, "w2", w2, 1, h);
  check_extent(fn, "w2", w2, 2, f);
}
}  // namespace detail

/// Grouped expert MLP forward on rows grouped by expert.
/// \param x        [in] [R,H] rows grouped by expert
/// \param offsets  [in] host, G+1 entries, offsets[G] = R
/// \param w1,w3    [in] [G,F,H]
/// \param w2       [in] [G,H,F]
/// \param h1,h3    [out] [R,F] saved for the backward
/// \param y        [in,out] [R,H]; overwritten unless accumulate_y
/// \param extras   [in] biases ([G,F], [G,F], [G,H]) and the activation variant; default: plain SwiGLU
template <class ExecSpace, class XV, class W1V, class W3V, class W2V, class H1V, class H3V, class YV>
void grouped_mlp_forward(const ExecSpace& space, const XV& x, const std::vector<std::int64_t>& offsets, const W1V& w1,
                         const W3V& w3, const W2V& w2, const H1V& h1, const H3V& h3, const YV& y,
                         bool accumulate_y = false, GemmAlgo algo = GemmAlgo::Auto,
                         const ExpertExtras<typename YV::non_const_value_type, typename ExecSpace::memory_space>&
                             extras = {}) {
  constexpr const char* fn = "kmoe::core::grouped_mlp_forward";
  detail::check_expert_weights<ExecSpace>(fn, x, w1, w3, w2);
  detail::check_expert_extras(fn, extras, w1, w2);
  using T = typename YV::non_const_value_type;
  const std::int64_t rows = x.extent(0), ffn = w1.extent(1);
  KMOE_CHECK_INPUT(!offsets.empty() && offsets.back() == rows, fn, ": offsets end at ",
                   offsets.empty() ? -1 : offsets.back(), " but x has ", rows, " rows");
  detail::check_extent(fn, "h1", h1, 0, rows);
  detail::check_extent(fn, "h1", h1, 1, ffn);
  detail::check_extent(fn, "h3", h3, 0, rows);
  detail::check_extent(fn, "h3", h3, 1, ffn);
  detail::check_extent(fn, "y", y, 0, rows);
  detail::check_extent(fn, "y", y, 1, x.extent(1));
  Kokkos::Profiling::pushRegion("kmoe::grouped_mlp_forward");
  grouped_gemm(space, 'T', T(1), x, w1, offsets, T(0), h1, algo);
  grouped_gemm(space, 'T', T(1), x, w3, offsets, T(0), h3, algo);
  detail::add_group_bias(space, h1, extras.b1, offsets);
  detail::add_group_bias(space, h3, extras.b3, offsets);
  detail::scratch_matrix<YV> act(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::grouped_mlp::act"), rows, ffn);
  swiglu_forward(space, h1, h3, act, extras.activation);
  grouped_gemm(space, 'T', T(1), act, w2, offsets, accumulate_y ? T(1) : T(0), y, algo);
  detail::add_group_bias(space, y, extras.b2, offsets);
  Kokkos::Profiling::popRegion();
}

/// Grouped expert MLP backward.
/// \param dy           [in] [R,H]
/// \param dx           [in,out] [R,H]; overwritten unless accumulate_dx
/// \param dw1,dw3      [out] [G,F,H] (a group without rows gets zero)
/// \param dw2          [out] [G,H,F]
/// \param extras       [in] as the forward ran with
/// \param bias_grads   [out] db1/db3 [G,F], db2 [G,H] (those that are not empty)
template <class ExecSpace, class XV, class W1V, class W3V, class W2V, class H1V, class H3V, class DYV, class DXV,
          class DW1V, class DW3V, class DW2V>
void grouped_mlp_backward(const ExecSpace& space, const XV& x, const std::vector<std::int64_t>& offsets,
                          const W1V& w1, const W3V& w3, const W2V& w2, const H1V& h1, const H3V& h3, const DYV& dy,
                          const DXV& dx, const DW1V& dw1, const DW3V& dw3, const DW2V& dw2, bool accumulate_dx = false,
                          GemmAlgo algo = GemmAlgo::Auto,
                          const ExpertExtras<typename DXV::non_const_value_type, typename ExecSpace::memory_space>&
                              extras = {},
                          const ExpertBiasGrads<typename DXV::non_const_value_type, typename ExecSpace::memory_space>&
                              bias_grads = {}) {
  constexpr const char* fn = "kmoe::core::grouped_mlp_backward";
  detail::check_expert_weights<ExecSpace>(fn, x, w1, w3, w2);
  detail::check_expert_extras(fn, extras, w1, w2);
  detail::check_bias_grads(fn, bias_grads, w1, w2);
  using T = typename DXV::non_const_value_type;
  const std::int64_t rows = x.extent(0), ffn = w1.extent(1), hidden = x.extent(1);
  KMOE_CHECK_INPUT(!offsets.empty() && offsets.back() == rows, fn, ": offsets end at ",
                   offsets.empty() ? -1 : offsets.back(), " but x has ", rows, " rows");
  detail::check_extent(fn, "dy", dy, 0, rows);
  detail::check_extent(fn, "dy", dy, 1, hidden);
  detail::check_extent(fn, "dx", dx, 0, rows);
  detail::check_extent(fn, "dx", dx, 1, hidden);
  Kokkos::Profiling::pushRegion("kmoe::grouped_mlp_backward");
  detail::scratch_matrix<DXV> a(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::grouped_mlp::a"), rows, ffn);
  detail::scratch_matrix<DXV> b(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::grouped_mlp::b"), rows, ffn);
  swiglu_forward(space, h1, h3, a, extras.activation);                    // a = act
  grouped_gemm_tn(space, T(1), dy, a, offsets, T(0), dw2, algo);          // dW2 = dYᵀ·act
  detail::group_bias_grad(space, dy, bias_grads.db2, offsets);            // db2 = column sums of dY
  grouped_gemm(space, 'N', T(1), dy, w2, offsets, T(0), b, algo);         // b = dact = dY·W2
  swiglu_backward(space, h1, h3, b, b, a, extras.activation);             // b = dh1, a = dh3
  grouped_gemm_tn(space, T(1), b, x, offsets, T(0), dw1, algo);           // dW1 = dh1ᵀ·X
  grouped_gemm_tn(space, T(1), a, x, offsets, T(0), dw3, algo);           // dW3 = dh3ᵀ·X
  detail::group_bias_grad(space, b, bias_grads.db1, offsets);
  detail::group_bias_grad(space, a, bias_grads.db3, offsets);
  grouped_gemm(space, 'N', T(1), b, w1, offsets, accumulate_dx ? T(1) : T(0), dx, algo);
  grouped_gemm(space, 'N', T(1), a, w3, offsets, T(1), dx, algo);
  Kokkos::Profiling::popRegion();
}

/// Default rows per staged tile of the scatter path: big enough for BLAS efficiency, small enough to stay in cache.
constexpr std::int64_t kScatterTileRows = 256;

/// ScatterMoE-style expert MLP forward: the W1/W3 GEMMs read x's token rows through the plan.
/// \param x     [in] [T,H] tokens (token order)
/// \param plan  [in] the routing's dispatch plan
/// \param w1,w3 [in] [E,F,H]; w2 [in] [E,H,F]
/// \param h1,h3 [out] [T*k,F] in expert (row) order, saved for the backward
/// \param ye    [out] [T*k,H] expert outputs in row order (combine with padded_scatter over plan.pair_row)
/// \param extras [in] biases and the activation variant; default: plain SwiGLU
template <class ExecSpace, class XV, class W1V, class W3V, class W2V, class H1V, class H3V, class YEV>
void scatter_mlp_forward(const ExecSpace& space, const XV& x, const DispatchPlan<typename ExecSpace::memory_space>& plan,
                         const W1V& w1, const W3V& w3, const W2V& w2, const H1V& h1, const H3V& h3, const YEV& ye,
                         GemmAlgo algo = GemmAlgo::Auto, std::int64_t tile_rows = kScatterTileRows,
                         const ExpertExtras<typename YEV::non_const_value_type, typename ExecSpace::memory_space>&
                             extras = {}) {
  constexpr const char* fn = "kmoe::core::scatter_mlp_forward";
  detail::check_expert_weights<ExecSpace>(fn, x, w1, w3, w2);
  detail::check_expert_extras(fn, extras, w1, w2);
  const bool has_b1 = extras.b1.extent(0) != 0, has_b3 = extras.b3.extent(0) != 0, has_b2 = extras.b2.extent(0) != 0;
  using T = typename YEV::non_const_value_type;
  const std::int64_t rows = plan.num_rows(), ffn = w1.extent(1), hidden = x.extent(1), k = plan.top_k;
  detail::check_extent(fn, "x", x, 0, plan.num_tokens);
  detail::check_extent(fn, "w1", w1, 0, plan.num_experts);
  detail::check_extent(fn, "h1", h1, 0, rows);
  detail::check_extent(fn, "h3", h3, 0, rows);
  detail::check_extent(fn, "ye", ye, 0, rows);
  detail::check_extent(fn, "ye", ye, 1, hidden);
  Kokkos::Profiling::pushRegion("kmoe::scatter_mlp_forward[kokkos]");
  const std::int64_t tile = std::max<std::int64_t>(1, std::min(tile_rows, rows));
  detail::scratch_matrix<YEV> xt(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::scatter_mlp::xt"), tile, hidden);
  detail::scratch_matrix<YEV> at(Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::scatter_mlp::at"), tile, ffn);
  const auto row_pair = plan.row_pair;
  const auto all = Kokkos::ALL;
  for (std::int64_t e = 0; e < plan.num_experts; ++e) {
    for (std::int64_t r0 = plan.offsets_host[e]; r0 < plan.offsets_host[e + 1]; r0 += tile) {
      const std::int64_t n = std::min(tile, plan.offsets_host[e + 1] - r0);
      const auto rows_r = Kokkos::make_pair(r0, r0 + n);
      const auto tile_r = Kokkos::make_pair(std::int64_t(0), n);
      Kokkos::parallel_for(
          "kmoe::scatter_mlp::load_rows", detail::Range2D<ExecSpace>(space, {0, 0}, {n, hidden}),
          KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) { xt(i, j) = T(x(row_pair(r0 + i) / k, j)); });
      const auto xt_n = Kokkos::subview(xt, tile_r, all);
      const auto h1_n = Kokkos::subview(h1, rows_r, all);
      const auto h3_n = Kokkos::subview(h3, rows_r, all);
      const auto at_n = Kokkos::subview(at, tile_r, all);
      gemm(space, 'N', 'T', T(1), xt_n, Kokkos::subview(w1, e, all, all), T(0), h1_n, algo);
      gemm(space, 'N', 'T', T(1), xt_n, Kokkos::subview(w3, e, all, all), T(0), h3_n, algo);
      if (has_b1) detail::add_bias_row(space, h1_n, extras.b1, e);
      if (has_b3) detail::add_bias_row(space, h3_n, extras.b3, e);
      swiglu_forward(space, h1_n, h3_n, at_n, extras.activation);
      const auto ye_n = Kokkos::subview(ye, rows_r, all);
      gemm(space, 'N', 'T', T(1), at_n, Kokkos::subview(w2, e, all, all), T(0), ye_n, algo);
      if (has_b2) {
        detail::add_bias_row(space, ye_n, extras.b2, e);
        space.fence();
      }
    }
  }
  Kokkos::Profiling::popRegion();
}

/// ScatterMoE-style expert MLP backward (the combine's backward fused in: no gathered copy of dy either).
/// \param topk_weight   [in] [T,k]
/// \param dy            [in] [T,H] gradient of the combined output
/// \param ye            [in] [T*k,H] the forward's expert outputs (for d_topk_weight)
/// \param dx            [in,out] [T,H] accumulated into (zero it first for a fresh gradient)
/// \param dw1,dw3       [out] [E,F,H]; dw2 [out] [E,H,F]; an expert without rows gets zero
/// \param d_topk_weight [out] [T,k]
/// \param extras        [in] as the forward ran with
/// \param bias_grads    [out] db1/db3 [E,F], db2 [E,H] (those that are not empty; an expert without rows gets zero)
template <class ExecSpace, class XV, class WV, class DYV, class W1V, class W3V, class W2V, class H1V, class H3V,
          class YEV, class DXV, class DW1V, class DW3V, class DW2V, class DWV>
void scatter_mlp_backward(const ExecSpace& space, const XV& x,
                          const DispatchPlan<typename ExecSpace::memory_space>& plan, const WV& topk_weight,
                          const DYV& dy, const W1V& w1, const W3V& w3, const W2V& w2, const H1V& h1, const H3V& h3,
                          const YEV& ye, const DXV& dx, const DW1V& dw1, const DW3V& dw3, const DW2V& dw2,
                          const DWV& d_topk_weight, GemmAlgo algo = GemmAlgo::Auto,
                          std::int64_t tile_rows = kScatterTileRows,
                          const ExpertExtras<typename DXV::non_const_value_type, typename ExecSpace::memory_space>&
                              extras = {},
                          const ExpertBiasGrads<typename DXV::non_const_value_type, typename ExecSpace::memory_space>&
                              bias_grads = {}) {
  constexpr const char* fn = "kmoe::core::scatter_mlp_backward";
  detail::check_expert_weights<ExecSpace>(fn, x, w1, w3, w2);
  detail::check_expert_extras(fn, extras, w1, w2);
  detail::check_bias_grads(fn, bias_grads, w1, w2);
  const auto& db1 = bias_grads.db1;
  const auto& db3 = bias_grads.db3;
  const auto& db2 = bias_grads.db2;
  const bool has_db1 = db1.extent(0) != 0, has_db3 = db3.extent(0) != 0, has_db2 = db2.extent(0) != 0;
  using T = typename DXV::non_const_value_type;
  const std::int64_t rows = plan.num_rows(), ffn = w1.extent(1), hidden = x.extent(1), k = plan.top_k;
  detail::check_extent(fn, "x", x, 0, plan.num_tokens);
  detail::check_extent(fn, "dy", dy, 0, plan.num_tokens);
  detail::check_extent(fn, "dx", dx, 0, plan.num_tokens);
  detail::check_extent(fn, "h1", h1, 0, rows);
  detail::check_extent(fn, "ye", ye, 0, rows);
  Kokkos::Profiling::pushRegion("kmoe::scatter_mlp_backward[kokkos]");
  detail::pair_dot(space, dy, ye, plan.pair_row, d_topk_weight);
  const std::int64_t tile = std::max<std::int64_t>(1, std::min(tile_rows, rows));
  using M = detail::scratch_matrix<DXV>;
  const auto no_init = Kokkos::WithoutInitializing;
  M xt(Kokkos::view_alloc(no_init, "kmoe::scatter_mlp::xt"), tile, hidden);
  M gt(Kokkos::view_alloc(no_init, "kmoe::scatter_mlp::dyt"), tile, hidden);  // w * dy rows, then dx rows
  M at(Kokkos::view_alloc(no_init, "kmoe::scatter_mlp::at"), tile, ffn);      // act, then dh3
  M bt(Kokkos::view_alloc(no_init, "kmoe::scatter_mlp::bt"), tile, ffn);      // dact, then dh1
  const auto row_pair = plan.row_pair;
  const auto all = Kokkos::ALL;
  for (std::int64_t e = 0; e < plan.num_experts; ++e) {
    const auto dw1_e = Kokkos::subview(dw1, e, all, all);
    const auto dw3_e = Kokkos::subview(dw3, e, all, all);
    const auto dw2_e = Kokkos::subview(dw2, e, all, all);
    if (plan.offsets_host[e] == plan.offsets_host[e + 1]) {
      Kokkos::deep_copy(space, dw1_e, T(0));
      Kokkos::deep_copy(space, dw3_e, T(0));
      Kokkos::deep_copy(space, dw2_e, T(0));
      if (has_db1) Kokkos::deep_copy(space, Kokkos::subview(db1, e, all), T(0));
      if (has_db3) Kokkos::deep_copy(space, Kokkos::subview(db3, e, all), T(0));
      if (has_db2) Kokkos::deep_copy(space, Kokkos::subview(db2, e, all), T(0));
      continue;
    }
    for (std::int64_t r0 = plan.offsets_host[e]; r0 < plan.offsets_host[e + 1]; r0 += tile) {
      const std::int64_t n = std::min(tile, plan.offsets_host[e + 1] - r0);
      const T beta = r0 == plan.offsets_host[e] ? T(0) : T(1);
      const auto rows_r = Kokkos::make_pair(r0, r0 + n);
      const auto tile_r = Kokkos::make_pair(std::int64_t(0), n);
      Kokkos::parallel_for(
          "kmoe::scatter_mlp::load_rows", detail::Range2D<ExecSpace>(space, {0, 0}, {n, hidden}),
          KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) {
            const std::int64_t p = row_pair(r0 + i), t = p / k;
            xt(i, j) = T(x(t, j));
            gt(i, j) = T(topk_weight(t, p % k) * dy(t, j));
          });
      const auto xt_n = Kokkos::subview(xt, tile_r, all);
      const auto gt_n = Kokkos::subview(gt, tile_r, all);
      const auto at_n = Kokkos::subview(at, tile_r, all);
      const auto bt_n = Kokkos::subview(bt, tile_r, all);
      const auto h1_n = Kokkos::subview(h1, rows_r, all);
      const auto h3_n = Kokkos::subview(h3, rows_r, all);
      const bool first_tile = r0 == plan.offsets_host[e];
      swiglu_forward(space, h1_n, h3_n, at_n, extras.activation);
      gemm(space, 'T', 'N', T(1), gt_n, at_n, beta, dw2_e, algo);
      if (has_db2) detail::bias_grad_row(space, gt_n, db2, e, !first_tile);
      gemm(space, 'N', 'N', T(1), gt_n, Kokkos::subview(w2, e, all, all), T(0), bt_n, algo);
      swiglu_backward(space, h1_n, h3_n, bt_n, bt_n, at_n, extras.activation);
      gemm(space, 'T', 'N', T(1), bt_n, xt_n, beta, dw1_e, algo);
      gemm(space, 'T', 'N', T(1), at_n, xt_n, beta, dw3_e, algo);
      if (has_db1) detail::bias_grad_row(space, bt_n, db1, e, !first_tile);
      if (has_db3) detail::bias_grad_row(space, at_n, db3, e, !first_tile);
      if (has_db1 || has_db2 || has_db3) space.fence();
      gemm(space, 'N', 'N', T(1), bt_n, Kokkos::subview(w1, e, all, all), T(0), gt_n, algo);
      gemm(space, 'N', 'N', T(1), at_n, Kokkos::subview(w3, e, all, all), T(1), gt_n, algo);
      // A token picks an expert at most once, so the rows of one expert name distinct tokens: no race.
      Kokkos::parallel_for(
          "kmoe::scatter_mlp::store_dx", detail::Range2D<ExecSpace>(space, {0, 0}, {n, hidden}),
          KOKKOS_LAMBDA(const std::int64_t i, const std::int64_t j) { dx(row_pair(r0 + i) / k, j) += gt(i, j); });
      space.fence();
    }
  }
  Kokkos::Profiling::popRegion();
}

}  // namespace kmoe::core
