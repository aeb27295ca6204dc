// kmoe expert-parallel MoE layer benchmark: comm::DistributedMoe with one process per GPU (NCCL, device views) or per
// CPU rank (MPI, host views), checked against the single-process MoeLayer and timed against it. Run under mpirun:
//   mpirun -np 2 build/bin/bench_ep_moe [--shape all|mixtral|finegrained] [--backend nccl|mpi] [--ep N]
//          [--hidden H] [--ffn F] [--experts E] [--top-k k] [--tokens T] [--iters 10] [--warmup 2] [--seed 1]
//          [--single-impl padded|scatter] [--tol 1e-4]
// Shapes (defaults): mixtral H=4096 F=14336 E=8 k=2, 4096 tokens per rank; finegrained H=2048 F=768 E=64 k=8, 8192
// tokens per rank. --hidden/--ffn/--experts/--top-k/--tokens override the selected shapes. float32 math throughout: the
// portable DistributedMoe/MoeLayer path (Kokkos kernels, KokkosBlas GEMMs -> cuBLAS SGEMM on the GPU), not the bf16
// CUDA block.
//
// For every shape, every rank:
//  1. builds the same global batch (world x T tokens) and weights from the seed on its own device (counter-based hash,
//     identical on every rank), runs the single-process MoeLayer on the whole batch, runs DistributedMoe on its T tokens
//     (experts split over the ep group), reduces the gradients, and reports the relative L2 error ||a - b|| / ||b|| of
//     y, dx, the router gradient and the expert gradients (PASS within --tol, else FAIL and exit status 1). x and the
//     router hold small multiples of powers of two, so router logits are exact in float32 in any summation order: both
//     runs pick the same experts even at near-ties, which a GEMM of another row count could otherwise flip;
//  2. times forward, backward and the gradient reduction (median over --iters after --warmup, slowest rank of each
//     iteration), and the single-process layer on one GPU with the global batch (the same work) and with the per-rank
//     batch (the same tokens per GPU);
//  3. prints an nccl-tests style table (docs/comm.md "Measuring") of dispatch (DispatchHandle + dispatch_forward) and
//     combine (combine_forward) on the layer's own routing, next to a plain all-to-all with equal splits of the same
//     byte count (grouped ncclSend/ncclRecv, or MPI_Alltoall), each with #wrong.
#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/config.hpp>
#include <kmoe/core/version.hpp>
#include <kmoe/moe/moe_layer.hpp>
#if KMOE_ENABLE_NCCL
#include <kmoe/comm/nccl_communicator.hpp>
#endif

#include <Kokkos_Core.hpp>
#if defined(KOKKOS_ENABLE_CUDA)
#include <cuda_runtime_api.h>
#endif
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace kmoe;
using Clock = std::chrono::steady_clock;
using i64 = std::int64_t;

const char* const kProgram = "bench_ep_moe";

struct Shape {
  std::string name;
  i64 hidden, ffn, experts, top_k, tokens;  // tokens per rank
};

struct Options {
  std::vector<Shape> shapes;
  std::string backend;
  int ep = 0, iters = 10, warmup = 2;
  std::uint64_t seed = 1;
  moe::ExpertImpl single_impl = moe::ExpertImpl::Padded;
  double tol = 1e-4;
};

std::string default_backend() {
#if KMOE_ENABLE_NCCL
  if (!Kokkos::SpaceAccessibility<Kokkos::HostSpace, Kokkos::DefaultExecutionSpace::memory_space>::accessible)
    return "nccl";
#endif
  return "mpi";
}

