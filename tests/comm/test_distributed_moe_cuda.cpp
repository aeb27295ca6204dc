// DistributedMoe<bf16, Kokkos::Cuda> — the bf16 CUDA block under expert parallelism — run by 1-4 processes sharing
// one GPU through the MPI communicator over device buffers (NCCL refuses two ranks on one device):
//  - against the single-process MoeLayer<bf16, Kokkos::Cuda> on the same global batch, same engine: y and dx of each
//    rank's tokens, every gradient once reduced, top-k identical. Tolerance 1e-3 relative L2 for y/dx (bf16) and 1e-4
//    for the fp32 gradients: every expert row is computed by the same kernels from the same inputs in the same order
//    (rows of an expert arrive source-major = token order), so only the order of the cross-rank fp32 gradient sums
//    differs; a misplaced row would show as an O(1) error, far above both;
//  - against the float64 transformers oracle: every testdata layer, both paths, within 1e-2 relative L2, top-k equal
//    wherever the oracle's probability gap exceeds bf16 resolution;
//  - every ep that divides the world (replicas x ep), E not divisible by ep, ranks and experts without tokens, top-1,
//    a shared expert, each engine the build has.
#include <gtest/gtest.h>

#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/core/cuda/cutlass_grouped.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/checkpoint.hpp>

#include "../src/cuda/cuda_test.hpp"
#include "../src/cuda/layer_util.hpp"
#include "kmoe_test.hpp"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

namespace {

using namespace kmoe;
using Layer = moe::MoeLayer<bf16, Kokkos::Cuda>;
using Dist = comm::DistributedMoe<bf16, Kokkos::Cuda>;
using test::MoeProblem;
using test::random_problem;

std::vector<core::GemmAlgo> engines() {
  std::vector<core::GemmAlgo> out = {core::GemmAlgo::Kokkos, core::GemmAlgo::Blas};
  if (core::cuda::cutlass_grouped_available()) out.push_back(core::GemmAlgo::Cutlass);
  return out;
}
const char* engine_name(core::GemmAlgo g) {
  return g == core::GemmAlgo::Blas ? "cublas" : g == core::GemmAlgo::Cutlass ? "cutlass" : "kernel";
}

/// Rows [begin, begin + count) of a host copy of a [*, inner] View, as float64.
template <class V>
std::vector<double> rows_of(const V& v, std::int64_t begin, std::int64_t count) {
  const auto all = test::host_f64(v);
  const std::size_t inner = v.extent(0) ? v.span() / v.extent(0) : 0;
  return std::vector<double>(all.begin() + begin * inner, all.begin() + (begin + count) * inner);
}

struct Result {
  std::vector<double> y, dx, router, w1, w3, w2, sw1, sw3, sw2;
  std::vector<std::int64_t> topk;
};

/// The expert-parallel block on this rank's contiguous share of the tokens; gradients reduced (whole on every rank).
Result run_distributed(comm::Communicator& world, const MoeProblem& p, const moe::MoeOptions& o, int ep) {
  const auto full = test::weights_of<bf16>(p);
  comm::ExpertParallel layout(world, p.experts, ep);
  Dist dist(layout, comm::local_slice(full, layout), o);
  const auto mine = comm::contiguous_split(p.tokens, world.size(), world.rank());
  const std::vector<float> xs(p.x.begin() + mine.begin * p.hidden, p.x.begin() + mine.end() * p.hidden);
  const std::vector<float> dys(p.dy.begin() + mine.begin * p.hidden, p.dy.begin() + mine.end() * p.hidden);
  const auto x = test::device_view<Layer::matrix>("x", xs, mine.count, p.hidden);
  const auto dy = test::device_view<Layer::matrix>("dy", dys, mine.count, p.hidden);
  Layer::matrix y("y", mine.count, p.hidden);
  Kokkos::deep_copy(y, test::nan_value<bf16>());
  moe::MoeBackward<bf16, Kokkos::Cuda> g;
  g.dx = Layer::grad_matrix("dx", mine.count, p.hidden);
  g.grads = moe::uninitialized_like<float>(dist.layer().weights());
  Kokkos::deep_copy(g.dx, test::nan_value<float>());
  moe::for_each_weight_pair(g.grads, g.grads, [](const auto& v, const auto&, const char*) {
    Kokkos::deep_copy(v, test::nan_value<float>());
  });
  dist.forward(x, y);
  dist.backward(dy, g);
  Kokkos::fence();
  dist.gradient_set(g).reduce();
  Kokkos::fence();
  Result r;
  r.y = test::host_f64(y);
  r.dx = test::host_f64(g.dx);
  r.router = test::host_f64(g.grads.router);
  r.w1 = test::host_f64(g.grads.w1);
  r.w3 = test::host_f64(g.grads.w3);
  r.w2 = test::host_f64(g.grads.w2);
  r.sw1 = test::host_f64(g.grads.shared_w1);
  r.sw3 = test::host_f64(g.grads.shared_w3);
  r.sw2 = test::host_f64(g.grads.shared_w2);
  auto idx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dist.routing().topk_idx);
  r.topk.assign(idx.data(), idx.data() + idx.span());
  return r;
}

