// kmoe dispatch/combine all-to-all: an nccl-tests style table (size, time, algbw, busbw, #wrong) over a sweep of
// tokens per rank. Run under mpirun, e.g.
//   mpirun -np 4 --oversubscribe build/bin/bench_alltoall [--ep 4] [--hidden 512] [--experts 8] [--top-k 2]
//          [--dtype f32|f64|bf16] [--min-tokens 16] [--max-tokens 4096] [--iters 20] [--warmup 3]
//          [--backend mpi|mpi-device|mpi-staged|nccl] [--blocks-per-peer B]
// Columns (docs/comm.md "Measuring"): size = bytes one rank sends per call (tokens x k x hidden x element size, the
// rows that stay on the rank included, as nccl-tests counts alltoall); time = the slowest rank's mean per call;
// algbw = size / time; busbw = algbw x (ep - 1) / ep; #wrong = elements that differ from the expected value, summed
// over ranks (dispatch: every received row is its token's row and its expert is one the token chose; combine: the
// round trip returns every row unchanged).
// With --blocks-per-peer B the table compares the communicator's two exchanges on the same bytes instead: a plain
// alltoallv (peer-major in and out) and alltoallv_blocks with B blocks per peer (one per local expert) received
// expert-major, as an expert-parallel layer receives rows for its grouped GEMM.
// Backends: mpi (host buffers), mpi-device (MpiCommunicator over device buffers: CUDA-aware MPI or host staging),
// mpi-staged (the same, host staging forced), nccl.
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
#if KMOE_MPI_DEVICE_BUFFERS
#include <kmoe/core/cuda/check.hpp>

#include <cuda_runtime_api.h>
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

using namespace kmoe;
using Clock = std::chrono::steady_clock;

struct Options {
  int ep = 0;
  std::int64_t hidden = 512, experts = 8, top_k = 2, min_tokens = 16, max_tokens = 4096;
  int iters = 20, warmup = 3;
  std::int64_t blocks_per_peer = 0;  // 0: the dispatch/combine table
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
  num("blocks-per-peer", o.blocks_per_peer);
  o.ep = static_cast<int>(ep);
  o.iters = static_cast<int>(iters);
  o.warmup = static_cast<int>(warmup);
  if (kv.count("dtype")) o.dtype = kv["dtype"], kv.erase("dtype");
  if (kv.count("backend")) o.backend = kv["backend"], kv.erase("backend");
  KMOE_CHECK_USAGE(kv.empty(), "bench_alltoall: unknown option --", kv.empty() ? "" : kv.begin()->first);
  KMOE_CHECK_USAGE(o.top_k >= 1 && o.top_k <= o.experts, "bench_alltoall: --top-k ", o.top_k, " outside [1, ", o.experts, "]");
  KMOE_CHECK_USAGE(o.iters >= 1 && o.min_tokens >= 1 && o.max_tokens >= o.min_tokens, "bench_alltoall: bad sweep");
  KMOE_CHECK_USAGE(o.blocks_per_peer >= 0 && o.blocks_per_peer <= 1 << 20, "bench_alltoall: --blocks-per-peer ",
                   o.blocks_per_peer, " outside [0, 2^20]");
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


// ---- --blocks-per-peer: alltoallv vs alltoallv_blocks on raw buffers in the communicator's memory ------------------

/// `bytes` bytes in host memory or (device) in CUDA device memory.
class RawBuffer {
 public:
  RawBuffer(std::size_t bytes, bool device) : bytes_(bytes), device_(device) {
    if (!device_) {
      host_.resize(bytes_);
      return;
    }
#if KMOE_MPI_DEVICE_BUFFERS
    KMOE_CUDA_CHECK(cudaMalloc(&ptr_, std::max<std::size_t>(bytes_, 1)));
#else
    throw UsageError("bench_alltoall: device buffers need the CUDA runtime (KMOE_ENABLE_CUDA or KMOE_ENABLE_NCCL)");
#endif
  }
  ~RawBuffer() {
#if KMOE_MPI_DEVICE_BUFFERS
    if (device_) cudaFree(ptr_);
#endif
  }
  RawBuffer(const RawBuffer&) = delete;
  RawBuffer& operator=(const RawBuffer&) = delete;
  void* data() { return device_ ? ptr_ : host_.data(); }
  void upload(const std::vector<unsigned char>& h) {
    if (!device_) return void(host_ = h);
#if KMOE_MPI_DEVICE_BUFFERS
    KMOE_CUDA_CHECK(cudaMemcpy(ptr_, h.data(), bytes_, cudaMemcpyHostToDevice));
#endif
  }
  std::vector<unsigned char> download() const {
    if (!device_) return host_;
    std::vector<unsigned char> h(bytes_);
#if KMOE_MPI_DEVICE_BUFFERS
    KMOE_CUDA_CHECK(cudaMemcpy(h.data(), ptr_, bytes_, cudaMemcpyDeviceToHost));
#endif
    return h;
  }