Options parse(int argc, char** argv) {
  Options o;
  std::map<std::string, std::string> kv;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--kokkos", 8) == 0) continue;  // Kokkos' own (--kokkos-x=y): Kokkos reads them
    KMOE_CHECK_USAGE(std::strncmp(argv[i], "--", 2) == 0 && i + 1 < argc, kProgram, ": expected --option value at '",
                     argv[i], "'");
    kv[argv[i] + 2] = argv[i + 1];
    ++i;
  }
  auto take = [&](const char* k) -> std::optional<std::string> {
    auto it = kv.find(k);
    if (it == kv.end()) return std::nullopt;
    std::string v = it->second;
    kv.erase(it);
    return v;
  };
  auto number = [&](const char* k, auto& v) {
    if (auto s = take(k)) {
      std::size_t used = 0;
      long long n = 0;
      try {
        n = std::stoll(*s, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      KMOE_CHECK_USAGE(used == s->size() && !s->empty(), kProgram, ": --", k, " '", *s, "' is not an integer");
      v = static_cast<std::decay_t<decltype(v)>>(n);
    }
  };
  const Shape mixtral{"mixtral", 4096, 14336, 8, 2, 4096};
  const Shape finegrained{"finegrained", 2048, 768, 64, 8, 8192};
  const std::string which = take("shape").value_or("all");
  if (which == "all") o.shapes = {mixtral, finegrained};
  else if (which == "mixtral") o.shapes = {mixtral};
  else if (which == "finegrained") o.shapes = {finegrained};
  else throw UsageError(std::string(kProgram) + ": --shape " + which + " (expected all, mixtral or finegrained)");
  // Overrides apply to every selected shape (-1: keep the shape's own value).
  Shape over{"", -1, -1, -1, -1, -1};
  number("hidden", over.hidden);
  number("ffn", over.ffn);
  number("experts", over.experts);
  number("top-k", over.top_k);
  number("tokens", over.tokens);
  for (auto& s : o.shapes) {
    const std::pair<i64*, i64> fields[] = {{&s.hidden, over.hidden}, {&s.ffn, over.ffn}, {&s.experts, over.experts},
                                           {&s.top_k, over.top_k}, {&s.tokens, over.tokens}};
    for (const auto& [field, value] : fields)
      if (value != -1) *field = value;
  }
  number("ep", o.ep);
  number("iters", o.iters);
  number("warmup", o.warmup);
  number("seed", o.seed);
  o.backend = take("backend").value_or(default_backend());
  if (auto s = take("single-impl")) o.single_impl = moe::parse_expert_impl(*s);
  if (auto s = take("tol")) {
    char* end = nullptr;
    o.tol = std::strtod(s->c_str(), &end);
    KMOE_CHECK_USAGE(end && *end == 0 && o.tol > 0, kProgram, ": --tol '", *s, "' is not a positive number");
  }
  KMOE_CHECK_USAGE(kv.empty(), kProgram, ": unknown option --", kv.empty() ? "" : kv.begin()->first);
  KMOE_CHECK_USAGE(o.iters >= 1 && o.warmup >= 0, kProgram, ": --iters ", o.iters, " --warmup ", o.warmup,
                   " (need iters >= 1, warmup >= 0)");
  KMOE_CHECK_USAGE(o.backend == "nccl" || o.backend == "mpi", kProgram, ": --backend ", o.backend,
                   " (expected nccl or mpi)");
  for (const auto& s : o.shapes)
    KMOE_CHECK_USAGE(s.hidden > 0 && s.ffn > 0 && s.experts > 0 && s.tokens > 0 && s.top_k >= 1 && s.top_k <= s.experts,
                     kProgram, ": shape ", s.name, " H=", s.hidden, " F=", s.ffn, " E=", s.experts, " k=", s.top_k,
                     " T=", s.tokens, " (need positive sizes and 1 <= k <= E)");
  return o;
}

// ---- device kernels (named functions: nvcc rejects device lambdas inside lambdas) -----------------------------

KOKKOS_INLINE_FUNCTION std::uint64_t mix64(std::uint64_t z) {  // splitmix64's finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <class V>
using Flat = Kokkos::View<typename V::value_type*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
template <class V>
Flat<V> flat(const V& v) {
  return Flat<V>(v.data(), v.span());
}
template <class Exec>
using Range1 = Kokkos::RangePolicy<Exec, Kokkos::IndexType<i64>>;
template <class Exec>
using Range2 = Kokkos::MDRangePolicy<Exec, Kokkos::Rank<2>, Kokkos::IndexType<i64>>;

/// v = scale * u, u uniform in (-1, 1) from a hash of (seed, flat index): the same values on every rank and device.
template <class Exec, class V>
void fill_uniform(const V& v, std::uint64_t seed, float scale) {
  const auto f = flat(v);
  Kokkos::parallel_for(
      "bench_ep_moe::fill_uniform", Range1<Exec>(0, static_cast<i64>(f.extent(0))), KOKKOS_LAMBDA(const i64 i) {
        const std::uint64_t h = mix64(seed ^ mix64(static_cast<std::uint64_t>(i)));
        const float u = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1), never 0.5 exactly
        f(i) = scale * (2.0f * u - 1.0f);
      });
  Kokkos::fence();
}

/// v = {-2, -1, 1, 2}[hash] / denom (denom a power of two): products and sums of such values are exact in float32.
template <class Exec, class V>
void fill_quantized(const V& v, std::uint64_t seed, float denom) {
  const auto f = flat(v);
  Kokkos::parallel_for(
      "bench_ep_moe::fill_quantized", Range1<Exec>(0, static_cast<i64>(f.extent(0))), KOKKOS_LAMBDA(const i64 i) {
        const std::uint64_t h = mix64(seed ^ mix64(static_cast<std::uint64_t>(i)));
        const int q = static_cast<int>(h >> 62);  // 0..3
        f(i) = static_cast<float>(q < 2 ? q - 2 : q - 1) / denom;
      });
  Kokkos::fence();
}

// The check payload of the all-to-all rows: token g's column c holds g + (c % 3) * 2^21, exact in float32 for
// g < 2^21, so a received row names its token in column 0 and its other columns can be checked against it.
constexpr float kColumnStride = 2097152.0f;
KOKKOS_INLINE_FUNCTION float encoded(i64 g, i64 c) {
  return static_cast<float>(g) + static_cast<float>(c % 3) * kColumnStride;
}

template <class Exec, class M>
void fill_encoded(const M& x, i64 first_token) {
  Kokkos::parallel_for(
      "bench_ep_moe::fill_encoded", Range2<Exec>({0, 0}, {static_cast<i64>(x.extent(0)), static_cast<i64>(x.extent(1))}),
      KOKKOS_LAMBDA(const i64 t, const i64 c) { x(t, c) = encoded(first_token + t, c); });
  Kokkos::fence();
}

/// Elements of the received rows [R, H] that do not match their own column 0 (the token id).
template <class Exec, class M>
i64 count_wrong_columns(const M& rows) {
  i64 wrong = 0;
  if (rows.extent(0) == 0) return 0;
  Kokkos::parallel_reduce(
      "bench_ep_moe::check_dispatch",
      Range2<Exec>({0, 0}, {static_cast<i64>(rows.extent(0)), static_cast<i64>(rows.extent(1))}),
      KOKKOS_LAMBDA(const i64 r, const i64 c, i64& acc) {
        const float g = rows(r, 0);
        if (rows(r, c) != g + static_cast<float>(c % 3) * kColumnStride) ++acc;
      },
      wrong);
  return wrong;
}

/// Column 0 of [R, H] rows, on the host.
template <class Exec, class M>
std::vector<float> first_column(const M& rows) {
  Kokkos::View<float*, typename M::memory_space> col("bench_ep_moe::col0", rows.extent(0));
  Kokkos::parallel_for(
      "bench_ep_moe::col0", Range1<Exec>(0, static_cast<i64>(rows.extent(0))),
      KOKKOS_LAMBDA(const i64 r) { col(r) = rows(r, 0); });
  Kokkos::fence();
  const auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), col);
  return std::vector<float>(h.data(), h.data() + h.extent(0));
}

