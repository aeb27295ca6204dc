// Helpers of the GPU layer tests: device Views from host values, host copies of device Views, a problem's weights.
#pragma once

#include "moe_reference.hpp"

#include <kmoe/core/bf16.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <gtest/gtest.h>

#include <Kokkos_Core.hpp>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe::test {

template <class T>
T from_float(float v) {
  if constexpr (std::is_same<T, bf16>::value) return bf16::from_float(v);
  else return v;
}
template <class T>
double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <class T>
T nan_value() {
  if constexpr (std::is_same<T, bf16>::value) return bf16::from_bits(0xFFFF);
  else return std::numeric_limits<T>::quiet_NaN();
}

/// A device View of `shape` holding `values` (already bf16-representable) as T.
template <class V>
V device_view(const std::string& label, const std::vector<float>& values, std::size_t n0, std::size_t n1,
              std::size_t n2 = KOKKOS_INVALID_INDEX) {
  using T = typename V::non_const_value_type;
  V v(label, n0, n1, n2);  // n2 unspecified for a matrix
  auto h = Kokkos::create_mirror_view(v);
  EXPECT_EQ(h.span(), values.size()) << label;
  for (std::size_t i = 0; i < h.span() && i < values.size(); ++i) h.data()[i] = from_float<T>(values[i]);
  Kokkos::deep_copy(v, h);
  return v;
}

template <class T>
moe::MoeWeights<T, Kokkos::Cuda> weights_of(const MoeProblem& p) {
  using V = moe::MoeViews<T, Kokkos::Cuda>;
  moe::MoeWeights<T, Kokkos::Cuda> w;
  const std::size_t E = p.experts, H = p.hidden, F = p.ffn, S = p.shared_ffn;
  w.router = device_view<typename V::matrix>("router", p.gate, E, H);
  w.w1 = device_view<typename V::tensor3>("w1", p.w1, E, F, H);
  w.w3 = device_view<typename V::tensor3>("w3", p.w3, E, F, H);
  w.w2 = device_view<typename V::tensor3>("w2", p.w2, E, H, F);
  w.shared_w1 = device_view<typename V::matrix>("shared_w1", p.sw1, S, H);
  w.shared_w3 = device_view<typename V::matrix>("shared_w3", p.sw3, S, H);
  w.shared_w2 = device_view<typename V::matrix>("shared_w2", p.sw2, H, S);
  return w;
}

template <class V>
std::vector<double> host_f64(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<double> out(h.span());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = to_double(h.data()[i]);
  return out;
}
template <class V>
std::vector<unsigned char> host_bytes(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<unsigned char> out(h.span() * sizeof(typename V::value_type));
  if (!out.empty()) std::memcpy(out.data(), h.data(), out.size());
  return out;
}

/// Random bf16-representable problem; the last `dead` experts get no token (x[:,0] = 4 and their gate weighs it -8).
inline MoeProblem random_problem(std::int64_t tokens, int hidden, int ffn, int experts, int k, int dead, int shared,
                          unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  MoeProblem p;
  p.tokens = tokens;
  p.hidden = hidden;
  p.ffn = ffn;
  p.experts = experts;
  p.k = k;
  p.shared_ffn = shared;
  auto fill = [&](std::vector<float>& v, std::int64_t n, float scale) {
    v.resize(n);
    for (auto& f : v) f = scale * n01(rng);
    v = test::round_bf16(std::move(v));
  };
  const float ws = 1.f / std::sqrt(float(hidden));
  fill(p.x, tokens * hidden, 1.f);
  fill(p.dy, tokens * hidden, 1.f);
  fill(p.gate, std::int64_t(experts) * hidden, 4.f * ws);  // spread logits: no near ties between fp32 orders
  fill(p.w1, std::int64_t(experts) * ffn * hidden, ws);
  fill(p.w3, std::int64_t(experts) * ffn * hidden, ws);
  fill(p.w2, std::int64_t(experts) * hidden * ffn, 1.f / std::sqrt(float(ffn)));
  fill(p.sw1, std::int64_t(shared) * hidden, ws);
  fill(p.sw3, std::int64_t(shared) * hidden, ws);
  fill(p.sw2, std::int64_t(hidden) * shared, shared ? 1.f / std::sqrt(float(shared)) : 0.f);
  for (std::int64_t t = 0; dead > 0 && t < tokens; ++t) p.x[t * hidden] = 4.f;
  for (int e = experts - dead; e < experts; ++e) p.gate[std::int64_t(e) * hidden] = -8.f;
  return p;
}

}  // namespace kmoe::test
