// The bf16 CUDA block under expert parallelism (comm::DistributedMoe<bf16, Kokkos::Cuda>), timed beside the plain
// bf16 block and a plain all-to-all of the same bytes. Run under mpirun, one process per GPU (NCCL) or several
// sharing one (MPI over device buffers: checks the path, its times are no scaling measurement):
//   mpirun -np N bench_ep_bf16 [--shapes mixtral,finegrained] [--tokens T] [--comm auto|nccl|mpi] [--engine auto|...]
//          [--impl scatter|padded] [--warmup 3] [--reps 10] [--seed 1]
// Shapes: mixtral H=4096 F=14336 E=8 k=2, finegrained H=2048 F=768 E=64 k=8; T tokens per rank (default 8192).
// Per shape, on every rank (the table shows the slowest rank of each repetition, then the median):
//   ep_ms       DistributedMoe forward + backward (gradients not reduced), ep = N (a group of one rank exchanges
//               nothing: at N = 1 it is the one-GPU block plus the layer's EP bookkeeping)
//   local_ms    MoeLayer<bf16, Kokkos::Cuda> forward + backward on the same T tokens with all experts (one GPU doing
//               its per-rank share); ep_ms / local_ms at N = 1 is the expert-parallel path's overhead
//   exch        the layer's four row exchanges timed alone (fenced before, waited after): bytes this rank sent per
//               step, time, algbw = bytes / time, busbw = algbw (N - 1) / N (nccl-tests' all-to-all convention)
//   plain       the communicator's alltoallv with equal splits of the same byte count: time, busbw
//   counts      the one device-to-host copy of E counts and its wait, alone (median of 100)
// Inputs random on the device (never zeros), weights 1/sqrt(fan_in). Exit 0, or 1 when a run failed / gave non-finite y.
#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/kernels.hpp>
#if KMOE_ENABLE_NCCL
#include <kmoe/comm/nccl_communicator.hpp>
#endif

#include <Kokkos_Core.hpp>
#include <cuda_runtime_api.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using namespace kmoe;
using Layer = moe::MoeLayer<bf16, Kokkos::Cuda>;
using Clock = std::chrono::steady_clock;

struct Shape {
  const char* name;
  int hidden, ffn, experts, k;
};
const Shape kShapes[] = {{"mixtral", 4096, 14336, 8, 2}, {"finegrained", 2048, 768, 64, 8}};

struct Options {
  std::vector<std::string> shapes = {"mixtral", "finegrained"};
  std::int64_t tokens = 8192;
  std::string comm = "auto", engine = "auto", impl = "scatter";
  int warmup = 3, reps = 10;
  std::uint64_t seed = 1;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "bench_ep_bf16: %s\n", why.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t a = 0;
  while (a <= s.size()) {
    const std::size_t b = s.find(',', a);
    out.push_back(s.substr(a, b == std::string::npos ? std::string::npos : b - a));
    if (b == std::string::npos) break;
    a = b + 1;
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--shapes") o.shapes = split(value());
    else if (a == "--tokens") o.tokens = std::atoll(value().c_str());
    else if (a == "--comm") o.comm = value();
    else if (a == "--engine") o.engine = value();
    else if (a == "--impl") o.impl = value();
    else if (a == "--warmup") o.warmup = std::atoi(value().c_str());
    else if (a == "--reps") o.reps = std::atoi(value().c_str());
    else if (a == "--seed") o.seed = std::strtoull(value().c_str(), nullptr, 10);
    else usage("unknown argument '" + a + "'");
  }
  if (o.tokens < 0 || o.reps < 1 || o.warmup < 0) usage("--tokens >= 0, --reps >= 1, --warmup >= 0");
  return o;
}

core::GemmAlgo engine_of(const std::string& e) {
  if (e == "auto") return core::GemmAlgo::Auto;
  if (e == "blas") return core::GemmAlgo::Blas;
  if (e == "kokkos") return core::GemmAlgo::Kokkos;
  if (e == "cutlass") return core::GemmAlgo::Cutlass;
  usage("--engine auto|blas|kokkos|cutlass");
}

/// Random bf16 values of standard deviation ~scale in a new device View (a counter hash of (seed, i): the same
/// values on every rank for the same seed).
template <class V, class... N>
V random(const char* label, float scale, std::uint64_t seed, N... n) {
  V v(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), n...);
  core::cuda::fill_random_bf16(reinterpret_cast<core::cuda::bf16_t*>(v.data()), v.span(), scale, seed, nullptr);
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

