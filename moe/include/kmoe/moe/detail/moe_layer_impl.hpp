// MoeLayer's implementation (included by moe_layer.hpp). The common instantiations (float/double on Serial and
// OpenMP) are compiled once in moe/moe_layer.cpp; the extern declarations at the end keep other files from redoing it.
#pragma once

#include <kmoe/core/gather_scatter.hpp>
#include <kmoe/core/routing.hpp>
#include <kmoe/moe/detail/cuda_options.hpp>

#include <string>
#include <typeinfo>
#include <utility>

namespace kmoe::moe {

namespace detail {
template <class V>
V alloc_like(const char* name, const V& like) {
  return V(std::string(name), like.layout());
}
template <class V>
V uninit(const char* name, std::int64_t n0, std::int64_t n1) {
  return V(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(name)), n0, n1);
}
/// A [S,H] matrix seen as a one-group [1,S,H] tensor (no copy).
template <class M>
auto as_one_group(const M& m) {
  using T = typename M::value_type;
  using V3 = Kokkos::View<T***, Kokkos::LayoutRight, typename M::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  KMOE_ASSERT(m.span_is_contiguous(), "shared expert weights must be contiguous");
  return V3(m.data(), 1, m.extent(0), m.extent(1));
}
}  // namespace detail

template <class T, class ExecSpace>
MoeWeights<T, ExecSpace> zeros_like(const MoeWeights<T, ExecSpace>& like) {
  MoeWeights<T, ExecSpace> z;
  for_each_weight_pair(z, like, [](auto& out, const auto& in, const char* name) {
    out = detail::alloc_like(("kmoe::grad::" + std::string(name)).c_str(), in);
  });
  z.first_expert = like.first_expert;
  return z;
}