/// Elements of the round trip [T*k, H] (pair order) that differ from their token's encoded row.
template <class Exec, class M>
i64 count_wrong_round_trip(const M& back, i64 first_token, i64 k) {
  i64 wrong = 0;
  if (back.extent(0) == 0) return 0;
  Kokkos::parallel_reduce(
      "bench_ep_moe::check_combine",
      Range2<Exec>({0, 0}, {static_cast<i64>(back.extent(0)), static_cast<i64>(back.extent(1))}),
      KOKKOS_LAMBDA(const i64 a, const i64 c, i64& acc) {
        if (back(a, c) != encoded(first_token + a / k, c)) ++acc;
      },
      wrong);
  return wrong;
}

// Plain all-to-all payload: element i of the chunk from rank q to rank p holds (q * n + p) * 1024 + i % 1024.
KOKKOS_INLINE_FUNCTION float plain_value(int from, int to, int ranks, i64 i) {
  return static_cast<float>(from * ranks + to) * 1024.0f + static_cast<float>(i % 1024);
}

template <class Exec, class V>
void fill_plain(const V& send, int me, int ranks, i64 per_peer) {
  Kokkos::parallel_for(
      "bench_ep_moe::fill_plain", Range1<Exec>(0, static_cast<i64>(send.extent(0))), KOKKOS_LAMBDA(const i64 i) {
        send(i) = plain_value(me, static_cast<int>(i / per_peer), ranks, i % per_peer);
      });
  Kokkos::fence();
}

template <class Exec, class V>
i64 count_wrong_plain(const V& recv, int me, int ranks, i64 per_peer) {
  i64 wrong = 0;
  Kokkos::parallel_reduce(
      "bench_ep_moe::check_plain", Range1<Exec>(0, static_cast<i64>(recv.extent(0))),
      KOKKOS_LAMBDA(const i64 i, i64& acc) {
        if (recv(i) != plain_value(static_cast<int>(i / per_peer), me, ranks, i % per_peer)) ++acc;
      },
      wrong);
  return wrong;
}

/// sum (a - b[offset + i])^2 and sum b[offset + i]^2 over a's elements (a, b contiguous; b at least offset + a.span()).
template <class Exec, class A, class B>
void add_error(const A& a, const B& b, i64 offset, double& num, double& den) {
  KMOE_ASSERT(static_cast<i64>(b.span()) >= offset + static_cast<i64>(a.span()), "reference too small");
  const auto fa = flat(a);
  const auto fb = flat(b);
  double n = 0, d = 0;
  Kokkos::parallel_reduce(
      "bench_ep_moe::err_num", Range1<Exec>(0, static_cast<i64>(fa.extent(0))), KOKKOS_LAMBDA(const i64 i, double& acc) {
        const double e = static_cast<double>(fa(i)) - static_cast<double>(fb(offset + i));
        acc += e * e;
      },
      n);
  Kokkos::parallel_reduce(
      "bench_ep_moe::err_den", Range1<Exec>(0, static_cast<i64>(fa.extent(0))), KOKKOS_LAMBDA(const i64 i, double& acc) {
        const double v = static_cast<double>(fb(offset + i));
        acc += v * v;
      },
      d);
  num += n;
  den += d;
}

// ---- host helpers ---------------------------------------------------------------------------------------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// The slowest rank's value of every entry (in place).
void max_over_ranks(std::vector<double>& v, comm::MpiCommunicator& mpi) {
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_DOUBLE, MPI_MAX, mpi.native()));
}

i64 sum_over_ranks(i64 v, comm::MpiCommunicator& mpi) {
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT64_T, MPI_SUM, mpi.native()));
  return v;
}

/// Times `step` (which returns the seconds of its `phases` phases) --iters times after --warmup: the slowest rank of
/// each iteration, then the median over the iterations of each phase and, last, of the sum of the first `summed`
/// phases (forward + backward).
template <class Step>
std::vector<double> time_phases(const Options& o, int phases, int summed, comm::Communicator& sync,
                                comm::MpiCommunicator& mpi, Step&& step) {
  std::vector<std::vector<double>> t(static_cast<std::size_t>(phases + 1));
  for (int it = -o.warmup; it < o.iters; ++it) {
    sync.barrier();
    Kokkos::fence();
    const std::vector<double> p = step();
    if (it < 0) continue;
    double total = 0;
    for (int i = 0; i < phases; ++i) {
      t[i].push_back(p[i]);
      if (i < summed) total += p[i];
    }
    t[phases].push_back(total);
  }
  std::vector<double> med;
  for (auto& v : t) {
    max_over_ranks(v, mpi);
    med.push_back(median(v));
  }
  return med;
}