/// The single-process layer on all tokens; the rows and expert slices this rank holds.
Result run_single(const MoeProblem& p, const moe::MoeOptions& o, comm::Range tokens, comm::Range experts) {
  Layer layer(test::weights_of<bf16>(p), o);
  const auto x = test::device_view<Layer::matrix>("x", p.x, p.tokens, p.hidden);
  const auto dy = test::device_view<Layer::matrix>("dy", p.dy, p.tokens, p.hidden);
  const auto y = layer.forward(x);
  const auto g = layer.backward(dy);
  Kokkos::fence();
  Result r;
  r.y = rows_of(y, tokens.begin, tokens.count);
  r.dx = rows_of(g.dx, tokens.begin, tokens.count);
  r.router = test::host_f64(g.grads.router);
  r.w1 = rows_of(g.grads.w1, experts.begin, experts.count);
  r.w3 = rows_of(g.grads.w3, experts.begin, experts.count);
  r.w2 = rows_of(g.grads.w2, experts.begin, experts.count);
  r.sw1 = test::host_f64(g.grads.shared_w1);
  r.sw3 = test::host_f64(g.grads.shared_w3);
  r.sw2 = test::host_f64(g.grads.shared_w2);
  auto idx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().topk_idx);
  r.topk.assign(idx.data() + tokens.begin * p.k, idx.data() + tokens.end() * p.k);
  return r;
}

void expect_close(const std::string& where, const std::vector<double>& got, const std::vector<double>& want,
                  double tol, const char* name) {
  ASSERT_EQ(got.size(), want.size()) << where << " " << name;
  if (got.empty()) return;
  const double err = test::rel_l2(got, want);
  EXPECT_TRUE(std::isfinite(err)) << where << " " << name << ": non-finite (an unwritten element?)";
  if (std::isfinite(err)) EXPECT_LE(err, tol) << where << " " << name;
}

/// Every ep dividing the world, both paths, every engine: the distributed block against the single-process one.
void compare_with_single(const MoeProblem& p, const std::string& what) {
  auto world = comm::MpiCommunicator::world(comm::BufferMemory::device);
  const int n = world->size();
  for (int ep = 1; ep <= n; ++ep) {
    if (n % ep) continue;
    for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded})
      for (auto gemm : engines()) {
        moe::MoeOptions o;
        o.top_k = p.k;
        o.impl = impl;
        o.gemm = gemm;
        const std::string where = what + ": world " + std::to_string(n) + " ep " + std::to_string(ep) + " rank " +
                                  std::to_string(world->rank()) + " " +
                                  (impl == moe::ExpertImpl::Padded ? "padded " : "scatter ") + engine_name(gemm);
        SCOPED_TRACE(where);
        comm::ExpertParallel layout(*world, p.experts, ep);
        const auto tokens = comm::contiguous_split(p.tokens, n, world->rank());
        const Result d = run_distributed(*world, p, o, ep);
        const Result s = run_single(p, o, tokens, layout.local_experts());
        EXPECT_EQ(d.topk, s.topk) << where;
        expect_close(where, d.y, s.y, 1e-3, "y");
        expect_close(where, d.dx, s.dx, 1e-3, "dx");
        expect_close(where, d.router, s.router, 1e-4, "d router");
        expect_close(where, d.w1, s.w1, 1e-4, "dw1");
        expect_close(where, d.w3, s.w3, 1e-4, "dw3");
        expect_close(where, d.w2, s.w2, 1e-4, "dw2");
        expect_close(where, d.sw1, s.sw1, 1e-4, "d shared w1");
        expect_close(where, d.sw3, s.sw3, 1e-4, "d shared w3");
        expect_close(where, d.sw2, s.sw2, 1e-4, "d shared w2");
      }
  }
}

TEST(DistributedMoeCuda, MatchesTheSingleProcessLayer) {
  KMOE_REQUIRE_GPU();
  compare_with_single(random_problem(1000, 128, 96, 8, 2, 0, 0, 11), "Mixtral-like E8 k2");
  compare_with_single(random_problem(777, 128, 64, 64, 8, 8, 0, 12), "fine-grained E64 k8, 8 experts without tokens");
  compare_with_single(random_problem(301, 64, 48, 6, 2, 0, 40, 13), "E6 (not divisible by 4), shared expert");
  compare_with_single(random_problem(3, 64, 32, 8, 2, 0, 0, 14), "3 tokens: ranks without tokens");
  compare_with_single(random_problem(257, 64, 32, 16, 1, 2, 0, 15), "top-1");
}