 private:
  std::size_t bytes_;
  bool device_;
  void* ptr_ = nullptr;
  std::vector<unsigned char> host_;
};

// Column c of send row r on rank s: small integers, exact in every dtype; a row put in the wrong place shows unless
// it moved by a multiple of 251 rows from the same sender.
double exchange_value(int s, std::int64_t r, std::int64_t c) { return static_cast<double>((s * 131 + r * 7 + c) % 251); }

struct ExchangeRow {
  double bytes, plain_us, blocks_us;
  std::int64_t plain_wrong, blocks_wrong;
};

/// One size: every rank sends n rows of width H, contiguous_split(n, ep, p) of them to peer p, in B blocks each
/// (contiguous_split of the peer's rows). The send buffer is peer-major (block j of peer p after block j-1); the plain
/// alltoallv receives peer-major, alltoallv_blocks expert-major (block j of every sender before block j+1).
template <class T>
ExchangeRow measure_exchange(const Options& o, comm::Communicator& group, comm::MpiCommunicator& mpi, std::int64_t n) {
  const int ep = group.size(), me = group.rank();
  const std::int64_t H = o.hidden, B = o.blocks_per_peer;
  const std::size_t row_bytes = static_cast<std::size_t>(H) * sizeof(T);
  const bool device = group.uses_device_memory();
  auto block_rows = [&](std::int64_t peer_rows, std::int64_t j) {
    return comm::contiguous_split(peer_rows, static_cast<int>(B), static_cast<int>(j));
  };
  // Send side (the same for both calls).
  std::vector<std::int64_t> sc(ep), so(ep);
  std::vector<comm::RowBlock> sends;
  for (int p = 0; p < ep; ++p) {
    const auto share = comm::contiguous_split(n, ep, p);
    sc[p] = share.count;
    so[p] = share.begin;
    for (std::int64_t j = 0; j < B; ++j) {
      const auto b = block_rows(share.count, j);
      sends.push_back(comm::RowBlock{p, share.begin + b.begin, b.count});
    }
  }
  // Receive side: every sender sends this rank R rows.
  const std::int64_t R = comm::contiguous_split(n, ep, me).count;
  std::vector<std::int64_t> rc(ep, R), ro(ep);
  for (int q = 0; q < ep; ++q) ro[q] = q * R;
  std::vector<comm::RowBlock> recvs;
  std::int64_t at = 0;
  for (std::int64_t j = 0; j < B; ++j)
    for (int q = 0; q < ep; ++q) {
      recvs.push_back(comm::RowBlock{q, at, block_rows(R, j).count});
      at += block_rows(R, j).count;
    }

  std::vector<unsigned char> hs(static_cast<std::size_t>(n) * row_bytes);
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < H; ++c) {
      const T v = from_double<T>(exchange_value(me, r, c));
      std::memcpy(hs.data() + r * row_bytes + c * sizeof(T), &v, sizeof(T));
    }
  const std::size_t recv_bytes = static_cast<std::size_t>(ep * R) * row_bytes;
  RawBuffer send(hs.size(), device), recv_plain(recv_bytes, device), recv_blocks(recv_bytes, device);
  send.upload(hs);