struct Summary {
  Shape shape;
  int world = 1, ep = 1;
  double ep_ms = 0, single_global_ms = 0, single_rank_ms = 0, reduce_ms = 0;
  double dispatch_busbw = 0, combine_busbw = 0, plain_busbw = 0;
  double max_err = 0;
  i64 wrong = 0, routing_diff = 0;
  bool pass = false;
};

std::string device_description(int device) {
#if defined(KOKKOS_ENABLE_CUDA)
  if (device >= 0) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, device) == cudaSuccess) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "GPU %d %s (pci %04x:%02x:%02x, %.0f GiB)", device, p.name, p.pciDomainID,
                    p.pciBusID, p.pciDeviceID, static_cast<double>(p.totalGlobalMem) / (1ull << 30));
      return buf;
    }
  }
#endif
  (void)device;
  return std::string("host ") + Kokkos::DefaultHostExecutionSpace::name();
}

/// GiB of device memory in use on this rank's GPU (0 without CUDA).
double device_gib_in_use() {
#if defined(KOKKOS_ENABLE_CUDA)
  std::size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) return static_cast<double>(total_b - free_b) / (1ull << 30);
  cudaGetLastError();
#endif
  return 0;
}

/// One equal-split all-to-all of `per_peer` floats per peer over `group`: grouped ncclSend/ncclRecv on the NCCL
/// communicator's stream (device buffers), or MPI_Alltoall (host buffers). Blocks until received.
template <class V>
void plain_alltoall(comm::Communicator& group, const V& send, const V& recv, i64 per_peer) {
#if KMOE_ENABLE_NCCL
  if (auto* nc = dynamic_cast<comm::NcclCommunicator*>(&group)) {
    KMOE_NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < nc->size(); ++p) {
      KMOE_NCCL_CHECK(ncclSend(send.data() + p * per_peer, static_cast<std::size_t>(per_peer), ncclFloat32, p,
                               nc->native(), nc->stream()));
      KMOE_NCCL_CHECK(ncclRecv(recv.data() + p * per_peer, static_cast<std::size_t>(per_peer), ncclFloat32, p,
                               nc->native(), nc->stream()));
    }
    KMOE_NCCL_CHECK(ncclGroupEnd());
    nc->synchronize();
    return;
  }
#endif
  auto& mc = dynamic_cast<comm::MpiCommunicator&>(group);
  KMOE_CHECK_USAGE(per_peer < INT_MAX, kProgram, ": MPI_Alltoall count ", per_peer, " exceeds int");
  KMOE_MPI_CHECK(MPI_Alltoall(send.data(), static_cast<int>(per_peer), MPI_FLOAT, recv.data(),
                              static_cast<int>(per_peer), MPI_FLOAT, mc.native()));
}

void print_comm_row(const char* op, double bytes, i64 count, double seconds, double bus_factor, i64 wrong) {
  const double algbw = bytes / seconds / 1e9;
  std::printf("   %-14s %14.0f %12lld %6s %11.1f %9.2f %9.2f %8lld\n", op, bytes, static_cast<long long>(count), "float",
              seconds * 1e6, algbw, algbw * bus_factor, static_cast<long long>(wrong));
}

// ---- one shape ------------------------------------------------------------------------------------------------