std::vector<double> oracle(const io::SafetensorsFile& ref, const std::string& name) {
  const std::string twin = name + "_f64";
  auto v = io::to_host_view<double>(ref.tensor(ref.has(twin) ? twin : name));
  return std::vector<double>(v.data(), v.data() + v.extent(0));
}

TEST(DistributedMoeCuda, OracleEveryLayerEverySetBothPaths) {
  KMOE_REQUIRE_GPU();
  auto world = comm::MpiCommunicator::world(comm::BufferMemory::device);
  const int n = world->size();
  for (const std::string set : {"mixtral-tiny", "granitemoe-tiny", "granitemoeshared-tiny"}) {
    const auto ckpt = io::HfCheckpoint::open(test::testdata_dir() / set / "hf_save_pretrained");
    const auto ref = io::SafetensorsFile::open(test::testdata_dir() / set / (set + "-ref.safetensors"));
    for (int layer = 0; layer < ckpt.config().num_layers; ++layer) {
      const std::string pre = "layers." + std::to_string(layer) + ".";
      MoeProblem p = test::problem_from_weights(io::load_moe_layer<float>(ckpt, layer), int(ckpt.config().top_k));
      auto to_f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
      p.x = test::round_bf16(to_f(oracle(ref, pre + "x")));
      p.dy = test::round_bf16(to_f(oracle(ref, pre + "dy")));
      p.tokens = std::int64_t(p.x.size()) / p.hidden;
      const auto probs = oracle(ref, pre + "router_probs");
      auto idx_view = io::to_host_view<std::int64_t>(ref.tensor(pre + "topk_idx"));
      const auto tokens = comm::contiguous_split(p.tokens, n, world->rank());
      comm::ExpertParallel layout(*world, p.experts, n);
      const auto ex = layout.local_experts();
      const std::int64_t H = p.hidden, F = p.ffn;
      auto slice = [](const std::vector<double>& v, std::int64_t begin, std::int64_t count, std::int64_t inner) {
        return std::vector<double>(v.begin() + begin * inner, v.begin() + (begin + count) * inner);
      };
      for (auto impl : {moe::ExpertImpl::Scatter, moe::ExpertImpl::Padded}) {
        moe::MoeOptions o;
        o.top_k = p.k;
        o.impl = impl;
        const std::string where = set + " layer " + std::to_string(layer) + " world " + std::to_string(n) + " rank " +
                                  std::to_string(world->rank()) + (impl == moe::ExpertImpl::Padded ? " padded" : " scatter");
        SCOPED_TRACE(where);
        const Result d = run_distributed(*world, p, o, n);
        for (std::int64_t t = 0; t < tokens.count; ++t) {
          const std::int64_t g = tokens.begin + t;
          std::vector<double> pr(probs.begin() + g * p.experts, probs.begin() + (g + 1) * p.experts);
          std::sort(pr.rbegin(), pr.rend());
          if (p.k < p.experts && pr[p.k - 1] - pr[p.k] < 1e-2 * pr[0]) continue;  // a near tie in bf16
          for (int s = 0; s < p.k; ++s) EXPECT_EQ(d.topk[t * p.k + s], idx_view(g * p.k + s)) << "token " << g;
        }
        if (tokens.count > 0) {
          expect_close(where, d.y, slice(oracle(ref, pre + "y"), tokens.begin, tokens.count, H), 1e-2, "y");
          expect_close(where, d.dx, slice(oracle(ref, pre + "dx"), tokens.begin, tokens.count, H), 1e-2, "dx");
        }
        // The router gradient cancels strongly on granitemoe layer 0 (bf16 rounding of x alone moves it by 1.0e-2,
        // docs/gpu.md): the single-GPU oracle test's 2e-2.
        expect_close(where, d.router, oracle(ref, pre + "grad.gate"), 2e-2, "d gate");
        expect_close(where, d.w1, slice(oracle(ref, pre + "grad.w1"), ex.begin, ex.count, F * H), 1e-2, "dw1");
        expect_close(where, d.w3, slice(oracle(ref, pre + "grad.w3"), ex.begin, ex.count, F * H), 1e-2, "dw3");
        expect_close(where, d.w2, slice(oracle(ref, pre + "grad.w2"), ex.begin, ex.count, H * F), 1e-2, "dw2");
      }
    }
  }
}

TEST(DistributedMoeCuda, RefusesAHostMemoryCommunicator) {
  KMOE_REQUIRE_GPU();
  auto world = comm::MpiCommunicator::world(comm::BufferMemory::host);
  const MoeProblem p = random_problem(16, 64, 32, 4, 2, 0, 0, 1);
  const auto full = test::weights_of<bf16>(p);
  comm::ExpertParallel layout(*world, p.experts);
  moe::MoeOptions o;
  EXPECT_THROW(Dist(layout, comm::local_slice(full, layout), o), UsageError);
}

}  // namespace