/// Medians of per-repetition maxima over the ranks.
double slowest_median(std::vector<double> v, comm::MpiCommunicator& mpi) {
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, v.data(), int(v.size()), MPI_DOUBLE, MPI_MAX, mpi.native()));
  return median(v);
}

std::unique_ptr<comm::Communicator> device_world(const std::string& choice, comm::MpiCommunicator& mpi) {
  int devices = 0;
  KMOE_CUDA_CHECK(cudaGetDeviceCount(&devices));
  MPI_Comm node = MPI_COMM_NULL;
  KMOE_MPI_CHECK(MPI_Comm_split_type(mpi.native(), MPI_COMM_TYPE_SHARED, mpi.rank(), MPI_INFO_NULL, &node));
  const comm::MpiCommunicator node_comm(node, true);
  double crowded = node_comm.size() > devices ? 1 : 0;
  mpi.allreduce_sum_host(&crowded, 1);
#if KMOE_ENABLE_NCCL
  if (choice == "nccl" || (choice == "auto" && crowded == 0)) {
    const Kokkos::Cuda space;
    return std::make_unique<comm::NcclCommunicator>(mpi.split_mpi(0, mpi.rank()), space.cuda_stream(),
                                                    space.cuda_device());
  }
#endif
  if (choice == "nccl") usage("--comm nccl: not built with NCCL");
  return std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD, false, comm::BufferMemory::device);
}