template <class Exec>
Summary run_shape(const Options& o, const Shape& s, comm::Communicator& data, comm::MpiCommunicator& mpi) {
  using Weights = moe::MoeWeights<float, Exec>;
  using Matrix = typename Weights::views::matrix;
  using Tensor3 = typename Weights::views::tensor3;
  using Mem = typename Exec::memory_space;

  comm::ExpertParallel layout(data, s.experts, o.ep);
  const int world = data.size(), rank = data.rank(), ep = layout.placement().ep();
  const i64 T = s.tokens, G = T * world, H = s.hidden, F = s.ffn, E = s.experts, k = s.top_k;
  const i64 first = T * rank;
  KMOE_CHECK_USAGE(G < (i64(1) << 21), kProgram, ": ", G, " global tokens exceed the check payload's 2^21");
  const bool root = rank == 0;
  Summary sum;
  sum.shape = s;
  sum.world = world;
  sum.ep = ep;
  if (root) {
    std::printf("\n## shape %s: H=%lld F=%lld E=%lld k=%lld, %lld tokens per rank, global batch %lld tokens; "
                "%d ranks = %d replicas x ep %d; float32\n",
                s.name.c_str(), static_cast<long long>(H), static_cast<long long>(F), static_cast<long long>(E),
                static_cast<long long>(k), static_cast<long long>(T), static_cast<long long>(G), world,
                layout.placement().replicas(), ep);
    std::fflush(stdout);
  }

  // Weights and the global batch, identical on every rank (seeded hash on the device).
  Weights full;
  full.router = Matrix("bench::router", E, H);
  full.w1 = Tensor3("bench::w1", E, F, H);
  full.w3 = Tensor3("bench::w3", E, F, H);
  full.w2 = Tensor3("bench::w2", E, H, F);
  full.shared_w1 = Matrix("bench::shared_w1", 0, H);
  full.shared_w3 = Matrix("bench::shared_w3", 0, H);
  full.shared_w2 = Matrix("bench::shared_w2", H, 0);
  const std::uint64_t seed = mix64(o.seed);
  fill_quantized<Exec>(full.router, seed + 1, 64.0f);
  fill_uniform<Exec>(full.w1, seed + 2, std::sqrt(3.0f / static_cast<float>(H)));
  fill_uniform<Exec>(full.w3, seed + 3, std::sqrt(3.0f / static_cast<float>(H)));
  fill_uniform<Exec>(full.w2, seed + 4, std::sqrt(3.0f / static_cast<float>(F)));
  Matrix xg("bench::x_global", G, H), dyg("bench::dy_global", G, H);
  fill_quantized<Exec>(xg, seed + 5, 8.0f);
  fill_uniform<Exec>(dyg, seed + 6, 1.0f);
  Matrix x("bench::x", T, H), dy("bench::dy", T, H);
  const auto mine = Kokkos::make_pair(first, first + T);
  Kokkos::deep_copy(x, Kokkos::subview(xg, mine, Kokkos::ALL));
  Kokkos::deep_copy(dy, Kokkos::subview(dyg, mine, Kokkos::ALL));

  moe::MoeOptions single_opt;
  single_opt.top_k = k;
  single_opt.impl = o.single_impl;
  single_opt.block = 1;  // padded path without padding: the same grouped GEMMs as the expert-parallel path
  moe::MoeLayer<float, Exec> single(full, single_opt);
  moe::MoeOptions dist_opt;
  dist_opt.top_k = k;
  comm::DistributedMoe<float, Exec> dist(layout, comm::local_slice(full, layout), dist_opt);

  // 1. correctness
  const auto experts = layout.local_experts();
  Kokkos::View<i64**, Kokkos::LayoutRight, Kokkos::HostSpace> topk_ref;
  double err[4] = {0, 0, 0, 0};
  const char* err_names[4] = {"y", "dx", "d router", "d w1/w3/w2"};
  {
    const Matrix y_ref = single.forward(xg);
    const auto b_ref = single.backward(dyg);
    Kokkos::fence();
    topk_ref = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), single.routing().topk_idx);
    const Matrix y = dist.forward(x);
    const auto b = dist.backward(dy);
    auto grads = dist.gradient_set(b);
    grads.reduce();
    Kokkos::fence();
    std::vector<double> s2(8, 0.0);  // (num, den) per tensor group
    add_error<Exec>(y, y_ref, first * H, s2[0], s2[1]);
    add_error<Exec>(b.dx, b_ref.dx, first * H, s2[2], s2[3]);
    if (rank == 0) add_error<Exec>(b.grads.router, b_ref.grads.router, 0, s2[4], s2[5]);  // whole on every rank
    if (layout.replica() == 0) {  // each expert slice once
      add_error<Exec>(b.grads.w1, b_ref.grads.w1, experts.begin * F * H, s2[6], s2[7]);
      add_error<Exec>(b.grads.w3, b_ref.grads.w3, experts.begin * F * H, s2[6], s2[7]);
      add_error<Exec>(b.grads.w2, b_ref.grads.w2, experts.begin * H * F, s2[6], s2[7]);
    }
    mpi.allreduce_sum_host(s2.data(), static_cast<i64>(s2.size()));
    for (int i = 0; i < 4; ++i) err[i] = s2[2 * i + 1] > 0 ? std::sqrt(s2[2 * i] / s2[2 * i + 1]) : std::sqrt(s2[2 * i]);
    // Routing must agree token by token (x and the router make the logits exact).
    const auto topk = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dist.routing().topk_idx);
    i64 diff = 0;
    for (i64 t = 0; t < T; ++t)
      for (i64 j = 0; j < k; ++j) diff += topk(t, j) != topk_ref(first + t, j);
    sum.routing_diff = sum_over_ranks(diff, mpi);
    std::vector<double> mem{device_gib_in_use()};
    max_over_ranks(mem, mpi);
    if (root) {
      std::printf("# correctness: DistributedMoe (ep %d) vs single-process MoeLayer (%s) on the global batch, relative "
                  "L2 error, tolerance %.1e\n",
                  ep, o.single_impl == moe::ExpertImpl::Padded ? "padded, block 1" : "scatter", o.tol);
      for (int i = 0; i < 4; ++i)
        std::printf("#   %-12s %10.3e  %s\n", err_names[i], err[i], err[i] <= o.tol ? "ok" : "OVER");
      std::printf("#   routing: %lld (token, slot) choices differ from the single-process run\n",
                  static_cast<long long>(sum.routing_diff));
      if (mem[0] > 0) std::printf("#   device memory in use after the check: %.1f GiB (largest rank)\n", mem[0]);
      std::fflush(stdout);
    }
  }
  sum.max_err = 0;
  bool err_ok = true;
  for (double e : err) {
    sum.max_err = std::max(sum.max_err, e);
    err_ok = err_ok && e <= o.tol;  // NaN fails
  }

  // 2. time per layer
  const auto ep_t = time_phases(o, 3, 2, data, mpi, [&] {
    const auto t0 = Clock::now();
    const Matrix y = dist.forward(x);
    Kokkos::fence();
    const double f = seconds_since(t0);
    const auto t1 = Clock::now();
    const auto b = dist.backward(dy);
    Kokkos::fence();
    const double bw = seconds_since(t1);
    const auto t2 = Clock::now();
    auto grads = dist.gradient_set(b);
    grads.reduce();
    Kokkos::fence();
    return std::vector<double>{f, bw, seconds_since(t2)};
  });
  auto single_step = [&](const Matrix& xs, const Matrix& dys) {
    return [&, xs, dys] {
      const auto t0 = Clock::now();
      const Matrix y = single.forward(xs);
      Kokkos::fence();
      const double f = seconds_since(t0);
      const auto t1 = Clock::now();
      const auto b = single.backward(dys);
      Kokkos::fence();
      return std::vector<double>{f, seconds_since(t1)};
    };
  };
  const auto sg_t = time_phases(o, 2, 2, data, mpi, single_step(xg, dyg));
  const auto sr_t = time_phases(o, 2, 2, data, mpi, single_step(x, dy));
  sum.ep_ms = ep_t[3] * 1e3;  // median of forward + backward (the gradient reduction apart)
  sum.reduce_ms = ep_t[2] * 1e3;
  sum.single_global_ms = sg_t[2] * 1e3;
  sum.single_rank_ms = sr_t[2] * 1e3;
  if (root) {
    // Expert GEMM FLOPs of one forward+backward of the whole batch: 3 GEMMs of 2*rows*H*F forward, twice that backward.
    const double flops_global = 18.0 * static_cast<double>(G * k) * static_cast<double>(H) * static_cast<double>(F);
    const double flops_rank = flops_global / static_cast<double>(world);
    const char* what = std::is_same<Mem, Kokkos::HostSpace>::value ? "rank" : "GPU";
    std::printf("# time per layer (ms): median of %d after %d warm-up, slowest rank per iteration; TFLOP/s = expert "
                "GEMMs (18 rows H F per fwd+bwd) over all %ss\n",
                o.iters, o.warmup, what);
    std::printf("#   %-42s %10s %9s %9s %9s %9s %8s %9s\n", "run", (std::string("tokens/") + what).c_str(), "fwd", "bwd", "fwd+bwd", "grad red",
                "TFLOP/s", "vs ep");
    std::printf("#   %-42s %10lld %9.2f %9.2f %9.2f %9.2f %8.1f %9s\n",
                (std::string("DistributedMoe, ep ") + std::to_string(ep) + " on " + std::to_string(world) + " " +
                 what + "s")
                    .c_str(),
                static_cast<long long>(T), ep_t[0] * 1e3, ep_t[1] * 1e3, sum.ep_ms, ep_t[2] * 1e3,
                flops_global / (sum.ep_ms * 1e-3) / 1e12, "1.00x");
    std::printf("#   %-42s %10lld %9.2f %9.2f %9.2f %9s %8.1f %8.2fx\n",
                (std::string("MoeLayer, 1 ") + what + ", global batch (same work)").c_str(), static_cast<long long>(G),
                sg_t[0] * 1e3, sg_t[1] * 1e3, sum.single_global_ms, "-", flops_global / sg_t[2] / 1e12,
                sum.single_global_ms / sum.ep_ms);
    std::printf("#   %-42s %10lld %9.2f %9.2f %9.2f %9s %8.1f %8.2fx\n",
                (std::string("MoeLayer, 1 ") + what + ", per-rank batch").c_str(),
                static_cast<long long>(T), sr_t[0] * 1e3, sr_t[1] * 1e3, sum.single_rank_ms, "-",
                flops_rank / sr_t[2] / 1e12, sum.single_rank_ms / sum.ep_ms);
    std::printf("#   (vs ep = that run's time / the ep run's time: > 1 means expert parallelism is faster; the 1-%s "
                "runs ran on every rank at once, each on its own %s; grad red = GradientSet::reduce, not in fwd+bwd)\n",
                what, what);
    std::fflush(stdout);
  }

  // 3. dispatch / combine on the layer's routing, next to a plain equal-split all-to-all of the same bytes.
  comm::Communicator& group = layout.ep_group();
  const auto topk = dist.routing().topk_idx;
  Matrix xc("bench::x_check", T, H);
  fill_encoded<Exec>(xc, first);
  std::optional<comm::DispatchHandle> handle;
  Matrix rows, back;
  double dispatch_s = 0, combine_s = 0;
  for (int it = -o.warmup; it < o.iters; ++it) {
    group.barrier();
    const auto t0 = Clock::now();
    handle.reset();
    handle.emplace(group, layout.placement(), topk);
    rows = comm::dispatch_forward(*handle, xc);
    const auto t1 = Clock::now();
    back = comm::combine_forward(*handle, rows);
    const auto t2 = Clock::now();
    if (it >= 0) {
      dispatch_s += std::chrono::duration<double>(t1 - t0).count();
      combine_s += std::chrono::duration<double>(t2 - t1).count();
    }
  }
  i64 wrong_dispatch = count_wrong_columns<Exec>(rows);
  {
    // Every received row is a token of this ep group that chose the row's expert, each expert's rows come in token
    // order (source rank, then token), and each expert receives as many rows as the group's tokens chose it.
    const auto col0 = first_column<Exec>(rows);
    const auto& off = handle->expert_offsets();
    const i64 group_first = static_cast<i64>(layout.placement().replica_of(layout.world().rank())) * ep * T;
    const i64 group_end = group_first + ep * T;
    for (i64 j = 0; j < experts.count; ++j) {
      const i64 e = experts.begin + j;
      i64 expected = 0;
      for (i64 g = group_first; g < group_end; ++g)
        for (i64 q = 0; q < k; ++q) expected += topk_ref(g, q) == e;
      wrong_dispatch += std::llabs(expected - (off[j + 1] - off[j]));
      i64 previous = -1;
      for (i64 r = off[j]; r < off[j + 1]; ++r) {
        const float v = col0[static_cast<std::size_t>(r)];
        const i64 g = static_cast<i64>(v);
        bool ok = static_cast<float>(g) == v && g >= group_first && g < group_end && g > previous;
        if (ok) {
          bool chose = false;
          for (i64 q = 0; q < k; ++q) chose = chose || topk_ref(g, q) == e;
          ok = chose;
        }
        wrong_dispatch += !ok;
        previous = ok ? g : previous;
      }
    }
  }
  const i64 wrong_combine = count_wrong_round_trip<Exec>(back, first, k);
  rows = Matrix();
  back = Matrix();
  handle.reset();

  const i64 per_peer = T * k * H / ep;
  using Buffer = Kokkos::View<float*, Mem>;
  double plain_s = 0;
  i64 wrong_plain = 0;
  {
    Buffer send("bench::a2a_send", per_peer * ep), recv("bench::a2a_recv", per_peer * ep);
    fill_plain<Exec>(send, group.rank(), ep, per_peer);
    for (int it = -o.warmup; it < o.iters; ++it) {
      group.barrier();
      const auto t0 = Clock::now();
      plain_alltoall(group, send, recv, per_peer);
      if (it >= 0) plain_s += seconds_since(t0);
    }
    wrong_plain = count_wrong_plain<Exec>(recv, group.rank(), ep, per_peer);
  }
  std::vector<double> times{dispatch_s / o.iters, combine_s / o.iters, plain_s / o.iters};
  max_over_ranks(times, mpi);
  wrong_dispatch = sum_over_ranks(wrong_dispatch, mpi);
  const i64 wrong_c = sum_over_ranks(wrong_combine, mpi);
  wrong_plain = sum_over_ranks(wrong_plain, mpi);
  const double bytes = static_cast<double>(T * k * H) * sizeof(float);
  const double plain_bytes = static_cast<double>(per_peer * ep) * sizeof(float);
  const double bus = ep > 1 ? static_cast<double>(ep - 1) / ep : 1.0;
  sum.dispatch_busbw = bytes / times[0] / 1e9 * bus;
  sum.combine_busbw = bytes / times[1] / 1e9 * bus;
  sum.plain_busbw = plain_bytes / times[2] / 1e9 * bus;
  sum.wrong = wrong_dispatch + wrong_c + wrong_plain;
  if (root) {
    std::printf("# all-to-all over the ep group (%s, %d ranks): size = bytes one rank sends per call (tokens x k x H x 4, "
                "rows that stay included); time = mean of %d calls on the slowest rank; algbw = size / time; busbw = "
                "algbw x (ep-1)/ep\n",
                group.backend(), ep, o.iters);
    std::printf("# dispatch = DispatchHandle (count exchange + host plan) + dispatch_forward; combine = combine_forward; "
                "plain = equal splits, %s\n",
                std::string(group.backend()) == "nccl" ? "grouped ncclSend/ncclRecv" : "MPI_Alltoall");
    std::printf("#  %-14s %14s %12s %6s %11s %9s %9s %8s\n", "op", "size (B)", "count", "type", "time (us)",
                "algbw", "busbw", "#wrong");
    std::printf("#  %-14s %14s %12s %6s %11s %9s %9s %8s\n", "", "", "(elements)", "", "", "(GB/s)", "(GB/s)", "");
    print_comm_row("dispatch", bytes, T * k * H, times[0], bus, wrong_dispatch);
    print_comm_row("combine", bytes, T * k * H, times[1], bus, wrong_c);
    print_comm_row("plain-alltoall", plain_bytes, per_peer * ep, times[2], bus, wrong_plain);
    std::fflush(stdout);
  }
  sum.pass = err_ok && sum.routing_diff == 0 && sum.wrong == 0;
  if (root) {
    std::printf("# shape %s: %s (max relative L2 error %.3e, tolerance %.1e; routing differences %lld; #wrong %lld)\n",
                s.name.c_str(), sum.pass ? "PASS" : "FAIL", sum.max_err, o.tol,
                static_cast<long long>(sum.routing_diff), static_cast<long long>(sum.wrong));
    std::fflush(stdout);
  }
  return sum;
}

