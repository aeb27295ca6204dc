/// \file adamw.hpp
/// \brief AdamW for a MoE block's parameters (router, experts, shared expert), as torch.optim.AdamW computes it.
///
/// Per element, at step t (1-based), with decoupled weight decay:
///   p -= lr * weight_decay * p
///   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
///   p -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// The state (m = exp_avg, v = exp_avg_sq, t) has the parameters' shapes, so under expert parallelism each rank holds
/// the state of the parameters it holds; after the gradient reduction every copy of a replicated parameter sees the
/// same gradient and so stays identical.
#pragma once

#include <kmoe/core/detail/kokkos_compat.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <Kokkos_Core.hpp>
#include <cmath>
#include <cstdint>

namespace kmoe::moe {

/// AdamW hyperparameters (torch's defaults, except weight_decay which torch sets to 0.01).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

/// AdamW state of one MoE block's parameters.
template <class T, class ExecSpace = Kokkos::DefaultExecutionSpace>
class AdamW {
 public:
  /// Zero state shaped like `params`.
  AdamW(const MoeWeights<T, ExecSpace>& params, AdamWOptions options)
      : options_(options), exp_avg_(zeros_like(params)), exp_avg_sq_(zeros_like(params)) {}

  /// Updates `params` in place (the Views are shared with the layer that uses them) from `grads` (same shapes).
  /// Blocks until the update is done.
  void step(const MoeWeights<T, ExecSpace>& params, const MoeWeights<T, ExecSpace>& grads) {
    ++step_;
    const double bc1 = 1 - std::pow(options_.beta1, static_cast<double>(step_));
    const double bc2 = 1 - std::pow(options_.beta2, static_cast<double>(step_));
    update(params.router, grads.router, exp_avg_.router, exp_avg_sq_.router, bc1, bc2);
    update(params.w1, grads.w1, exp_avg_.w1, exp_avg_sq_.w1, bc1, bc2);
    update(params.w3, grads.w3, exp_avg_.w3, exp_avg_sq_.w3, bc1, bc2);
    update(params.w2, grads.w2, exp_avg_.w2, exp_avg_sq_.w2, bc1, bc2);
    update(params.shared_w1, grads.shared_w1, exp_avg_.shared_w1, exp_avg_sq_.shared_w1, bc1, bc2);
    update(params.shared_w3, grads.shared_w3, exp_avg_.shared_w3, exp_avg_sq_.shared_w3, bc1, bc2);
    update(params.shared_w2, grads.shared_w2, exp_avg_.shared_w2, exp_avg_sq_.shared_w2, bc1, bc2);
    update(params.router_bias, grads.router_bias, exp_avg_.router_bias, exp_avg_sq_.router_bias, bc1, bc2);
    update(params.w1_bias, grads.w1_bias, exp_avg_.w1_bias, exp_avg_sq_.w1_bias, bc1, bc2);
    update(params.w3_bias, grads.w3_bias, exp_avg_.w3_bias, exp_avg_sq_.w3_bias, bc1, bc2);
    update(params.w2_bias, grads.w2_bias, exp_avg_.w2_bias, exp_avg_sq_.w2_bias, bc1, bc2);
    update(params.shared_gate, grads.shared_gate, exp_avg_.shared_gate, exp_avg_sq_.shared_gate, bc1, bc2);
    ExecSpace().fence();
  }

  const AdamWOptions& options() const { return options_; }
  /// Steps taken (t of the last update).
  std::int64_t step_count() const { return step_; }
  /// For restoring a saved state (the views are written in place by the caller before the next step()).
  void set_step_count(std::int64_t t) { step_ = t; }
  /// First moment m (exp_avg), same shapes as the parameters.
  const MoeWeights<T, ExecSpace>& exp_avg() const { return exp_avg_; }
  /// Second moment v (exp_avg_sq).
  const MoeWeights<T, ExecSpace>& exp_avg_sq() const { return exp_avg_sq_; }

  /// One tensor's update (internal). Public only because nvcc rejects an extended device lambda inside a private
  /// member function ("cannot have private or protected access"), which a CUDA build of kmoe hits.
  template <class V>
  void update(const V& p, const V& g, const V& m, const V& v, double bc1, double bc2) const {
    const std::size_t n = p.span();
    if (n == 0) return;
    using Flat = Kokkos::View<T*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
    const Flat pf(p.data(), n), gf(g.data(), n), mf(m.data(), n), vf(v.data(), n);
    const T b1 = static_cast<T>(options_.beta1), b2 = static_cast<T>(options_.beta2),
            eps = static_cast<T>(options_.eps), decay = static_cast<T>(1 - options_.lr * options_.weight_decay),
            step_size = static_cast<T>(options_.lr / bc1), sqrt_bc2 = static_cast<T>(std::sqrt(bc2));
    Kokkos::parallel_for(
        "kmoe::moe::AdamW::step", Kokkos::RangePolicy<ExecSpace>(0, n), KOKKOS_LAMBDA(const std::size_t i) {
          const T grad = gf(i);
          const T mi = b1 * mf(i) + (1 - b1) * grad;
          const T vi = b2 * vf(i) + (1 - b2) * grad * grad;
          mf(i) = mi;
          vf(i) = vi;
          pf(i) = pf(i) * decay - step_size * mi / (kmoe::detail::sqrt(vi) / sqrt_bc2 + eps);
        });
  }

 private:
  AdamWOptions options_;
  MoeWeights<T, ExecSpace> exp_avg_, exp_avg_sq_;
  std::int64_t step_ = 0;
};

}  // namespace kmoe::moe
