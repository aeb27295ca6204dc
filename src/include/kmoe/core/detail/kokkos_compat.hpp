/// \file kokkos_compat.hpp
/// \brief The few names that differ between Kokkos 3.4 (tested here) and Kokkos 4.x (users' clusters).
///
/// Kokkos 3.4 keeps its device-callable math in Kokkos::Experimental; Kokkos 4 moved it to Kokkos:: and removed the old
/// spelling with the deprecated-code-3 cleanup. kmoe code calls kmoe::detail::exp/log/sqrt/fmax inside lambdas.
#pragma once

#include <Kokkos_Core.hpp>

namespace kmoe::detail {

#if KOKKOS_VERSION >= 40000
namespace kmath = ::Kokkos;
#else
namespace kmath = ::Kokkos::Experimental;
#endif

template <class T>
KOKKOS_INLINE_FUNCTION T exp(T x) { return kmath::exp(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T log(T x) { return kmath::log(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T sqrt(T x) { return kmath::sqrt(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T fmax(T a, T b) { return kmath::fmax(a, b); }

}  // namespace kmoe::detail