template <class Exec>
bool run_all(const Options& o, comm::Communicator& data, comm::MpiCommunicator& mpi) {
  std::vector<Summary> all;
  for (const auto& s : o.shapes) all.push_back(run_shape<Exec>(o, s, data, mpi));
  bool pass = true;
  for (const auto& s : all) pass = pass && s.pass;
  if (data.rank() == 0) {
    const char* what = std::is_same<typename Exec::memory_space, Kokkos::HostSpace>::value ? "rank" : "GPU";
    std::printf("\n## summary (%s backend, float32; ms = median forward+backward per layer; 1-%s runs: the "
                "single-process MoeLayer)\n",
                data.backend(), what);
    std::printf("| shape | tokens/rank | ranks | ep | ep fwd+bwd ms | 1 %s, global batch ms | speed-up | 1 %s, per-rank batch "
                "ms | grad reduce ms | dispatch busbw GB/s | combine busbw GB/s | plain a2a busbw GB/s | max rel err | "
                "check |\n",
                what, what);
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const auto& s : all)
      std::printf("| %s H=%lld F=%lld E=%lld k=%lld | %lld | %d | %d | %.2f | %.2f | %.2fx | %.2f | %.2f | %.1f | %.1f | "
                  "%.1f | %.2e | %s |\n",
                  s.shape.name.c_str(), static_cast<long long>(s.shape.hidden), static_cast<long long>(s.shape.ffn),
                  static_cast<long long>(s.shape.experts), static_cast<long long>(s.shape.top_k),
                  static_cast<long long>(s.shape.tokens), s.world, s.ep, s.ep_ms, s.single_global_ms,
                  s.single_global_ms / s.ep_ms, s.single_rank_ms, s.reduce_ms, s.dispatch_busbw, s.combine_busbw,
                  s.plain_busbw, s.max_err, s.pass ? "PASS" : "FAIL");
    std::printf("# %s: %s\n", kProgram, pass ? "PASS" : "FAIL");
    std::fflush(stdout);
  }
  return pass;
}

