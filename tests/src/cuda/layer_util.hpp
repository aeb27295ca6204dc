// Helpers of the GPU layer tests: device Views from host values, host copies of device Views, a problem's weights.
#pragma once

#include "moe_reference.hpp"

#include <kmoe/core/bf16.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <gtest/gtest.h>

#include <Kokkos_Core.hpp>
#include <cstring>
#include <limits>
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

}  // namespace kmoe::test
