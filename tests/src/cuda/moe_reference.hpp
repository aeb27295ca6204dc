// A float64 host reference of the MoE block (forward + backward) for the GPU tests, computed from the same
// bf16-rounded inputs the GPU sees. Routing may adopt the GPU's top-k where the reference's own choice is a near tie
// (bf16 logits cannot resolve it); everywhere else a different choice is a failure the caller counts.
#pragma once

#include <kmoe/core/bf16.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace kmoe::test {

struct MoeProblem {
  std::int64_t tokens = 0;
  int hidden = 0, ffn = 0, experts = 0, k = 0, shared_ffn = 0;
  // bf16-representable values, row-major: x/dy [T,H], gate [E,H], w1/w3 [E,F,H], w2 [E,H,F],
  // shared w1/w3 [S,H], shared w2 [H,S] (S = shared_ffn, 0 = none)
  std::vector<float> x, dy, gate, w1, w3, w2, sw1, sw3, sw2;
};

struct MoeResult {
  std::vector<double> logits, probs, topk_weight, y, dx, d_gate, dw1, dw3, dw2, dsw1, dsw3, dsw2;
  std::vector<std::int64_t> topk_idx;
  int routing_mismatches = 0;  // tokens whose GPU top-k differs from a choice the reference could resolve
  int routing_adopted = 0;     // near ties where the GPU's choice was adopted
};

/// A problem's sizes and weights from one layer's weights loaded in float (host Views with the member names of
/// io::MoeLayerWeights); x and dy are the caller's.
template <class W>
MoeProblem problem_from_weights(const W& w, int top_k) {
  auto flat = [](const auto& v) { return std::vector<float>(v.data(), v.data() + v.span()); };
  MoeProblem p;
  p.hidden = int(w.router.extent(1));
  p.experts = int(w.router.extent(0));
  p.ffn = int(w.w1.extent(1));
  p.k = top_k;
  p.shared_ffn = int(w.shared_w1.extent(0));
  p.gate = flat(w.router);
  p.w1 = flat(w.w1);
  p.w3 = flat(w.w3);
  p.w2 = flat(w.w2);
  p.sw1 = flat(w.shared_w1);
  p.sw3 = flat(w.shared_w3);
  p.sw2 = flat(w.shared_w2);
  return p;
}

inline std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& f : v) f = kmoe::bf16::bits_to_float(kmoe::bf16::float_to_bits(f));
  return v;
}
inline std::vector<std::uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<std::uint16_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kmoe::bf16::float_to_bits(v[i]);
  return out;
}
inline std::vector<double> bf16_bits_to_double(const std::vector<std::uint16_t>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kmoe::bf16::bits_to_float(v[i]);
  return out;
}