bool run_shape(const Options& o, const Shape& s, comm::Communicator& world, comm::MpiCommunicator& mpi) {
  const int n = world.size(), me = world.rank();
  const std::int64_t T = o.tokens, H = s.hidden, F = s.ffn, E = s.experts;
  moe::MoeOptions opt;
  opt.top_k = s.k;
  opt.gemm = engine_of(o.engine);
  opt.impl = moe::parse_expert_impl(o.impl);
  comm::ExpertParallel layout(world, E, n);
  const auto mine = layout.local_experts();
  // Every rank makes the full weights from the same seeds and keeps its slice (the local layer keeps them all).
  moe::MoeWeights<bf16, Kokkos::Cuda> full;
  const float ws = 1.f / std::sqrt(float(H));
  full.router = random<Layer::matrix>("router", ws, o.seed * 100 + 1, E, H);
  full.w1 = random<Layer::views::tensor3>("w1", ws, o.seed * 100 + 2, E, F, H);
  full.w3 = random<Layer::views::tensor3>("w3", ws, o.seed * 100 + 3, E, F, H);
  full.w2 = random<Layer::views::tensor3>("w2", 1.f / std::sqrt(float(F)), o.seed * 100 + 4, E, H, F);
  const auto x = random<Layer::matrix>("x", 1.f, o.seed * 100 + 10 + me, T, H);
  const auto dy = random<Layer::matrix>("dy", 1.f, o.seed * 100 + 50 + me, T, H);
  Kokkos::fence();
  comm::DistributedMoe<bf16, Kokkos::Cuda> ep(layout, comm::local_slice(full, layout), opt);
  Layer local(full, opt);
  Layer::matrix y("y", T, H);
  moe::MoeBackward<bf16, Kokkos::Cuda> g_ep, g_local;
  g_ep.dx = Layer::grad_matrix("dx", T, H);
  g_ep.grads = moe::uninitialized_like<float>(ep.layer().weights());
  g_local.dx = Layer::grad_matrix("dx", T, H);
  g_local.grads = moe::uninitialized_like<float>(full);

  auto timed = [&](auto&& step) {
    std::vector<double> ms;
    for (int i = 0; i < o.warmup + o.reps; ++i) {
      world.barrier();
      const auto t0 = Clock::now();
      step();
      Kokkos::fence();
      if (i >= o.warmup) ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    return slowest_median(ms, mpi);
  };
  const double ep_ms = timed([&] {
    ep.forward(x, y);
    ep.backward(dy, g_ep);
  });
  bool finite = true;
  {
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
    for (std::size_t i = 0; i < h.span() && finite; ++i) finite = std::isfinite(float(h.data()[i]));
  }
  const double local_ms = timed([&] {
    local.forward(x, y);
    local.backward(dy, g_local);
  });
  // The exchanges alone: one more step with each of them fenced and timed.
  ep.time_exchanges(true);
  std::vector<double> exch_s, exch_bytes;
  for (int i = 0; i < o.reps; ++i) {
    ep.forward(x, y);
    ep.backward(dy, g_ep);
    const auto st = ep.take_exchange_stats();
    exch_s.push_back(st.seconds);
    exch_bytes.push_back(st.bytes);
  }
  ep.time_exchanges(false);
  const double ex_s = slowest_median(exch_s, mpi);
  double ex_bytes = median(exch_bytes);  // the plain all-to-all below moves the largest rank's bytes on every rank
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &ex_bytes, 1, MPI_DOUBLE, MPI_MAX, mpi.native()));
  // A plain all-to-all of the same bytes, equal splits (bf16 rows of H).
  const std::int64_t rows_per_peer = std::max<std::int64_t>(1, std::int64_t(ex_bytes / 4 / n / (2 * H)));
  Layer::matrix send("send", rows_per_peer * n, H), recv("recv", rows_per_peer * n, H);
  std::vector<std::int64_t> cnt(n, rows_per_peer), off(n);
  for (int p = 0; p < n; ++p) off[p] = p * rows_per_peer;
  std::vector<double> plain;
  for (int i = 0; i < o.warmup + o.reps; ++i) {
    Kokkos::fence();
    world.barrier();
    const auto t0 = Clock::now();
    world.alltoallv(send.data(), cnt.data(), off.data(), recv.data(), cnt.data(), off.data(), H, comm::DataType::bf16);
    world.synchronize();
    if (i >= o.warmup) plain.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  const double plain_s = slowest_median(plain, mpi), plain_bytes = double(rows_per_peer) * n * H * 2;
  // The count copy: E int64 device -> pinned host, and the wait.
  Kokkos::View<std::int64_t*, Kokkos::CudaSpace> counts("counts", E);
  Kokkos::View<std::int64_t*, Kokkos::CudaHostPinnedSpace> host("host", E);
  std::vector<double> copy_us;
  const Kokkos::Cuda space;
  for (int i = 0; i < 110; ++i) {
    const auto t0 = Clock::now();
    KMOE_CUDA_CHECK(cudaMemcpyAsync(host.data(), counts.data(), sizeof(std::int64_t) * E, cudaMemcpyDeviceToHost,
                                    space.cuda_stream()));
    space.fence();
    if (i >= 10) copy_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  const double bus = n > 1 ? double(n - 1) / n : 1.0;
  if (me == 0) {
    // One rank exchanges nothing (its block is the one-GPU block): no exchange columns then.
    const double algbw = ex_s > 0 ? ex_bytes / ex_s / 1e9 : 0.0;
    std::printf("%-12s %5lld %3d %3d  %9.3f %9.3f %7.3f  %10.3e %8.3f %8.2f %8.2f  %8.3f %8.2f  %7.1f  %s %s\n", s.name,
                (long long)T, n, int(mine.count), ep_ms, local_ms, ep_ms / local_ms, ex_bytes, ex_s * 1e3, algbw,
                algbw * bus, plain_s * 1e3, plain_bytes / plain_s / 1e9 * bus, median(copy_us),
                ep.layer().gemm_engine(), finite ? "ok" : "NON-FINITE");
    std::fflush(stdout);
  }
  double ok = finite ? 0 : 1;
  mpi.allreduce_sum_host(&ok, 1);
  return ok == 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const Options o = parse(argc, argv);
    auto mpi = comm::MpiCommunicator::world();
    auto world = device_world(o.comm, *mpi);
    if (mpi->rank() == 0) {
      const auto* as_mpi = dynamic_cast<const comm::MpiCommunicator*>(world.get());
      const std::string transport = as_mpi ? std::string(" (") + as_mpi->device_transport() + ")" : "";
      std::printf("# bench_ep_bf16: %d rank(s), comm %s%s, device %s, engine %s, impl %s, warmup %d, reps %d\n",
                  world->size(), world->backend(), transport.c_str(),
                  core::cuda::device_description().c_str(), o.engine.c_str(), o.impl.c_str(), o.warmup, o.reps);
      std::printf("%-12s %5s %3s %3s  %9s %9s %7s  %10s %8s %8s %8s  %8s %8s  %7s  %s\n", "shape", "T", "np", "El",
                  "ep_ms", "local_ms", "ratio", "exch_B", "exch_ms", "algbw", "busbw", "plain_ms", "busbw",
                  "cnt_us", "engine");
    }
    for (const auto& name : o.shapes) {
      const Shape* s = nullptr;
      for (const auto& c : kShapes)
        if (name == c.name) s = &c;
      if (!s) usage("unknown shape '" + name + "' (mixtral, finegrained)");
      try {
        if (!run_shape(o, *s, *world, *mpi)) rc = 1;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_ep_bf16: rank %d: %s: %s\n", mpi->rank(), name.c_str(), e.what());
        rc = 1;
      }
    }
  }
  MPI_Finalize();
  return rc;
}