/// This rank's index among the ranks of its node.
int node_local_rank() {
  MPI_Comm node = MPI_COMM_NULL;
  int world_rank = 0, local = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  return local;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 0;
  {
    auto mpi_world = comm::MpiCommunicator::world();
    setenv("OMP_PROC_BIND", "spread", 0);
    setenv("OMP_PLACES", "threads", 0);
    // One process per GPU: the node-local rank picks the device, for CUDA and for Kokkos (the NCCL communicator's
    // world() makes the same choice). Kokkos 3.4 and 4.x both read --kokkos-device-id.
    int device = -1;
    std::vector<std::string> kokkos_args(argv, argv + argc);
#if defined(KOKKOS_ENABLE_CUDA)
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      std::fprintf(stderr, "%s: this build's Kokkos uses CUDA, but no CUDA device is visible\n", kProgram);
      MPI_Finalize();
      return 2;
    }
    device = node_local_rank() % devices;
    if (cudaSetDevice(device) != cudaSuccess) {
      std::fprintf(stderr, "%s: cudaSetDevice(%d) failed\n", kProgram, device);
      MPI_Abort(MPI_COMM_WORLD, 3);
    }
    const bool has_device_arg = std::any_of(kokkos_args.begin(), kokkos_args.end(), [](const std::string& a) {
      return a.rfind("--kokkos-device-id", 0) == 0 || a.rfind("--kokkos-num-devices", 0) == 0;
    });
    if (!has_device_arg) kokkos_args.push_back("--kokkos-device-id=" + std::to_string(device));
#else
    (void)node_local_rank;
#endif
    std::vector<char*> kargv;
    for (auto& a : kokkos_args) kargv.push_back(a.data());
    kargv.push_back(nullptr);
    int kargc = static_cast<int>(kokkos_args.size());
    Kokkos::ScopeGuard kokkos(kargc, kargv.data());
    try {
      const bool pass = comm::run_or_abort(*mpi_world, kProgram, [&] {
        const Options o = parse(argc, argv);
        std::unique_ptr<comm::Communicator> data;
        if (o.backend == "nccl") {
#if KMOE_ENABLE_NCCL
          constexpr bool device_views =
              !Kokkos::SpaceAccessibility<Kokkos::HostSpace, Kokkos::DefaultExecutionSpace::memory_space>::accessible;
          KMOE_CHECK_USAGE(device_views, kProgram, ": --backend nccl needs a CUDA build of Kokkos (device views)");
          data = comm::NcclCommunicator::world();
#else
          throw UsageError(std::string(kProgram) + ": --backend nccl: this kmoe was built without NCCL");
#endif
        } else {
          data = comm::MpiCommunicator::world();
        }
        // Where each rank runs, in rank order.
        char mine[192];
        std::snprintf(mine, sizeof mine, "%s", device_description(device).c_str());
        std::vector<char> all(static_cast<std::size_t>(mpi_world->size()) * sizeof mine);
        KMOE_MPI_CHECK(MPI_Gather(mine, sizeof mine, MPI_CHAR, all.data(), sizeof mine, MPI_CHAR, 0, mpi_world->native()));
        if (mpi_world->rank() == 0) {
          std::printf("# %s %s: backend %s, %d ranks, Kokkos %s (data in %s memory)\n", version_string().c_str(),
                      kProgram, data->backend(), mpi_world->size(), Kokkos::DefaultExecutionSpace::name(),
                      data->uses_device_memory() ? "device" : "host");
          for (int r = 0; r < mpi_world->size(); ++r)
            std::printf("#   rank %d: %s\n", r, all.data() + static_cast<std::size_t>(r) * sizeof mine);
          std::printf("# float32 math: the portable DistributedMoe / MoeLayer path (Kokkos kernels, KokkosBlas GEMM%s), "
                      "not the bf16 CUDA block; seed %llu\n",
                      data->uses_device_memory() ? " -> cuBLAS SGEMM" : " -> host BLAS",
                      static_cast<unsigned long long>(o.seed));
          std::fflush(stdout);
        }
        // NCCL moves device views (checked above), MPI host views (DistributedMoe refuses the other pairings).
        if (data->uses_device_memory()) return run_all<Kokkos::DefaultExecutionSpace>(o, *data, *mpi_world);
        return run_all<Kokkos::DefaultHostExecutionSpace>(o, *data, *mpi_world);
      });
      code = pass ? 0 : 1;
    } catch (const std::exception& e) {  // one rank: run_or_abort rethrows
      std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
      code = comm::exit_code_for(e);
    }
  }
  MPI_Finalize();
  return code;
}