/// ||got - want|| / ||want|| (absolute norm when want is zero); +inf when got holds a non-finite value.
inline double rel_l2(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

namespace detail_ref {
inline double silu(double a) { return a / (1 + std::exp(-a)); }
inline double dsilu(double a) {
  const double s = 1 / (1 + std::exp(-a));
  return s + a * s * (1 - s);
}
/// One SwiGLU MLP on one row: fills h1, h3 [F] and o [H] (o = W2 (silu(W1 x) * W3 x)).
inline void mlp_forward(const float* w1, const float* w3, const float* w2, const float* x, int hidden, int ffn,
                        std::vector<double>& h1, std::vector<double>& h3, std::vector<double>& o) {
  h1.assign(ffn, 0);
  h3.assign(ffn, 0);
  o.assign(hidden, 0);
  for (int f = 0; f < ffn; ++f) {
    double a = 0, b = 0;
    for (int h = 0; h < hidden; ++h) {
      a += double(w1[std::int64_t(f) * hidden + h]) * x[h];
      b += double(w3[std::int64_t(f) * hidden + h]) * x[h];
    }
    h1[f] = a;
    h3[f] = b;
  }
  for (int h = 0; h < hidden; ++h) {
    double s = 0;
    for (int f = 0; f < ffn; ++f) s += double(w2[std::int64_t(h) * ffn + f]) * silu(h1[f]) * h3[f];
    o[h] = s;
  }
}
/// Backward of mlp_forward given d_o [H]: accumulates dx [H], dw1/dw3 [F,H], dw2 [H,F].
inline void mlp_backward(const float* w1, const float* w3, const float* w2, const float* x, int hidden, int ffn,
                         const std::vector<double>& h1, const std::vector<double>& h3, const std::vector<double>& d_o,
                         double* dx, double* dw1, double* dw3, double* dw2) {
  std::vector<double> da(ffn, 0);
  for (int h = 0; h < hidden; ++h)
    for (int f = 0; f < ffn; ++f) {
      da[f] += double(w2[std::int64_t(h) * ffn + f]) * d_o[h];
      dw2[std::int64_t(h) * ffn + f] += d_o[h] * silu(h1[f]) * h3[f];
    }
  for (int f = 0; f < ffn; ++f) {
    const double dh1 = da[f] * h3[f] * dsilu(h1[f]), dh3 = da[f] * silu(h1[f]);
    for (int h = 0; h < hidden; ++h) {
      dx[h] += double(w1[std::int64_t(f) * hidden + h]) * dh1 + double(w3[std::int64_t(f) * hidden + h]) * dh3;
      dw1[std::int64_t(f) * hidden + h] += dh1 * x[h];
      dw3[std::int64_t(f) * hidden + h] += dh3 * x[h];
    }
  }
}
}  // namespace detail_ref

/// The block on the host in float64. gpu_topk ([T,k], may be empty): adopted where the reference's gap between the
/// k-th and (k+1)-th probability is below tie_gap.
inline MoeResult moe_reference(const MoeProblem& p, const std::vector<std::int64_t>& gpu_topk, double tie_gap) {
  using namespace detail_ref;
  const std::int64_t T = p.tokens;
  const int H = p.hidden, F = p.ffn, E = p.experts, K = p.k, S = p.shared_ffn;
  MoeResult r;
  r.logits.assign(T * E, 0);
  r.probs.assign(T * E, 0);
  r.topk_idx.assign(T * K, 0);
  r.topk_weight.assign(T * K, 0);
  r.y.assign(T * H, 0);
  r.dx.assign(T * H, 0);
  r.d_gate.assign(std::int64_t(E) * H, 0);
  r.dw1.assign(std::int64_t(E) * F * H, 0);
  r.dw3.assign(std::int64_t(E) * F * H, 0);
  r.dw2.assign(std::int64_t(E) * H * F, 0);
  r.dsw1.assign(std::int64_t(S) * H, 0);
  r.dsw3.assign(std::int64_t(S) * H, 0);
  r.dsw2.assign(std::int64_t(H) * S, 0);
  std::vector<double> h1, h3, o, d_o(H);
  for (std::int64_t t = 0; t < T; ++t) {
    const float* x = p.x.data() + t * H;
    const float* dy = p.dy.data() + t * H;
    double* lg = r.logits.data() + t * E;
    double* pr = r.probs.data() + t * E;
    double mx = -INFINITY;
    for (int e = 0; e < E; ++e) {
      double s = 0;
      for (int h = 0; h < H; ++h) s += double(p.gate[std::int64_t(e) * H + h]) * x[h];
      lg[e] = s;
      mx = std::max(mx, s);
    }
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += (pr[e] = std::exp(lg[e] - mx));
    for (int e = 0; e < E; ++e) pr[e] /= sum;
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pr[a] > pr[b]; });
    std::vector<std::int64_t> idx(order.begin(), order.begin() + K);
    if (!gpu_topk.empty()) {
      std::vector<std::int64_t> mine = idx, theirs(gpu_topk.begin() + t * K, gpu_topk.begin() + (t + 1) * K);
      std::sort(mine.begin(), mine.end());
      std::vector<std::int64_t> theirs_sorted = theirs;
      std::sort(theirs_sorted.begin(), theirs_sorted.end());
      if (mine != theirs_sorted) {
        const double gap = K < E ? pr[order[K - 1]] - pr[order[K]] : 1.0;
        if (gap < tie_gap) {
          ++r.routing_adopted;
        } else {
          ++r.routing_mismatches;
        }
        idx = theirs;
      } else {
        idx = theirs;  // same set; the order within ties follows the GPU
      }
    }
    double chosen = 0;
    for (int s = 0; s < K; ++s) chosen += pr[idx[s]];
    std::vector<double> dw(K), out_s(std::size_t(K) * H);
    for (int s = 0; s < K; ++s) {
      const std::int64_t e = idx[s];
      r.topk_idx[t * K + s] = e;
      const double w = pr[e] / chosen;
      r.topk_weight[t * K + s] = w;
      mlp_forward(p.w1.data() + e * F * H, p.w3.data() + e * F * H, p.w2.data() + e * H * F, x, H, F, h1, h3, o);
      double dot = 0;
      for (int h = 0; h < H; ++h) {
        r.y[t * H + h] += w * o[h];
        dot += double(dy[h]) * o[h];
        d_o[h] = w * dy[h];
      }
      dw[s] = dot;
      mlp_backward(p.w1.data() + e * F * H, p.w3.data() + e * F * H, p.w2.data() + e * H * F, x, H, F, h1, h3, d_o,
                   r.dx.data() + t * H, r.dw1.data() + e * F * H, r.dw3.data() + e * F * H,
                   r.dw2.data() + e * H * F);
    }
    if (S > 0) {
      mlp_forward(p.sw1.data(), p.sw3.data(), p.sw2.data(), x, H, S, h1, h3, o);
      for (int h = 0; h < H; ++h) {
        r.y[t * H + h] += o[h];
        d_o[h] = dy[h];
      }
      mlp_backward(p.sw1.data(), p.sw3.data(), p.sw2.data(), x, H, S, h1, h3, d_o, r.dx.data() + t * H,
                   r.dsw1.data(), r.dsw3.data(), r.dsw2.data());
    }
    // routing: w_s = p_s / S; dL/dp_s = (dw_s - <dw, w>) / S; dL/dl_e = p_e (dp_e - <p, dp>)
    double dw_dot_w = 0;
    for (int s = 0; s < K; ++s) dw_dot_w += dw[s] * r.topk_weight[t * K + s];
    std::vector<double> dp(E, 0);
    for (int s = 0; s < K; ++s) dp[idx[s]] = (dw[s] - dw_dot_w) / chosen;
    double p_dot_dp = 0;
    for (int e = 0; e < E; ++e) p_dot_dp += pr[e] * dp[e];
    for (int e = 0; e < E; ++e) {
      const double dl = pr[e] * (dp[e] - p_dot_dp);
      for (int h = 0; h < H; ++h) {
        r.dx[t * H + h] += dl * p.gate[std::int64_t(e) * H + h];
        r.d_gate[std::int64_t(e) * H + h] += dl * x[h];
      }
    }
  }
  return r;
}

}  // namespace kmoe::test