namespace detail {
/// The constructor's checks, shared by every backend: weight shapes consistent, top_k, block, tile_rows in range.
template <class T, class ExecSpace>
void check_layer_arguments(const MoeWeights<T, ExecSpace>& w, const MoeOptions& options) {
  constexpr const char* fn = "kmoe::moe::MoeLayer";
  const std::int64_t h = w.hidden(), e = w.num_experts(), el = w.num_local_experts(), f = w.ffn();
  KMOE_CHECK_INPUT(h > 0 && e > 0, fn, ": router is [", e, ",", h, "], expected [experts, hidden] with both > 0");
  KMOE_CHECK_INPUT(el > 0 && f > 0, fn, ": w1 is [", el, ",", f, ",", w.w1.extent(2), "], expected [experts, ffn, hidden]");
  KMOE_CHECK_INPUT(w.first_expert >= 0 && w.first_expert + el <= e, fn, ": local experts [", w.first_expert, ",",
                   w.first_expert + el, ") outside the router's ", e, " experts");
  core::detail::check_extent(fn, "w1", w.w1, 2, h);
  core::detail::check_extent(fn, "w3", w.w3, 0, el);
  core::detail::check_extent(fn, "w3", w.w3, 1, f);
  core::detail::check_extent(fn, "w3", w.w3, 2, h);
  core::detail::check_extent(fn, "w2", w.w2, 0, el);
  core::detail::check_extent(fn, "w2", w.w2, 1, h);
  core::detail::check_extent(fn, "w2", w.w2, 2, f);
  if (w.has_shared()) {
    const std::int64_t s = w.shared_ffn();
    core::detail::check_extent(fn, "shared_w1", w.shared_w1, 1, h);
    core::detail::check_extent(fn, "shared_w3", w.shared_w3, 0, s);
    core::detail::check_extent(fn, "shared_w3", w.shared_w3, 1, h);
    core::detail::check_extent(fn, "shared_w2", w.shared_w2, 0, h);
    core::detail::check_extent(fn, "shared_w2", w.shared_w2, 1, s);
  }
  auto check_optional = [&](const char* what, const auto& v, std::int64_t rows, std::int64_t cols) {
    if (v.extent(0) == 0) return;
    core::detail::check_extent(fn, what, v, 0, rows);
    if constexpr (std::decay_t<decltype(v)>::rank == 2) core::detail::check_extent(fn, what, v, 1, cols);
  };
  check_optional("router_bias", w.router_bias, e, 0);
  check_optional("score_bias", w.score_bias, e, 0);
  check_optional("w1_bias", w.w1_bias, el, f);
  check_optional("w3_bias", w.w3_bias, el, f);
  check_optional("w2_bias", w.w2_bias, el, h);
  check_optional("shared_gate", w.shared_gate, 1, h);
  KMOE_CHECK_INPUT(!w.has_shared_gate() || w.has_shared(), fn, ": a shared_gate without a shared expert");
  KMOE_CHECK_INPUT(options.top_k >= 1 && options.top_k <= e, fn, ": top_k = ", options.top_k, " outside [1, ", e,
                   "]");
  core::detail::check_routing_options(fn, w.routing, e, options.top_k);
  if constexpr (std::is_same<T, bf16>::value) check_cuda_block_runs(w);  // the bf16 layer is the CUDA block
  if (!w.expert.is_default())
    KMOE_CHECK_INPUT(w.expert.limit > 0 && w.expert.alpha == w.expert.alpha, fn, ": ", core::describe(w.expert),
                     " needs a positive limit and a number alpha");
  KMOE_CHECK_INPUT(options.block >= 1, fn, ": block = ", options.block, " (must be >= 1)");
  KMOE_CHECK_INPUT(options.tile_rows >= 1, fn, ": tile_rows = ", options.tile_rows, " (must be >= 1)");
}

/// forward()'s check: the single-process calls need every expert on this layer.
template <class T, class ExecSpace>
void check_all_experts_local(const MoeWeights<T, ExecSpace>& w) {
  KMOE_CHECK_INPUT(w.first_expert == 0 && w.num_local_experts() == w.num_experts(),
                   "kmoe::moe::MoeLayer::forward: the layer holds experts [", w.first_expert, ",",
                   w.first_expert + w.num_local_experts(), ") of ", w.num_experts(),
                   "; a slice runs through the stages (expert parallelism)");
}

/// InputError "<fn>: <what> is [a,b], expected [rows,cols]" unless m is [rows, cols].
template <class M>
void check_matrix(const char* fn, const char* what, const M& m, std::int64_t rows, std::int64_t cols) {
  KMOE_CHECK_INPUT(std::int64_t(m.extent(0)) == rows && std::int64_t(m.extent(1)) == cols, fn, ": ", what, " is [",
                   m.extent(0), ",", m.extent(1), "], expected [", rows, ",", cols, "]");
}

/// backward(dy, out)'s check: every output tensor has the shape of x or of its weight.
template <class G, class T, class ExecSpace>
void check_gradient_shapes(const char* fn, const typename MoeViews<G, ExecSpace>::matrix& dx,
                           const MoeWeights<G, ExecSpace>& grads, const MoeWeights<T, ExecSpace>& w,
                           std::int64_t tokens) {
  check_matrix(fn, "dx", dx, tokens, w.hidden());
  for_each_weight_pair(grads, w, [&](const auto& g, const auto& like, const char* name) {
    for (unsigned r = 0; r < like.rank; ++r)
      KMOE_CHECK_INPUT(g.extent(r) == like.extent(r), fn, ": gradient ", name, " has extent(", r, ") = ",
                       g.extent(r), ", expected ", like.extent(r));
  });
}
}  // namespace detail

