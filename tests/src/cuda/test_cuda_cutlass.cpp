// The CUTLASS engine's grouped GEMMs (<kmoe/core/cuda/cutlass_grouped.hpp>), every GEMM of the MoE block, on random
// shapes (E = 8 and 64, k = 1, 2, 8, experts without rows, row counts and H/F not multiples of any tile), against a
// float64 host reference of the documented semantics (kernels.hpp) and against kmoe's own grouped kernel on the same
// device data. Outputs are poisoned (NaN bytes) first, so an unwritten element fails; an expert without rows must
// get exactly zero weight gradients. DEPENDENCIES.md: an older CUTLASS (3.4.1) returned wrong results silently with
// nvcc 13, which is why every op is checked here before the engine is trusted.
#include "cuda_test.hpp"
#include "layer_util.hpp"
#include "moe_reference.hpp"

#include <kmoe/core/cuda/cutlass_grouped.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <cstdio>
#include <random>
#include <string>

namespace {

using namespace kmoe;
using namespace kmoe::core::cuda;
using test::DeviceBuffer;

#define KMOE_REQUIRE_CUTLASS()                                                                               \
  do {                                                                                                       \
    KMOE_REQUIRE_GPU();                                                                                      \
    if (!cutlass_grouped_available())                                                                        \
      GTEST_SKIP() << "the CUTLASS engine is not built (KMOE_ENABLE_CUTLASS=OFF) or the device is not sm_90"; \
  } while (0)

struct OpCase {
  std::int64_t tokens;
  int hidden, ffn, experts, k, dead_experts;
};

/// Host and device copies of one bf16 tensor (values bf16-representable, so the reference sees what the GPU sees).
std::vector<std::uint16_t> random_bits(std::int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = nd(rng);
  return test::to_bf16_bits(v);
}
struct Tensor {
  std::vector<std::uint16_t> bits;
  std::vector<double> host;
  DeviceBuffer<std::uint16_t> dev;
  Tensor(std::int64_t n, float scale, std::mt19937& rng)
      : bits(random_bits(n, scale, rng)), host(test::bf16_bits_to_double(bits)), dev(bits) {}
};

/// Row offsets of E groups: each of R rows picks a live expert (experts 1, 1 + E/dead, ... get no rows).
std::vector<std::int64_t> random_offsets(int E, std::int64_t R, int dead, std::mt19937& rng) {
  std::vector<std::int64_t> counts(E, 0);
  std::vector<int> live;
  for (int e = 0; e < E; ++e)
    if (dead == 0 || e % (E / dead) != 1) live.push_back(e);
  std::uniform_int_distribution<int> pick(0, int(live.size()) - 1);
  for (std::int64_t r = 0; r < R; ++r) ++counts[live[pick(rng)]];
  std::vector<std::int64_t> off(E + 1, 0);
  for (int e = 0; e < E; ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

/// One grouped problem: rows grouped by expert (random counts, `dead` experts without rows), the block's tensors.
struct Problem {
  std::mt19937 rng;
  int E, H, F;
  std::int64_t R;
  Tensor xg, w1, w3, w2, act, dh13, d_out;
  std::vector<std::int64_t> off;  // [E+1]
  DeviceBuffer<std::int64_t> d_off;
  Problem(const OpCase& c, unsigned seed)
      : rng(seed), E(c.experts), H(c.hidden), F(c.ffn), R(c.tokens * c.k), xg(R * H, 1.f, rng),
        w1(std::int64_t(E) * F * H, 0.1f, rng), w3(std::int64_t(E) * F * H, 0.1f, rng),
        w2(std::int64_t(E) * H * F, 0.1f, rng), act(R * F, 1.f, rng), dh13(R * 2 * F, 1.f, rng),
        d_out(R * H, 1.f, rng), off(random_offsets(E, R, c.dead_experts, rng)), d_off(off) {}
  bool empty(int e) const { return off[e + 1] == off[e]; }
};

/// Stored row j (of row_len values) of group g's B, stacked from b0 (split rows per group) and b1.
double b_at(const std::vector<double>& b0, const std::vector<double>* b1, std::int64_t stored, std::int64_t split,
            std::int64_t row_len, int g, std::int64_t j, std::int64_t i) {
  if (j < split) return b0[(g * split + j) * row_len + i];
  return (*b1)[(g * (stored - split) + (j - split)) * row_len + i];
}

/// float64 reference of grouped_gemm's semantics (unindexed rows, C overwritten, ldc = n).
std::vector<double> ref_grouped(const Problem& p, const std::vector<double>& a, std::int64_t lda, bool b_trans,
                                const std::vector<double>& b0, const std::vector<double>* b1, std::int64_t split,
                                std::int64_t N, std::int64_t K) {
  const std::int64_t stored = b_trans ? N : K, row_len = b_trans ? K : N;
  if (!b1) split = stored;
  std::vector<double> c(p.R * N);
  for (int g = 0; g < p.E; ++g)
    for (std::int64_t r = p.off[g]; r < p.off[g + 1]; ++r)
      for (std::int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (std::int64_t k = 0; k < K; ++k)
          s += a[r * lda + k] * (b_trans ? b_at(b0, b1, stored, split, row_len, g, n, k)
                                         : b_at(b0, b1, stored, split, row_len, g, k, n));
        c[r * N + n] = s;
      }
  return c;
}

/// float64 reference of grouped_gemm_tn: C_g = A_gᵀ·B_g as [E, M, N] (split into c0/c1 by the caller's layout).
std::vector<double> ref_tn(const Problem& p, const std::vector<double>& a, std::int64_t lda, std::int64_t M,
                           const std::vector<double>& b, std::int64_t ldb, std::int64_t N) {
  std::vector<double> c(std::int64_t(p.E) * M * N, 0.0);
  for (int g = 0; g < p.E; ++g)
    for (std::int64_t r = p.off[g]; r < p.off[g + 1]; ++r)
      for (std::int64_t m = 0; m < M; ++m) {
        const double av = a[r * lda + m];
        double* crow = &c[(g * M + m) * N];
        for (std::int64_t n = 0; n < N; ++n) crow[n] += av * b[r * ldb + n];
      }
  return c;
}

std::vector<double> download_f32(const DeviceBuffer<float>& b) {
  const auto h = b.download();
  return std::vector<double>(h.begin(), h.end());
}

/// Runs a row-grouped op with the CUTLASS engine and with kmoe's kernel; checks both against `want`.
void check_grouped(const std::string& label, const Problem& p, GroupedGemmArgs args, const std::vector<double>& want,
                   void* work) {
  DeviceBuffer<std::uint16_t> c_cutlass(p.R * args.n), c_kernel(p.R * args.n);
  c_cutlass.poison();
  c_kernel.poison();
  args.groups = p.E;
  args.rows = p.R;
  args.offsets = p.d_off.get();
  args.ldc = args.n;
  args.c_bf16 = c_cutlass.get();
  grouped_gemm_cutlass(args, work, nullptr);
  KMOE_CUDA_CHECK(cudaDeviceSynchronize());
  // kmoe's kernel needs the tile offsets: rebuild them from the counts (prefix of ceil(count / 128)).
  std::vector<std::int64_t> tiles(p.E + 1, 0);
  for (int e = 0; e < p.E; ++e) tiles[e + 1] = tiles[e] + (p.off[e + 1] - p.off[e] + kGemmTileRows - 1) / kGemmTileRows;
  DeviceBuffer<std::int64_t> d_tiles(tiles);
  args.tile_offsets = d_tiles.get();
  args.c_bf16 = c_kernel.get();
  grouped_gemm(args, nullptr);
  const auto got = test::bf16_bits_to_double(c_cutlass.download());
  const auto kern = test::bf16_bits_to_double(c_kernel.download());
  const double e_ref = test::rel_l2(got, want), e_kernel = test::rel_l2(got, kern), k_ref = test::rel_l2(kern, want);
  std::printf("%-34s cutlass vs f64 %.2e  vs kernel %.2e  (kernel vs f64 %.2e)\n", label.c_str(), e_ref, e_kernel,
              k_ref);
  EXPECT_LE(e_ref, 1e-2) << label;  // bf16 output: ~2e-3 expected
  EXPECT_LE(e_kernel, 1e-2) << label;
}

/// Runs a weight-gradient op with both engines; checks against want ([E, M, N]) and that empty experts get zeros.
/// c_split > 0: rows m < c_split go to c0, the rest to c1 (as d[W1;W3]); 0: all to c0. bf16_out: the bf16 outputs
/// (c0_bf16/c1_bf16, as MoeGrads::dw*_bf16) instead of fp32.
void check_tn(const std::string& label, const Problem& p, GroupedGemmTNArgs args, std::int64_t c_split,
              const std::vector<double>& want, void* work, bool bf16_out = false) {
  const std::int64_t M = args.m, N = args.n, split = c_split > 0 ? c_split : M;
  const std::int64_t E = p.E;
  auto run = [&](bool cutlass) {
    DeviceBuffer<float> c0(bf16_out ? 0 : E * split * N), c1(bf16_out ? 0 : E * (M - split) * N);
    DeviceBuffer<std::uint16_t> b0(bf16_out ? E * split * N : 0), b1(bf16_out ? E * (M - split) * N : 0);
    for (auto* b : {&c0, &c1}) b->poison();
    for (auto* b : {&b0, &b1}) b->poison();
    GroupedGemmTNArgs a = args;
    a.groups = p.E;
    a.rows = p.R;
    a.offsets = p.d_off.get();
    a.c0 = bf16_out ? nullptr : c0.get();
    a.c1 = c_split > 0 && !bf16_out ? c1.get() : nullptr;
    a.c0_bf16 = bf16_out ? b0.get() : nullptr;
    a.c1_bf16 = c_split > 0 && bf16_out ? b1.get() : nullptr;
    a.c_split = c_split;
    if (cutlass) grouped_gemm_tn_cutlass(a, work, nullptr);
    else grouped_gemm_tn(a, nullptr);
    // back to [E, M, N]
    const auto h0 = bf16_out ? test::bf16_bits_to_double(b0.download()) : download_f32(c0);
    const auto h1 = bf16_out ? test::bf16_bits_to_double(b1.download()) : download_f32(c1);
    std::vector<double> out(E * M * N);
    for (std::int64_t g = 0; g < E; ++g)
      for (std::int64_t m = 0; m < M; ++m)
        for (std::int64_t n = 0; n < N; ++n)
          out[(g * M + m) * N + n] =
              m < split ? h0[(g * split + m) * N + n] : h1[(g * (M - split) + (m - split)) * N + n];
    return out;
  };
  const auto got = run(true), kern = run(false);
  const double e_ref = test::rel_l2(got, want), e_kernel = test::rel_l2(got, kern), k_ref = test::rel_l2(kern, want);
  double empty_max = 0;
  int empties = 0;
  for (int g = 0; g < p.E; ++g) {
    if (!p.empty(g)) continue;
    ++empties;
    for (std::int64_t i = 0; i < M * N; ++i) empty_max = std::max(empty_max, std::abs(got[g * M * N + i]));
  }
  std::printf("%-34s cutlass vs f64 %.2e  vs kernel %.2e  (kernel vs f64 %.2e)  %d empty experts, max |dW| %.1e\n",
              label.c_str(), e_ref, e_kernel, k_ref, empties, empty_max);
  const double tol = bf16_out ? 1e-2 : 1e-5;  // fp32 output of exact bf16 products and fp32 sums; or bf16-rounded
  EXPECT_LE(e_ref, tol) << label;
  EXPECT_LE(e_kernel, tol) << label;
  EXPECT_EQ(empty_max, 0.0) << label << ": an expert without rows must get a zero gradient";
}

TEST(CudaCutlass, EveryBlockGemmOnRandomShapes) {
  KMOE_REQUIRE_CUTLASS();
  const OpCase cases[] = {
      {300, 256, 136, 8, 2, 2},    // Mixtral-like routing, 2 empty experts, F not a multiple of 64
      {130, 200, 96, 64, 8, 8},    // fine-grained: 64 experts, 8 empty, H not a multiple of any tile
      {77, 128, 64, 8, 1, 0},      // k = 1, few rows per expert
      {1500, 512, 384, 64, 2, 4},  // more rows: several M tiles per expert, several K tiles per weight gradient
  };
  unsigned seed = 1;
  for (const OpCase& c : cases) {
    Problem p(c, seed++);
    DeviceBuffer<unsigned char> work(cutlass_grouped_workspace_bytes(p.E));
    work.poison();
    const std::int64_t H = p.H, F = p.F;
    char buf[96];
    std::snprintf(buf, sizeof buf, "T=%lld k=%d E=%d H=%d F=%d", static_cast<long long>(c.tokens), c.k, c.experts,
                  c.hidden, c.ffn);
    const std::string tag = buf;
    std::printf("%s: rows %lld, %d dead experts\n", tag.c_str(), static_cast<long long>(p.R), c.dead_experts);

    GroupedGemmArgs up;  // h13 = xg·[W1;W3]ᵀ (2 groups per expert: the two column halves)
    up.n = 2 * F;
    up.k = H;
    up.a = p.xg.dev.get();
    up.lda = H;
    up.b_trans = true;
    up.b0 = p.w1.dev.get();
    up.b1 = p.w3.dev.get();
    up.b_split = F;
    check_grouped("up   xg·[W1;W3]ᵀ " + tag, p, up, ref_grouped(p, p.xg.host, H, true, p.w1.host, &p.w3.host, F, 2 * F, H),
                  work.get());

    GroupedGemmArgs down;  // out = act·W2ᵀ
    down.n = H;
    down.k = F;
    down.a = p.act.dev.get();
    down.lda = F;
    down.b_trans = true;
    down.b0 = p.w2.dev.get();
    check_grouped("down act·W2ᵀ " + tag, p, down, ref_grouped(p, p.act.host, F, true, p.w2.host, nullptr, 0, H, F),
                  work.get());

    GroupedGemmArgs dact;  // d_act = d_out·W2
    dact.n = F;
    dact.k = H;
    dact.a = p.d_out.dev.get();
    dact.lda = H;
    dact.b_trans = false;
    dact.b0 = p.w2.dev.get();
    check_grouped("dact d_out·W2 " + tag, p, dact, ref_grouped(p, p.d_out.host, H, false, p.w2.host, nullptr, 0, F, H),
                  work.get());

    GroupedGemmArgs dx;  // dx_rows = dh13·[W1;W3] (two launches, the second accumulating)
    dx.n = H;
    dx.k = 2 * F;
    dx.a = p.dh13.dev.get();
    dx.lda = 2 * F;
    dx.b_trans = false;
    dx.b0 = p.w1.dev.get();
    dx.b1 = p.w3.dev.get();
    dx.b_split = F;
    check_grouped("dx   dh13·[W1;W3] " + tag, p, dx,
                  ref_grouped(p, p.dh13.host, 2 * F, false, p.w1.host, &p.w3.host, F, H, 2 * F), work.get());

    GroupedGemmTNArgs w13;  // d[W1;W3] = dh13ᵀ·xg into dW1 / dW3
    w13.m = 2 * F;
    w13.n = H;
    w13.a = p.dh13.dev.get();
    w13.lda = 2 * F;
    w13.b = p.xg.dev.get();
    w13.ldb = H;
    const auto want13 = ref_tn(p, p.dh13.host, 2 * F, 2 * F, p.xg.host, H, H);
    check_tn("dW13 dh13ᵀ·xg " + tag, p, w13, F, want13, work.get());
    check_tn("dW13 bf16 out " + tag, p, w13, F, want13, work.get(), true);

    GroupedGemmTNArgs w2;  // dW2 = d_outᵀ·act
    w2.m = H;
    w2.n = F;
    w2.a = p.d_out.dev.get();
    w2.lda = H;
    w2.b = p.act.dev.get();
    w2.ldb = F;
    check_tn("dW2  d_outᵀ·act " + tag, p, w2, 0, ref_tn(p, p.d_out.host, H, H, p.act.host, F, F), work.get());
  }
}

/// The block with the CUTLASS engine never waits for the host, so a CUDA graph can capture a whole forward +
/// backward of MoeLayer<bf16, Kokkos::Cuda>; replaying it must give bit-identical results (every kernel is
/// deterministic: no atomics, no split-K).
TEST(CudaCutlass, BlockIsCapturableInACudaGraph) {
  KMOE_REQUIRE_CUTLASS();
  using Layer = moe::MoeLayer<bf16, Kokkos::Cuda>;
  const std::int64_t T = 333, H = 256, F = 192, E = 16;
  cudaStream_t stream = nullptr;
  KMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  {
    const Kokkos::Cuda space(stream);
    auto random = [&](auto view, float scale, std::uint64_t seed) {
      fill_random_bf16(reinterpret_cast<bf16_t*>(view.data()), view.span(), scale, seed, nullptr);
      return view;
    };
    moe::MoeWeights<bf16, Kokkos::Cuda> w;
    w.router = random(Layer::matrix("router", E, H), 0.1f, 3);
    w.w1 = random(Layer::views::tensor3("w1", E, F, H), 0.1f, 4);
    w.w3 = random(Layer::views::tensor3("w3", E, F, H), 0.1f, 5);
    w.w2 = random(Layer::views::tensor3("w2", E, H, F), 0.1f, 6);
    const auto x = random(Layer::matrix("x", T, H), 1.f, 1);
    const auto dy = random(Layer::matrix("dy", T, H), 1.f, 2);
    Layer::matrix y("y", T, H);
    KMOE_CUDA_CHECK(cudaDeviceSynchronize());
    moe::MoeOptions o;
    o.top_k = 4;
    o.gemm = core::GemmAlgo::Cutlass;
    Layer layer(w, o, space);
    moe::MoeBackward<bf16, Kokkos::Cuda> g;
    g.dx = Layer::grad_matrix("dx", T, H);
    g.grads = moe::uninitialized_like<float>(w);
    auto step = [&] {
      layer.forward(x, y);
      layer.backward(dy, g);
    };
    step();  // eager run: the reference (the workspace is allocated here, and CUTLASS' one-time host setup)
    KMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    ASSERT_STREQ(layer.gemm_engine(), "cutlass");
    const auto y0 = test::host_bytes(y), dx0 = test::host_bytes(g.dx), dw10 = test::host_bytes(g.grads.w1),
               dw30 = test::host_bytes(g.grads.w3), dw20 = test::host_bytes(g.grads.w2),
               dg0 = test::host_bytes(g.grads.router);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    // Relaxed: CUTLASS' initialize() sets the kernel's shared-memory attribute on the host at each launch.
    KMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    step();
    KMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    KMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (const auto& v : {g.dx, g.grads.router}) Kokkos::deep_copy(v, test::nan_value<float>());
    for (const auto& v : {g.grads.w1, g.grads.w3, g.grads.w2}) Kokkos::deep_copy(v, test::nan_value<float>());
    Kokkos::deep_copy(y, test::nan_value<bf16>());
    KMOE_CUDA_CHECK(cudaDeviceSynchronize());
    KMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    KMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_EQ(test::host_bytes(y), y0);
    EXPECT_EQ(test::host_bytes(g.dx), dx0);
    EXPECT_EQ(test::host_bytes(g.grads.w1), dw10);
    EXPECT_EQ(test::host_bytes(g.grads.w3), dw30);
    EXPECT_EQ(test::host_bytes(g.grads.w2), dw20);
    EXPECT_EQ(test::host_bytes(g.grads.router), dg0);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  cudaStreamDestroy(stream);
}

TEST(CudaCutlass, RejectsIndexedRowsAndMisalignedSizes) {
  KMOE_REQUIRE_CUTLASS();
  DeviceBuffer<unsigned char> work(cutlass_grouped_workspace_bytes(4));
  DeviceBuffer<std::uint16_t> buf(1 << 16);
  DeviceBuffer<std::int64_t> idx(64);
  GroupedGemmArgs a;
  a.rows = 64;
  a.n = 64;
  a.k = 64;
  a.a = buf.get();
  a.lda = 64;
  a.b0 = buf.get();
  a.c_bf16 = buf.get();
  a.ldc = 64;
  a.a_index = idx.get();
  EXPECT_THROW(grouped_gemm_cutlass(a, work.get(), nullptr), kmoe::InputError);
  a.a_index = nullptr;
  a.k = 60;  // rows of 120 bytes: not TMA-aligned
  EXPECT_THROW(grouped_gemm_cutlass(a, work.get(), nullptr), kmoe::InputError);
}

}  // namespace
