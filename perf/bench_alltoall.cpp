// kmoe dispatch/combine all-to-all: an nccl-tests style table (size, time, algbw, busbw, #wrong) over a sweep of
// tokens per rank. Run under mpirun, e.g.
//   mpirun -np 4 --oversubscribe build/bin/bench_alltoall [--ep 4] [--hidden 512] [--experts 8] [--top-k 2]
//          [--dtype f32|f64|bf16] [--min-tokens 16] [--max-tokens 4096] [--iters 20] [--warmup 3] [--backend mpi|nccl]
// Columns (docs/comm.md "Measuring"): size = bytes one rank sends per call (tokens x k x hidden x element size, the
// rows that stay on the rank included, as nccl-tests counts alltoall); time = the slowest rank's mean per call;
// algbw = size / time; busbw = algbw x (ep - 1) / ep; #wrong = elements that differ from the expected value, summed
// over ranks (dispatch: every received row is its token's row and its expert is one the token chose; combine: the
// round trip returns every row unchanged).
#include <kmoe/comm/alltoall.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/config.hpp>
#include <kmoe/core/version.hpp>
#if KMOE_ENABLE_NCCL
#include <kmoe/comm/nccl_communicator.hpp>
#endif

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>

namespace {

using namespace kmoe;
using Clock = std::chrono::steady_clock;

struct Options {
  int ep = 0;
  std::int64_t hidden = 512, experts = 8, top_k = 2, min_tokens = 16, max_tokens = 4096;
  int iters = 20, warmup = 3;
  std::string dtype = "f32", backend = "mpi";
};

Options parse(int argc, char** argv) {
  Options o;
  std::map<std::string, std::string> kv;
  for (int i = 1; i + 1 < argc; i += 2) {
    KMOE_CHECK_USAGE(std::strncmp(argv[i], "--", 2) == 0, "bench_alltoall: unexpected argument '", argv[i], "'");
    kv[argv[i] + 2] = argv[i + 1];
  }
  KMOE_CHECK_USAGE(argc % 2 == 1, "bench_alltoall: every option takes a value");
  auto num = [&](const char* k, std::int64_t& v) {
    if (kv.count(k)) v = std::stoll(kv[k]);
    kv.erase(k);
  };
  std::int64_t ep = 0, iters = o.iters, warmup = o.warmup;
  num("ep", ep);
  num("hidden", o.hidden);
  num("experts", o.experts);
  num("top-k", o.top_k);
  num("min-tokens", o.min_tokens);
  num("max-tokens", o.max_tokens);
  num("iters", iters);
  num("warmup", warmup);
  o.ep = static_cast<int>(ep);
  o.iters = static_cast<int>(iters);
  o.warmup = static_cast<int>(warmup);
  if (kv.count("dtype")) o.dtype = kv["dtype"], kv.erase("dtype");
  if (kv.count("backend")) o.backend = kv["backend"], kv.erase("backend");
  KMOE_CHECK_USAGE(kv.empty(), "bench_alltoall: unknown option --", kv.empty() ? "" : kv.begin()->first);
  KMOE_CHECK_USAGE(o.top_k >= 1 && o.top_k <= o.experts, "bench_alltoall: --top-k ", o.top_k, " outside [1, ", o.experts, "]");
  KMOE_CHECK_USAGE(o.iters >= 1 && o.min_tokens >= 1 && o.max_tokens >= o.min_tokens, "bench_alltoall: bad sweep");
  return o;
}

// The routing of global token g: k distinct experts from a hash (about uniform load).
std::int64_t expert_of(std::int64_t g, std::int64_t s, std::int64_t experts) {
  std::uint64_t h = static_cast<std::uint64_t>(g) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  return static_cast<std::int64_t>((h % static_cast<std::uint64_t>(experts) + static_cast<std::uint64_t>(s)) %
                                   static_cast<std::uint64_t>(experts));
}

// Row values encode (global token, column) exactly in every dtype tested: small integers.
double value_of(std::int64_t g, std::int64_t c) { return static_cast<double>((g % 97) * 2 + (c % 2)); }

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, bf16>) return bf16::from_float(static_cast<float>(v));
  else return static_cast<T>(v);
}
template <class T>
double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}

struct Row {
  double bytes, dispatch_us, combine_us;
  std::int64_t dispatch_wrong, combine_wrong;
};