template <class T, class ExecSpace>
MoeLayer<T, ExecSpace>::MoeLayer(MoeWeights<T, ExecSpace> weights, MoeOptions options, ExecSpace space)
    : weights_(std::move(weights)), options_(options), space_(space) {
  detail::check_layer_arguments(weights_, options_);
  KMOE_CHECK_USAGE(options_.gemm != core::GemmAlgo::Cutlass, "kmoe::moe::MoeLayer<", typeid(T).name(),
                   ">: the CUTLASS engine runs only in the bf16 CUDA layer (MoeLayer<bf16, Kokkos::Cuda>); use Auto, "
                   "Blas or Kokkos");
}

template <class T, class ExecSpace>
Routing<T, ExecSpace> MoeLayer<T, ExecSpace>::route(const_matrix x) const {
  KMOE_CHECK_INPUT(std::int64_t(x.extent(1)) == weights_.hidden(), "kmoe::moe::MoeLayer::route: x is [", x.extent(0),
                   ",", x.extent(1), "], expected [tokens, ", weights_.hidden(), "]");
  const std::int64_t tokens = x.extent(0), e = weights_.num_experts(), k = options_.top_k;
  Routing<T, ExecSpace> r;
  r.logits = detail::uninit<matrix>("kmoe::router_logits", tokens, e);
  r.probs = detail::uninit<matrix>("kmoe::router_probs", tokens, e);
  r.topk_idx = detail::uninit<typename views::index_matrix>("kmoe::topk_idx", tokens, k);
  r.topk_weight = detail::uninit<matrix>("kmoe::topk_weight", tokens, k);
  if (weights_.routing.is_default() && !weights_.has_router_bias() && !weights_.has_score_bias())
    core::routing_forward(space_, x, weights_.router, r.logits, r.probs, r.topk_idx, r.topk_weight, options_.gemm);
  else
    core::routing_forward(space_, x, weights_.router, weights_.router_bias, weights_.score_bias, r.logits, r.probs,
                          r.topk_idx, r.topk_weight, weights_.routing, options_.gemm);
  r.plan = core::make_dispatch_plan(space_, r.topk_idx, e, options_.block);
  return r;
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::route_backward(const_matrix x, const Routing<T, ExecSpace>& routing,
                                            const_matrix d_topk_weight, matrix dx, matrix d_router,
                                            typename views::vector d_router_bias,
                                            const_matrix d_logits_add) const {
  auto d_logits = detail::uninit<matrix>("kmoe::d_logits", routing.probs.extent(0), routing.probs.extent(1));
  if (d_logits_add.span() != 0)
    detail::check_matrix("kmoe::moe::MoeLayer::route_backward", "d_logits_add", d_logits_add, d_logits.extent(0),
                         d_logits.extent(1));
  if (weights_.routing.is_default() && d_router_bias.extent(0) == 0 && d_logits_add.span() == 0)
    core::routing_backward(space_, x, weights_.router, routing.probs, routing.topk_idx, routing.topk_weight,
                           d_topk_weight, d_logits, dx, d_router, true, options_.gemm);
  else
    core::routing_backward(space_, x, weights_.router, routing.probs, routing.topk_idx, routing.topk_weight,
                           d_topk_weight, d_logits, dx, d_router, d_router_bias, weights_.routing, true,
                           options_.gemm, d_logits_add);
}

template <class T, class ExecSpace>
core::ExpertExtras<T, typename MoeLayer<T, ExecSpace>::views::memory_space> MoeLayer<T, ExecSpace>::expert_extras()
    const {
  core::ExpertExtras<T, typename views::memory_space> e;
  e.b1 = weights_.w1_bias;
  e.b3 = weights_.w3_bias;
  e.b2 = weights_.w2_bias;
  e.activation = weights_.expert;
  return e;
}

template <class T, class ExecSpace>
typename MoeLayer<T, ExecSpace>::matrix MoeLayer<T, ExecSpace>::dispatch(const_matrix x,
                                                                         const Routing<T, ExecSpace>& routing,
                                                                         bool padded) const {
  const auto& plan = routing.plan;
  matrix rows = detail::uninit<matrix>("kmoe::dispatch_rows", padded ? plan.num_padded_rows() : plan.num_rows(),
                                       x.extent(1));
  core::padded_gather(space_, x, padded ? plan.pair_padded_row : plan.pair_row, plan.top_k, rows);
  return rows;
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::dispatch_backward(const_matrix d_rows, const Routing<T, ExecSpace>& routing, matrix dx,
                                               bool padded, bool accumulate) const {
  const auto& plan = routing.plan;
  core::padded_gather_backward(space_, d_rows, padded ? plan.pair_padded_row : plan.pair_row, plan.top_k, dx,
                               accumulate);
}

template <class T, class ExecSpace>
ExpertContext<T, ExecSpace> MoeLayer<T, ExecSpace>::expert_forward(const_matrix rows,
                                                                   std::vector<std::int64_t> offsets) const {
  KMOE_CHECK_INPUT(std::int64_t(offsets.size()) == weights_.num_local_experts() + 1,
                   "kmoe::moe::MoeLayer::expert_forward: ", offsets.size(), " offsets for ",
                   weights_.num_local_experts(), " local experts");
  ExpertContext<T, ExecSpace> ctx;
  const std::int64_t n = rows.extent(0), f = weights_.ffn();
  ctx.x = rows;
  ctx.offsets = std::move(offsets);
  ctx.h1 = detail::uninit<matrix>("kmoe::expert::h1", n, f);
  ctx.h3 = detail::uninit<matrix>("kmoe::expert::h3", n, f);
  ctx.y = detail::uninit<matrix>("kmoe::expert::y", n, rows.extent(1));
  core::grouped_mlp_forward(space_, rows, ctx.offsets, weights_.w1, weights_.w3, weights_.w2, ctx.h1, ctx.h3, ctx.y,
                            false, options_.gemm, expert_extras());
  return ctx;
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::expert_backward(const ExpertContext<T, ExecSpace>& ctx, const_matrix dy_rows,
                                             matrix d_rows, typename views::tensor3 d_w1, typename views::tensor3 d_w3,
                                             typename views::tensor3 d_w2, matrix d_w1_bias, matrix d_w3_bias,
                                             matrix d_w2_bias) const {
  core::ExpertBiasGrads<T, typename views::memory_space> db{d_w1_bias, d_w3_bias, d_w2_bias};
  core::grouped_mlp_backward(space_, ctx.x, ctx.offsets, weights_.w1, weights_.w3, weights_.w2, ctx.h1, ctx.h3,
                             dy_rows, d_rows, d_w1, d_w3, d_w2, false, options_.gemm, expert_extras(), db);
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::combine(const_matrix y_rows, const Routing<T, ExecSpace>& routing, matrix y, bool padded,
                                     bool accumulate) const {
  const auto& plan = routing.plan;
  core::padded_scatter(space_, y_rows, padded ? plan.pair_padded_row : plan.pair_row, routing.topk_weight, y,
                       accumulate);
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::combine_backward(const_matrix dy, const_matrix y_rows,
                                              const Routing<T, ExecSpace>& routing, matrix dy_rows,
                                              matrix d_topk_weight, bool padded) const {
  const auto& plan = routing.plan;
  core::padded_scatter_backward(space_, dy, y_rows, padded ? plan.pair_padded_row : plan.pair_row,
                                routing.topk_weight, dy_rows, d_topk_weight);
}

template <class T, class ExecSpace>
ExpertContext<T, ExecSpace> MoeLayer<T, ExecSpace>::shared_forward(const_matrix x, matrix y) const {
  ExpertContext<T, ExecSpace> ctx;
  if (!weights_.has_shared()) return ctx;
  const std::int64_t n = x.extent(0), s = weights_.shared_ffn();
  ctx.x = x;
  ctx.offsets = {0, n};
  ctx.h1 = detail::uninit<matrix>("kmoe::shared::h1", n, s);
  ctx.h3 = detail::uninit<matrix>("kmoe::shared::h3", n, s);
  if (!weights_.has_shared_gate()) {
    ctx.y = y;
    core::grouped_mlp_forward(space_, x, ctx.offsets, detail::as_one_group(weights_.shared_w1),
                              detail::as_one_group(weights_.shared_w3), detail::as_one_group(weights_.shared_w2),
                              ctx.h1, ctx.h3, y, true, options_.gemm);
    return ctx;
  }
  // Gated (Qwen2-MoE): y += sigmoid(x·g) * shared(x); the ungated output and the gate are saved for the backward.
  using A = core::accum_t<T>;
  ctx.y = detail::uninit<matrix>("kmoe::shared::y", n, x.extent(1));
  ctx.gate = detail::uninit<matrix>("kmoe::shared::gate", n, 1);
  core::grouped_mlp_forward(space_, x, ctx.offsets, detail::as_one_group(weights_.shared_w1),
                            detail::as_one_group(weights_.shared_w3), detail::as_one_group(weights_.shared_w2), ctx.h1,
                            ctx.h3, ctx.y, false, options_.gemm);
  core::gemm(space_, 'N', 'T', T(1), x, weights_.shared_gate, T(0), ctx.gate, options_.gemm);
  const auto gate = ctx.gate;
  const auto ys = ctx.y;
  Kokkos::parallel_for(
      "kmoe::shared::gate", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space_, 0, n),
      KOKKOS_LAMBDA(const std::int64_t t) { gate(t, 0) = T(core::detail::sigmoid(A(gate(t, 0)))); });
  Kokkos::parallel_for(
      "kmoe::shared::add_gated", core::detail::Range2D<ExecSpace>(space_, {0, 0}, {n, std::int64_t(x.extent(1))}),
      KOKKOS_LAMBDA(const std::int64_t t, const std::int64_t j) {
        y(t, j) = T(A(y(t, j)) + A(gate(t, 0)) * A(ys(t, j)));
      });
  space_.fence();
  return ctx;
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::shared_backward(const ExpertContext<T, ExecSpace>& ctx, const_matrix dy, matrix dx,
                                             matrix d_w1, matrix d_w3, matrix d_w2, matrix d_gate) const {
  if (!weights_.has_shared()) return;
  if (!weights_.has_shared_gate()) {
    core::grouped_mlp_backward(space_, ctx.x, ctx.offsets, detail::as_one_group(weights_.shared_w1),
                               detail::as_one_group(weights_.shared_w3), detail::as_one_group(weights_.shared_w2),
                               ctx.h1, ctx.h3, dy, dx, detail::as_one_group(d_w1), detail::as_one_group(d_w3),
                               detail::as_one_group(d_w2), true, options_.gemm);
    return;
  }
  // y += s * ys with s = sigmoid(z), z = x·g: dys = s dy; dz = (dy·ys) s (1 - s); dg = dzᵀ x; dx += dz g.
  using A = core::accum_t<T>;
  const std::int64_t n = ctx.x.extent(0), h = ctx.x.extent(1);
  matrix dys = detail::uninit<matrix>("kmoe::shared::dy", n, h);
  matrix dz = detail::uninit<matrix>("kmoe::shared::dz", n, 1);
  const auto gate = ctx.gate;
  const auto ys = ctx.y;
  Kokkos::parallel_for(
      "kmoe::shared::gate_backward", Kokkos::RangePolicy<ExecSpace, Kokkos::IndexType<std::int64_t>>(space_, 0, n),
      KOKKOS_LAMBDA(const std::int64_t t) {
        const A s = A(gate(t, 0));
        A dot = 0;
        for (std::int64_t j = 0; j < h; ++j) {
          dot += A(dy(t, j)) * A(ys(t, j));
          dys(t, j) = T(s * A(dy(t, j)));
        }
        dz(t, 0) = T(dot * s * (A(1) - s));
      });
  space_.fence();
  if (d_gate.extent(0) != 0) core::gemm(space_, 'T', 'N', T(1), dz, ctx.x, T(0), d_gate, options_.gemm);
  core::gemm(space_, 'N', 'N', T(1), dz, weights_.shared_gate, T(1), dx, options_.gemm);
  core::grouped_mlp_backward(space_, ctx.x, ctx.offsets, detail::as_one_group(weights_.shared_w1),
                             detail::as_one_group(weights_.shared_w3), detail::as_one_group(weights_.shared_w2),
                             ctx.h1, ctx.h3, dys, dx, detail::as_one_group(d_w1), detail::as_one_group(d_w3),
                             detail::as_one_group(d_w2), true, options_.gemm);
}

template <class T, class ExecSpace>
typename MoeLayer<T, ExecSpace>::matrix MoeLayer<T, ExecSpace>::forward(const_matrix x) {
  matrix y = detail::uninit<matrix>("kmoe::moe::y", x.extent(0), x.extent(1));
  forward(x, y);
  return y;
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::forward(const_matrix x, matrix y) {
  detail::check_all_experts_local(weights_);
  KMOE_CHECK_INPUT(std::int64_t(x.extent(1)) == weights_.hidden(), "kmoe::moe::MoeLayer::forward: x is [", x.extent(0),
                   ",", x.extent(1), "], expected [tokens, ", weights_.hidden(), "]");
  detail::check_matrix("kmoe::moe::MoeLayer::forward", "y", y, x.extent(0), x.extent(1));
  Kokkos::Profiling::pushRegion(options_.impl == ExpertImpl::Scatter ? "kmoe::moe::forward[scatter]"
                                                                     : "kmoe::moe::forward[padded]");
  have_forward_ = false;
  routing_ = route(x);
  x_ = x;
  const auto& plan = routing_.plan;
  const std::int64_t hidden = x.extent(1);
  if (options_.impl == ExpertImpl::Scatter) {
    const std::int64_t f = weights_.ffn();
    experts_ = ExpertContext<T, ExecSpace>{};
    experts_.x = x;
    experts_.offsets = plan.offsets_host;
    experts_.h1 = detail::uninit<matrix>("kmoe::expert::h1", plan.num_rows(), f);
    experts_.h3 = detail::uninit<matrix>("kmoe::expert::h3", plan.num_rows(), f);
    experts_.y = detail::uninit<matrix>("kmoe::expert::y", plan.num_rows(), hidden);
    core::scatter_mlp_forward(space_, x, plan, weights_.w1, weights_.w3, weights_.w2, experts_.h1, experts_.h3,
                              experts_.y, options_.gemm, options_.tile_rows, expert_extras());
    combine(experts_.y, routing_, y, false, false);
  } else {
    experts_ = expert_forward(dispatch(x, routing_, true), plan.padded_offsets_host);
    combine(experts_.y, routing_, y, true, false);
  }
  shared_ = shared_forward(x, y);
  have_forward_ = true;
  Kokkos::Profiling::popRegion();
}

template <class T, class ExecSpace>
MoeBackward<T, ExecSpace> MoeLayer<T, ExecSpace>::backward(const_matrix dy, const_matrix d_logits) {
  KMOE_CHECK_INPUT(have_forward_, "kmoe::moe::MoeLayer::backward: no forward() to differentiate");
  MoeBackward<T, ExecSpace> out;
  out.grads = zeros_like(weights_);
  out.dx = matrix("kmoe::moe::dx", x_.extent(0), x_.extent(1));
  backward_zeroed(dy, out, d_logits);
  return out;
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::backward(const_matrix dy, const MoeBackward<T, ExecSpace>& out, const_matrix d_logits) {
  KMOE_CHECK_INPUT(have_forward_, "kmoe::moe::MoeLayer::backward: no forward() to differentiate");
  detail::check_gradient_shapes<T>("kmoe::moe::MoeLayer::backward", out.dx, out.grads, weights_, x_.extent(0));
  // The portable kernels accumulate into dx and some weight gradients: start from zero.
  Kokkos::deep_copy(space_, out.dx, T(0));
  for_each_weight_pair(out.grads, weights_, [&](const auto& g, const auto&, const char*) {
    Kokkos::deep_copy(space_, g, T(0));
  });
  backward_zeroed(dy, out, d_logits);
}

template <class T, class ExecSpace>
void MoeLayer<T, ExecSpace>::backward_zeroed(const_matrix dy, const MoeBackward<T, ExecSpace>& out,
                                             const_matrix d_logits) {
  KMOE_CHECK_INPUT(dy.extent(0) == x_.extent(0) && dy.extent(1) == x_.extent(1), "kmoe::moe::MoeLayer::backward: dy is [",
                   dy.extent(0), ",", dy.extent(1), "], expected [", x_.extent(0), ",", x_.extent(1), "]");
  if (d_logits.span() != 0)
    detail::check_matrix("kmoe::moe::MoeLayer::backward", "d_logits", d_logits, x_.extent(0),
                         weights_.num_experts());
  Kokkos::Profiling::pushRegion(options_.impl == ExpertImpl::Scatter ? "kmoe::moe::backward[scatter]"
                                                                     : "kmoe::moe::backward[padded]");
  const auto& plan = routing_.plan;
  matrix d_topk_weight = detail::uninit<matrix>("kmoe::d_topk_weight", plan.num_tokens, plan.top_k);
  if (options_.impl == ExpertImpl::Scatter) {
    core::scatter_mlp_backward(space_, x_, plan, routing_.topk_weight, dy, weights_.w1, weights_.w3, weights_.w2,
                               experts_.h1, experts_.h3, experts_.y, out.dx, out.grads.w1, out.grads.w3,
                               out.grads.w2, d_topk_weight, options_.gemm, options_.tile_rows, expert_extras(),
                               {out.grads.w1_bias, out.grads.w3_bias, out.grads.w2_bias});
  } else {
    matrix dy_rows = detail::uninit<matrix>("kmoe::dy_rows", plan.num_padded_rows(), x_.extent(1));
    combine_backward(dy, experts_.y, routing_, dy_rows, d_topk_weight, true);
    matrix d_rows = detail::uninit<matrix>("kmoe::d_rows", plan.num_padded_rows(), x_.extent(1));
    expert_backward(experts_, dy_rows, d_rows, out.grads.w1, out.grads.w3, out.grads.w2, out.grads.w1_bias,
                    out.grads.w3_bias, out.grads.w2_bias);
    dispatch_backward(d_rows, routing_, out.dx, true, false);
  }
  route_backward(x_, routing_, d_topk_weight, out.dx, out.grads.router, out.grads.router_bias, d_logits);
  shared_backward(shared_, dy, out.dx, out.grads.shared_w1, out.grads.shared_w3, out.grads.shared_w2,
                  out.grads.shared_gate);
  Kokkos::Profiling::popRegion();
}

#define KMOE_MOE_LAYER_EXTERN(T, SPACE) \
  extern template class MoeLayer<T, SPACE>; \
  extern template MoeWeights<T, SPACE> zeros_like(const MoeWeights<T, SPACE>&);
#ifdef KOKKOS_ENABLE_SERIAL
KMOE_MOE_LAYER_EXTERN(double, Kokkos::Serial)
KMOE_MOE_LAYER_EXTERN(float, Kokkos::Serial)
#endif
#ifdef KOKKOS_ENABLE_OPENMP
KMOE_MOE_LAYER_EXTERN(double, Kokkos::OpenMP)
KMOE_MOE_LAYER_EXTERN(float, Kokkos::OpenMP)
#endif
#undef KMOE_MOE_LAYER_EXTERN

}  // namespace kmoe::moe