  const comm::DataType type = comm::data_type_v<T>;
  auto time_it = [&](auto&& call) {
    double total = 0;
    for (int it = -o.warmup; it < o.iters; ++it) {
      group.barrier();
      const auto t0 = Clock::now();
      call();
      group.synchronize();
      const auto t1 = Clock::now();
      if (it >= 0) total += std::chrono::duration<double>(t1 - t0).count();
    }
    return total / o.iters;
  };
  double times[2];
  times[0] = time_it([&] {
    group.alltoallv(send.data(), sc.data(), so.data(), recv_plain.data(), rc.data(), ro.data(), H, type);
  });
  times[1] = time_it([&] {
    group.alltoallv_blocks(send.data(), sends.data(), sends.size(), recv_blocks.data(), recvs.data(), recvs.size(), H,
                           type);
  });

  // Check: row i from sender q is q's send row so_q[me] + i; in the expert-major buffer block j of q starts at the
  // rows of blocks < j of every sender plus blocks j of senders < q.
  std::int64_t wrong[2] = {0, 0};
  const auto gp = recv_plain.download(), gb = recv_blocks.download();
  const std::int64_t first = comm::contiguous_split(n, ep, me).begin;  // where every sender's rows for me start
  auto check = [&](const std::vector<unsigned char>& got, std::int64_t row, int q, std::int64_t src_row, std::int64_t& w) {
    for (std::int64_t c = 0; c < H; ++c) {
      const T want = from_double<T>(exchange_value(q, src_row, c));
      if (std::memcmp(&want, got.data() + row * row_bytes + c * sizeof(T), sizeof(T)) != 0) ++w;
    }
  };
  for (int q = 0; q < ep; ++q)
    for (std::int64_t i = 0; i < R; ++i) check(gp, q * R + i, q, first + i, wrong[0]);
  at = 0;
  for (std::int64_t j = 0; j < B; ++j)
    for (int q = 0; q < ep; ++q) {
      const auto b = block_rows(R, j);
      for (std::int64_t i = 0; i < b.count; ++i) check(gb, at + i, q, first + b.begin + i, wrong[1]);
      at += b.count;
    }
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, times, 2, MPI_DOUBLE, MPI_MAX, mpi.native()));
  KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, wrong, 2, MPI_INT64_T, MPI_SUM, mpi.native()));
  return ExchangeRow{static_cast<double>(n) * row_bytes, times[0] * 1e6, times[1] * 1e6, wrong[0], wrong[1]};
}

