/// \file synthetic_task.hpp
/// \brief The synthetic fine-tuning task `kmoe finetune` runs without --data: each MoE layer learns to reproduce the
/// outputs of a perturbed copy of itself (the "teacher") on seeded random hidden states.
///
/// Every random number is a pure function of (seed, stream, global index) — a counter-based generator — so the
/// inputs, the teacher and hence the whole loss curve are the same for any number of ranks and any expert placement,
/// and a resumed run sees the same batches it would have seen without stopping.
#pragma once

#include <kmoe/moe/moe_layer.hpp>

#include <Kokkos_Core.hpp>
#include <cmath>
#include <cstdint>

namespace kmoe::moe::synthetic {

/// SplitMix64 finaliser: a bijective 64-bit mix.
inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// A standard normal number, the same wherever it is computed: Box-Muller on two uniforms drawn from
/// hash(seed, stream, index).
inline double normal_at(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  const std::uint64_t h = mix64(mix64(mix64(seed) ^ stream) ^ index);
  const std::uint64_t h2 = mix64(h);
  const double u1 = (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);  // (0, 1)
  const double u2 = static_cast<double>(h2 >> 11) * (1.0 / 9007199254740992.0);        // [0, 1)
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

/// The stream of the hidden states of (step, layer).
inline std::uint64_t input_stream(std::int64_t step, int layer) {
  return mix64(0x1000000ull + static_cast<std::uint64_t>(step)) ^ static_cast<std::uint64_t>(layer);
}

/// Fills x [rows, H] with rows [row_begin, row_begin + rows) of the N(0, scale^2) matrix of `stream`. Blocks.
template <class View>
void fill_normal(const View& x, std::uint64_t seed, std::uint64_t stream, std::int64_t row_begin, double scale) {
  auto h = Kokkos::create_mirror_view(x);
  const std::int64_t cols = static_cast<std::int64_t>(x.extent(1));
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(x.extent(0)); ++i)
    for (std::int64_t j = 0; j < cols; ++j)
      h(i, j) = static_cast<typename View::non_const_value_type>(
          scale * normal_at(seed, stream, static_cast<std::uint64_t>((row_begin + i) * cols + j)));
  Kokkos::deep_copy(x, h);
}

/// A copy of `w` with multiplicative noise, p * (1 + relative * n): the teacher of the synthetic task. Expert tensors
/// are indexed by global expert (w.first_expert), so every rank's slice is a slice of one perturbed model.
/// \param layer [in] separates the noise of different layers
template <class T, class ExecSpace>
MoeWeights<T, ExecSpace> perturbed_copy(const MoeWeights<T, ExecSpace>& w, std::uint64_t seed, int layer,
                                        double relative) {
  MoeWeights<T, ExecSpace> out = w;
  int part = 0;
  auto perturb = [&](auto& v, std::int64_t first_row) {
    using V = std::decay_t<decltype(v)>;
    V copy(std::string(v.label()) + "_teacher", v.layout());
    Kokkos::deep_copy(copy, v);
    // On a host space the mirror is `copy` itself; either way `v` is never written.
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), copy);
    const std::int64_t row = v.extent(0) == 0 ? 0 : static_cast<std::int64_t>(v.span() / v.extent(0));
    const std::uint64_t stream = mix64(0x2000000ull + static_cast<std::uint64_t>(layer) * 16 + part++);
    for (std::size_t i = 0; i < v.span(); ++i)
      h.data()[i] = static_cast<T>(static_cast<double>(h.data()[i]) *
                                   (1 + relative * normal_at(seed, stream, first_row * row + i)));
    Kokkos::deep_copy(copy, h);
    v = copy;
  };
  perturb(out.router, 0);
  perturb(out.w1, w.first_expert);
  perturb(out.w3, w.first_expert);
  perturb(out.w2, w.first_expert);
  perturb(out.shared_w1, 0);
  perturb(out.shared_w3, 0);
  perturb(out.shared_w2, 0);
  // The optional tensors (empty Views where absent) after the seven, so that the seven keep their noise streams.
  perturb(out.router_bias, 0);
  perturb(out.w1_bias, w.first_expert);
  perturb(out.w3_bias, w.first_expert);
  perturb(out.w2_bias, w.first_expert);
  perturb(out.shared_gate, 0);
  return out;
}

}  // namespace kmoe::moe::synthetic