/// Mem: where the rows live (host memory for MPI, device memory for NCCL).
template <class T, class Mem>
Row measure(const Options& o, const comm::ExpertParallel& layout, comm::MpiCommunicator& mpi, std::int64_t tokens) {
  comm::Communicator& world = layout.world();
  const std::int64_t first = tokens * world.rank(), H = o.hidden, k = o.top_k;
  Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Mem> topk("topk", tokens, k);
  Kokkos::View<T**, Kokkos::LayoutRight, Mem> x("x", tokens, H);
  auto ht = Kokkos::create_mirror_view(topk);
  auto hx = Kokkos::create_mirror_view(x);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t s = 0; s < k; ++s) ht(t, s) = expert_of(first + t, s, o.experts);
    for (std::int64_t c = 0; c < H; ++c) hx(t, c) = from_double<T>(value_of(first + t, c));
  }
  Kokkos::deep_copy(topk, ht);
  Kokkos::deep_copy(x, hx);

  double dispatch_s = 0, combine_s = 0;
  Kokkos::View<T**, Kokkos::LayoutRight, Mem> rows, back;
  std::optional<comm::DispatchHandle> handle;
  for (int it = -o.warmup; it < o.iters; ++it) {
    world.barrier();
    const auto t0 = Clock::now();
    handle.emplace(layout.ep_group(), layout.placement(), topk);
    rows = comm::dispatch_forward(*handle, x);
    const auto t1 = Clock::now();
    back = comm::combine_forward(*handle, rows);
    const auto t2 = Clock::now();
    if (it >= 0) {
      dispatch_s += std::chrono::duration<double>(t1 - t0).count();
      combine_s += std::chrono::duration<double>(t2 - t1).count();
    }
  }
  // Check the last iteration's data.
  std::int64_t wrong[2] = {0, 0};
  const auto hr = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), rows);
  const auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), back);
  const auto& off = handle->expert_offsets();
  const auto local = handle->local_experts();
  for (std::int64_t j = 0; j < local.count; ++j)
    for (auto r = off[j]; r < off[j + 1]; ++r) {
      // The row's token is unknown here, but its values are (g % 97) * 2 + (c % 2): recover g % 97 from column 0
      // and check the rest of the row against it.
      const double base = to_double(hr(r, 0));
      for (std::int64_t c = 0; c < H; ++c)
        if (to_double(hr(r, c)) != base + static_cast<double>(c % 2)) ++wrong[0];
    }
  for (std::int64_t a = 0; a < tokens * k; ++a)
    for (std::int64_t c = 0; c < H; ++c)
      if (to_double(hb(a, c)) != value_of(first + a / k, c)) ++wrong[1];
  // Row counts must add up: every assignment arrives somewhere exactly once.
  std::int64_t sent = tokens * k, received = handle->num_received();
  double times[2] = {dispatch_s / o.iters, combine_s / o.iters};
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, times, 2, MPI_DOUBLE, MPI_MAX, mpi.native()));
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, wrong, 2, MPI_INT64_T, MPI_SUM, mpi.native()));
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &sent, 1, MPI_INT64_T, MPI_SUM, mpi.native()));
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &received, 1, MPI_INT64_T, MPI_SUM, mpi.native()));
  if (sent != received) wrong[0] += std::llabs(sent - received);
  return Row{static_cast<double>(tokens * k * H) * sizeof(T), times[0] * 1e6, times[1] * 1e6, wrong[0], wrong[1]};
}

