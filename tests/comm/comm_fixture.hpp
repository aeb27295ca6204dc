// Shared by the comm tests: a synthetic MoE problem (linear experts y = A_e x, top-k routing with weights) that every
// rank can compute whole as the single-rank reference, and the distributed forward/backward built on kmoe::comm.
#pragma once

#include <kmoe/comm/alltoall.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/gradients.hpp>

#include <Kokkos_Core.hpp>
#include <cmath>
#include <cstdint>

namespace kmoe::test {

// Host views: the MPI backend moves host memory (also in a CUDA build of Kokkos).
using Rows = Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>;
using Idx = Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Kokkos::HostSpace>;
using Mats = Kokkos::View<double***, Kokkos::LayoutRight, Kokkos::HostSpace>;
using Vec = Kokkos::View<double*, Kokkos::HostSpace>;

/// T tokens of width H routed to k of E linear experts.
struct SyntheticMoe {
  std::int64_t T = 37, E = 5;
  int H = 6, k = 2;

  double x(std::int64_t t, int c) const { return std::sin(0.3 * t + 0.7 * c + 0.1); }
  double dy(std::int64_t t, int c) const { return std::cos(0.2 * t - 0.4 * c); }
  double a(std::int64_t e, int i, int c) const { return std::cos(0.5 * e + 0.3 * i - 0.2 * c); }
  std::int64_t expert(std::int64_t t, int s) const {
    const std::int64_t e0 = (t * 3 + t / 2) % E;
    return s == 0 ? e0 : (e0 + 1 + t % (E - 1)) % E;  // distinct from e0 (E > 1)
  }
  double weight(std::int64_t t, int s) const {
    const double w0 = 0.6 + 0.01 * static_cast<double>(t % 7);
    return k == 1 ? 1.0 : (s == 0 ? w0 : 1.0 - w0);
  }
};

/// Outputs and gradients of one forward+backward over tokens [t0, t0 + n).
struct MoeResult {
  Rows y, dx;
  Mats dA;                                  // [experts held, H, H]
  Vec g;                  // [E]: d loss / d routing weight, summed per expert (a "router" gradient)
};

/// Single-rank reference over all T tokens, all E experts.
inline MoeResult reference(const SyntheticMoe& p) {
  MoeResult r{Rows("y", p.T, p.H), Rows("dx", p.T, p.H), Mats("dA", p.E, p.H, p.H), Vec("g", p.E)};
  for (std::int64_t t = 0; t < p.T; ++t)
    for (int s = 0; s < p.k; ++s) {
      const auto e = p.expert(t, s);
      const double w = p.weight(t, s);
      double gdot = 0;
      for (int i = 0; i < p.H; ++i) {
        double o = 0;
        for (int c = 0; c < p.H; ++c) o += p.a(e, i, c) * p.x(t, c);
        r.y(t, i) += w * o;
        gdot += p.dy(t, i) * o;
        const double d = w * p.dy(t, i);
        for (int c = 0; c < p.H; ++c) {
          r.dA(e, i, c) += d * p.x(t, c);
          r.dx(t, c) += p.a(e, i, c) * d;
        }
      }
      r.g(e) += gdot;
    }
  return r;
}

/// This rank's share: tokens split over the world, experts over the ep group; all-to-all dispatch/combine both ways;
/// gradients reduced by `grads` (g replicated, dA expert-sharded). Returns local y/dx and the local experts' dA.
inline MoeResult distributed(const SyntheticMoe& p, const comm::ExpertParallel& layout, comm::Communicator& ep_group,
                             comm::GradientSet& grads) {
  const auto mine = comm::contiguous_split(p.T, layout.world().size(), layout.world().rank());
  Rows x("x", mine.count, p.H), dy("dy", mine.count, p.H);
  Idx topk("topk", mine.count, p.k);
  for (std::int64_t t = 0; t < mine.count; ++t) {
    for (int c = 0; c < p.H; ++c) {
      x(t, c) = p.x(mine.begin + t, c);
      dy(t, c) = p.dy(mine.begin + t, c);
    }
    for (int s = 0; s < p.k; ++s) topk(t, s) = p.expert(mine.begin + t, s);
  }
  const comm::DispatchHandle h(ep_group, layout.placement(), topk);
  const auto local = layout.local_experts();
  const auto& off = h.expert_offsets();

  // Forward: expert compute on the rows grouped by local expert.
  const Rows xr = comm::dispatch_forward(h, x);
  Rows outr("outr", h.num_received(), p.H);
  for (std::int64_t j = 0; j < local.count; ++j)
    for (auto r = off[j]; r < off[j + 1]; ++r)
      for (int i = 0; i < p.H; ++i)
        for (int c = 0; c < p.H; ++c) outr(r, i) += p.a(local.begin + j, i, c) * xr(r, c);
  const Rows out = comm::combine_forward(h, outr);
  MoeResult res{Rows("y", mine.count, p.H), Rows("dx", mine.count, p.H), Mats("dA", local.count, p.H, p.H),
                Vec("g", p.E)};
  Rows dout("dout", mine.count * p.k, p.H);
  for (std::int64_t t = 0; t < mine.count; ++t)
    for (int s = 0; s < p.k; ++s) {
      const double w = p.weight(mine.begin + t, s);
      double gdot = 0;
      for (int i = 0; i < p.H; ++i) {
        res.y(t, i) += w * out(t * p.k + s, i);
        gdot += dy(t, i) * out(t * p.k + s, i);
        dout(t * p.k + s, i) = w * dy(t, i);
      }
      res.g(topk(t, s)) += gdot;
    }

  // Backward through the same handle.
  const Rows dr = comm::combine_backward(h, dout);
  Rows dxr("dxr", h.num_received(), p.H);
  for (std::int64_t j = 0; j < local.count; ++j)
    for (auto r = off[j]; r < off[j + 1]; ++r)
      for (int i = 0; i < p.H; ++i)
        for (int c = 0; c < p.H; ++c) {
          res.dA(j, i, c) += dr(r, i) * xr(r, c);
          dxr(r, c) += p.a(local.begin + j, i, c) * dr(r, i);
        }
  const Rows dxa = comm::dispatch_backward(h, dxr);
  for (std::int64_t t = 0; t < mine.count; ++t)
    for (int s = 0; s < p.k; ++s)
      for (int c = 0; c < p.H; ++c) res.dx(t, c) += dxa(t * p.k + s, c);

  grads.add("g", res.g, comm::GradKind::replicated);
  grads.add("dA", res.dA, comm::GradKind::expert);
  grads.reduce();
  return res;
}

}  // namespace kmoe::test