template <class T>
void sweep_exchange(const Options& o, const comm::ExpertParallel& layout, comm::MpiCommunicator& mpi) {
  comm::Communicator& group = layout.ep_group();
  const int ep = group.size();
  const double bus = ep > 1 ? static_cast<double>(ep - 1) / ep : 1.0;
  const bool root = layout.world().rank() == 0;
  if (root) {
    std::printf("#\n#  %12s %10s %6s %6s %11s %8s %8s %7s %11s %8s %8s %7s\n", "size", "rows/rank", "blocks", "type",
                "alltoallv", "algbw", "busbw", "#wrong", "blocks", "algbw", "busbw", "#wrong");
    std::printf("#  %12s %10s %6s %6s %11s %8s %8s %7s %11s %8s %8s %7s\n", "(B)", "", "/peer", "", "time (us)",
                "(GB/s)", "(GB/s)", "", "time (us)", "(GB/s)", "(GB/s)", "");
  }
  std::int64_t wrong_total = 0;
  for (std::int64_t tokens = o.min_tokens; tokens <= o.max_tokens; tokens *= 2) {
    const std::int64_t n = tokens * o.top_k;
    const ExchangeRow r = measure_exchange<T>(o, group, mpi, n);
    wrong_total += r.plain_wrong + r.blocks_wrong;
    if (root) {
      const double pa = r.bytes / (r.plain_us * 1e3), ba = r.bytes / (r.blocks_us * 1e3);
      std::printf("   %12.0f %10lld %6lld %6s %11.1f %8.2f %8.2f %7lld %11.1f %8.2f %8.2f %7lld\n", r.bytes,
                  static_cast<long long>(n), static_cast<long long>(o.blocks_per_peer), o.dtype.c_str(), r.plain_us,
                  pa, pa * bus, static_cast<long long>(r.plain_wrong), r.blocks_us, ba, ba * bus,
                  static_cast<long long>(r.blocks_wrong));
    }
  }
  if (root) std::printf("# Out of bounds values : %lld %s\n#\n", static_cast<long long>(wrong_total), wrong_total ? "FAILED" : "OK");
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
        std::string transport;  // how device buffers travel through MPI
        if (o.backend == "nccl") {
#if KMOE_ENABLE_NCCL
          data = comm::NcclCommunicator::world();
#else
          throw UsageError("bench_alltoall: --backend nccl: this kmoe was built without NCCL (KMOE_ENABLE_NCCL=OFF)");
#endif
        } else if (o.backend == "mpi-device" || o.backend == "mpi-staged") {
#if KMOE_MPI_DEVICE_BUFFERS
          // One GPU per rank where there are several (as NcclCommunicator::world chooses); all on one otherwise.
          MPI_Comm node = MPI_COMM_NULL;
          KMOE_MPI_CHECK(MPI_Comm_split_type(mpi_world->native(), MPI_COMM_TYPE_SHARED, mpi_world->rank(),
                                             MPI_INFO_NULL, &node));
          const comm::MpiCommunicator node_comm(node, true);
          int devices = 0;
          KMOE_CUDA_CHECK(cudaGetDeviceCount(&devices));
          KMOE_CHECK_USAGE(devices > 0, "bench_alltoall: --backend ", o.backend, ": no CUDA device");
          KMOE_CUDA_CHECK(cudaSetDevice(node_comm.rank() % devices));
          auto mpi = comm::MpiCommunicator::world(comm::BufferMemory::device);
          if (o.backend == "mpi-staged") mpi->set_host_staging(true);
          transport = mpi->device_transport();
          data = std::move(mpi);
#else
          KMOE_CHECK_USAGE(false, "bench_alltoall: --backend ", o.backend, ": this kmoe was built without the CUDA "
                           "runtime (KMOE_ENABLE_CUDA=OFF and KMOE_ENABLE_NCCL=OFF)");
#endif
        } else {
          KMOE_CHECK_USAGE(o.backend == "mpi", "bench_alltoall: --backend ", o.backend,
                           " (expected mpi, mpi-device, mpi-staged or nccl)");
          data = comm::MpiCommunicator::world();
        }
        // named first: the template argument list's comma would split the macro's arguments
        constexpr bool host_views =
            Kokkos::SpaceAccessibility<Kokkos::HostSpace, Kokkos::DefaultExecutionSpace::memory_space>::accessible;
        KMOE_CHECK_USAGE(o.blocks_per_peer > 0 || !data->uses_device_memory() || !host_views, "bench_alltoall: --backend ",
                         o.backend, " moves device memory: the dispatch/combine table needs a CUDA build of Kokkos "
                         "(device views); --blocks-per-peer B runs the exchange table on raw device buffers");
        comm::ExpertParallel layout(*data, o.experts, o.ep);
        if (mpi_world->rank() == 0) {
          std::printf("# %s bench_alltoall: backend %s%s%s, %d ranks = %d replicas x ep %d, %lld experts, top-%lld, "
                      "hidden %lld, %d iters (+%d warm-up), Kokkos %s\n",
                      version_string().c_str(), data->backend(), transport.empty() ? "" : " over device buffers, ",
                      transport.c_str(), mpi_world->size(), layout.placement().replicas(),
                      layout.placement().ep(), static_cast<long long>(o.experts), static_cast<long long>(o.top_k),
                      static_cast<long long>(o.hidden), o.iters, o.warmup,
                      Kokkos::DefaultExecutionSpace::name());
          if (o.blocks_per_peer > 0)
            std::printf("# alltoallv = Communicator::alltoallv, peer-major in and out; blocks = alltoallv_blocks, %lld "
                        "blocks per peer, received expert-major\n",
                        static_cast<long long>(o.blocks_per_peer));
          else
            std::printf("# dispatch = DispatchHandle (count exchange) + dispatch_forward; combine = combine_forward\n");
        }
        KMOE_CHECK_USAGE(o.dtype == "f32" || o.dtype == "f64" || o.dtype == "bf16", "bench_alltoall: --dtype ",
                         o.dtype, " (expected f32, f64 or bf16)");
        if (o.blocks_per_peer > 0) {
          if (o.dtype == "f32") sweep_exchange<float>(o, layout, *mpi_world);
          else if (o.dtype == "f64") sweep_exchange<double>(o, layout, *mpi_world);
          else sweep_exchange<bf16>(o, layout, *mpi_world);
          return;
        }
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