template <class T, class Mem>
void sweep(const Options& o, const comm::ExpertParallel& layout, comm::MpiCommunicator& mpi) {
  const int ep = layout.placement().ep();
  const double bus = ep > 1 ? static_cast<double>(ep - 1) / ep : 1.0;
  if (layout.world().rank() == 0) {
    std::printf("#\n#  %12s %12s %6s %11s %8s %8s %7s %11s %8s %8s %7s\n", "size", "tokens/rank", "type",
                "dispatch", "algbw", "busbw", "#wrong", "combine", "algbw", "busbw", "#wrong");
    std::printf("#  %12s %12s %6s %11s %8s %8s %7s %11s %8s %8s %7s\n", "(B)", "", "", "time (us)", "(GB/s)",
                "(GB/s)", "", "time (us)", "(GB/s)", "(GB/s)", "");
  }
  std::int64_t wrong_total = 0;
  for (std::int64_t tokens = o.min_tokens; tokens <= o.max_tokens; tokens *= 2) {
    const Row r = measure<T, Mem>(o, layout, mpi, tokens);
    wrong_total += r.dispatch_wrong + r.combine_wrong;
    if (layout.world().rank() == 0) {
      const double da = r.bytes / (r.dispatch_us * 1e3), ca = r.bytes / (r.combine_us * 1e3);
      std::printf("   %12.0f %12lld %6s %11.1f %8.2f %8.2f %7lld %11.1f %8.2f %8.2f %7lld\n", r.bytes,
                  static_cast<long long>(tokens), o.dtype.c_str(), r.dispatch_us, da, da * bus,
                  static_cast<long long>(r.dispatch_wrong), r.combine_us, ca, ca * bus,
                  static_cast<long long>(r.combine_wrong));
    }
  }
  if (layout.world().rank() == 0) std::printf("# Out of bounds values : %lld %s\n#\n", static_cast<long long>(wrong_total), wrong_total ? "FAILED" : "OK");
  if (wrong_total) throw InternalError("bench_alltoall: wrong values");
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 0;
  {
    auto mpi_world = comm::MpiCommunicator::world();
    setenv("OMP_PROC_BIND", "spread", 0);
    setenv("OMP_PLACES", "threads", 0);
    Kokkos::ScopeGuard kokkos(argc, argv);
    try {
      comm::run_or_abort(*mpi_world, "bench_alltoall", [&] {
        const Options o = parse(argc, argv);
        // The data moves over `data` (MPI or NCCL); timings and error counts are reduced over MPI.
        std::unique_ptr<comm::Communicator> data;
        if (o.backend == "nccl") {
#if KMOE_ENABLE_NCCL
          // named first: the template argument list's comma would split the macro's arguments
          constexpr bool host_views =
              Kokkos::SpaceAccessibility<Kokkos::HostSpace, Kokkos::DefaultExecutionSpace::memory_space>::accessible;
          KMOE_CHECK_USAGE(!host_views, "bench_alltoall: --backend nccl needs a CUDA build of Kokkos (device views)");
          data = comm::NcclCommunicator::world();
#else
          throw UsageError("bench_alltoall: --backend nccl: this kmoe was built without NCCL (KMOE_ENABLE_NCCL=OFF)");
#endif
        } else {
          KMOE_CHECK_USAGE(o.backend == "mpi", "bench_alltoall: --backend ", o.backend, " (expected mpi or nccl)");
          data = comm::MpiCommunicator::world();
        }
        comm::ExpertParallel layout(*data, o.experts, o.ep);
        if (mpi_world->rank() == 0) {
          std::printf("# %s bench_alltoall: backend %s, %d ranks = %d replicas x ep %d, %lld experts, top-%lld, "
                      "hidden %lld, %d iters (+%d warm-up), Kokkos %s\n",
                      version_string().c_str(), data->backend(), mpi_world->size(), layout.placement().replicas(),
                      layout.placement().ep(), static_cast<long long>(o.experts), static_cast<long long>(o.top_k),
                      static_cast<long long>(o.hidden), o.iters, o.warmup,
                      Kokkos::DefaultExecutionSpace::name());
          std::printf("# dispatch = DispatchHandle (count exchange) + dispatch_forward; combine = combine_forward\n");
        }
        KMOE_CHECK_USAGE(o.dtype == "f32" || o.dtype == "f64" || o.dtype == "bf16", "bench_alltoall: --dtype ",
                         o.dtype, " (expected f32, f64 or bf16)");
        auto run = [&](auto mem) {
          using Mem = decltype(mem);
          if (o.dtype == "f32") sweep<float, Mem>(o, layout, *mpi_world);
          else if (o.dtype == "f64") sweep<double, Mem>(o, layout, *mpi_world);
          else sweep<bf16, Mem>(o, layout, *mpi_world);
        };
        if (data->uses_device_memory()) run(Kokkos::DefaultExecutionSpace::memory_space());
        else run(Kokkos::HostSpace());
      });
    } catch (const std::exception& e) {  // one rank: run_or_abort rethrows
      std::fprintf(stderr, "bench_alltoall: %s\n", e.what());
      code = comm::exit_code_for(e);
    }
  }
  MPI_Finalize();
  return code;
}
