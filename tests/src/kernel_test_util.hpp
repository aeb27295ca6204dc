// Helpers of the kernel and layer tests: seeded random Views, error norms, running a body on every host space.
#pragma once

#include <gtest/gtest.h>

#include <Kokkos_Core.hpp>
#include <cmath>
#include <cstdint>
#include <random>

namespace kmoe::test {

/// Fills a View (any rank, host-accessible, contiguous) with N(0, scale^2) values from `seed`.
template <class V>
void fill_normal(const V& v, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, scale);
  using T = typename V::non_const_value_type;
  auto* p = v.data();
  for (std::size_t i = 0; i < v.span(); ++i) p[i] = T(dist(rng));
}

/// ||a - b||_2 / max(||b||_2, tiny) over all entries (same shapes, contiguous).
template <class A, class B>
double rel_l2(const A& a, const B& b) {
  EXPECT_EQ(a.span(), b.span());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.span() && i < b.span(); ++i) {
    const double d = double(a.data()[i]) - double(b.data()[i]);
    num += d * d;
    den += double(b.data()[i]) * double(b.data()[i]);
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

/// max |a - b| over all entries.
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.span() && i < b.span(); ++i)
    m = std::max(m, std::abs(double(a.data()[i]) - double(b.data()[i])));
  return m;
}

/// Calls f(space) for a Serial and an OpenMP instance (those enabled).
template <class F>
void for_each_host_space(F&& f) {
#ifdef KOKKOS_ENABLE_SERIAL
  {
    SCOPED_TRACE("Kokkos::Serial");
    f(Kokkos::Serial());
  }
#endif
#ifdef KOKKOS_ENABLE_OPENMP
  {
    SCOPED_TRACE("Kokkos::OpenMP");
    f(Kokkos::OpenMP());
  }
#endif
}

}  // namespace kmoe::test
