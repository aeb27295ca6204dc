// MpiCommunicator with BufferMemory::device (label cuda; skips without a GPU): several processes on ONE GPU exchange
// device buffers through MPI, both on the transport MPI offers (CUDA-aware or host-staged) and with host staging
// forced. alltoallv, alltoallv_blocks (random block lists), allreduce_sum and broadcast; a split keeps the mode.
// With a CUDA Kokkos build the dispatch/combine transports also run on device views through it.
#include <gtest/gtest.h>

#include "block_exchange.hpp"
#include "device_buffer.hpp"

#include <kmoe/comm/alltoall.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/mpi_communicator.hpp>

#include <Kokkos_Core.hpp>

#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace kmoe;
using test::DeviceBuffer;
using test::have_gpu;

std::string where(const comm::MpiCommunicator& comm) {
  return std::string("rank ") + std::to_string(comm.rank()) + "/" + std::to_string(comm.size()) + ", " +
         comm.device_transport();
}

void collectives(comm::MpiCommunicator& comm) {
  const int n = comm.size(), me = comm.rank();
  SCOPED_TRACE(where(comm));
  EXPECT_STREQ(comm.backend(), "mpi");
  EXPECT_TRUE(comm.uses_device_memory());

  // allreduce_sum: sum over ranks of (rank + i), in f64 and i32.
  std::vector<double> ha(5);
  std::iota(ha.begin(), ha.end(), static_cast<double>(me));
  DeviceBuffer<double> a(ha);
  comm.allreduce_sum(a.ptr, 5, comm::DataType::f64);
  const auto ra = a.download();
  for (int i = 0; i < 5; ++i) EXPECT_EQ(ra[i], n * i + n * (n - 1) / 2.0);
  DeviceBuffer<std::int32_t> ai(std::vector<std::int32_t>(1000, me + 1));
  comm.allreduce_sum(ai.ptr, 1000, comm::DataType::i32);
  for (auto v : ai.download()) EXPECT_EQ(v, n * (n + 1) / 2);

  // alltoallv: rank q sends q+1 rows of width 3 to every peer p, valued 100 q + 10 p + c; received rows at an offset of
  // 2 rows, and the rows around them stay as they were.
  const int w = 3;
  std::vector<std::int64_t> sc(n, me + 1), so(n), rc(n), ro(n);
  for (int p = 0; p < n; ++p) so[p] = p * (me + 1);
  comm.alltoall_counts(sc.data(), rc.data(), 1);
  ro[0] = 2;
  for (int p = 1; p < n; ++p) ro[p] = ro[p - 1] + rc[p - 1];
  std::vector<float> hs(static_cast<std::size_t>(n) * (me + 1) * w);
  for (int p = 0; p < n; ++p)
    for (int r = 0; r < me + 1; ++r)
      for (int c = 0; c < w; ++c) hs[((so[p] + r) * w) + c] = static_cast<float>(100 * me + 10 * p + c);
  const std::int64_t total = ro[n - 1] + rc[n - 1] + 1;
  DeviceBuffer<float> s(hs), r(std::vector<float>(static_cast<std::size_t>(total) * w, -1.0f));
  comm.alltoallv(s.ptr, sc.data(), so.data(), r.ptr, rc.data(), ro.data(), w, comm::DataType::f32);
  const auto hr = r.download();
  for (int q = 0; q < n; ++q)
    for (int row = 0; row < rc[q]; ++row)
      for (int c = 0; c < w; ++c) EXPECT_EQ(hr[(ro[q] + row) * w + c], 100 * q + 10 * me + c);
  for (int c = 0; c < 2 * w; ++c) EXPECT_EQ(hr[c], -1.0f);
  for (int c = 0; c < w; ++c) EXPECT_EQ(hr[(total - 1) * w + c], -1.0f);

  // broadcast from the last rank.
  DeviceBuffer<int> b(std::vector<int>{me, me, me, me});
  comm.broadcast(b.ptr, 4 * sizeof(int), n - 1);
  for (int v : b.download()) EXPECT_EQ(v, n - 1);
}

template <class T>
void block_exchanges(comm::MpiCommunicator& comm, std::int64_t w) {
  const int n = comm.size(), me = comm.rank();
  for (unsigned seed = 1; seed <= 6; ++seed) {
    const auto x = test::make_exchange(seed, me, n, /*max_blocks=*/seed == 6 ? 16 : 4);
    DeviceBuffer<T> send(test::send_data<T>(me, x.send_rows, w)), recv(test::recv_fill<T>(x.recv_rows, w));
    comm.alltoallv_blocks(send.ptr, x.sends.data(), x.sends.size(), recv.ptr, x.recvs.data(), x.recvs.size(), w,
                          comm::data_type_v<T>);
    EXPECT_EQ(test::count_wrong(x, recv.download(), w), 0)
        << "seed " << seed << ", " << where(comm) << ", " << comm::name_of(comm::data_type_v<T>);
  }
}

void all_block_exchanges(comm::MpiCommunicator& comm) {
  block_exchanges<float>(comm, 3);
  block_exchanges<bf16>(comm, 5);
  block_exchanges<std::int64_t>(comm, 2);
}

TEST(MpiDevice, CollectivesOnDevicePointers) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto comm = comm::MpiCommunicator::world(comm::BufferMemory::device);
  const std::string transport = comm->device_transport();
  EXPECT_TRUE(transport == "cuda-aware" || transport == "host-staged") << transport;
  if (comm->rank() == 0) std::printf("MPI device transport: %s\n", transport.c_str());
  collectives(*comm);
  comm->set_host_staging(true);
  EXPECT_STREQ(comm->device_transport(), "host-staged");
  collectives(*comm);
}

TEST(MpiDevice, AlltoallvBlocksOnDevicePointers) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto comm = comm::MpiCommunicator::world(comm::BufferMemory::device);
  all_block_exchanges(*comm);
  comm->set_host_staging(true);
  all_block_exchanges(*comm);
}

TEST(MpiDevice, SplitKeepsTheMode) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto comm = comm::MpiCommunicator::world(comm::BufferMemory::device);
  comm->set_host_staging(true);
  auto half = comm->split_mpi(comm->rank() % 2, comm->rank());
  EXPECT_EQ(half->memory(), comm::BufferMemory::device);
  EXPECT_STREQ(half->device_transport(), "host-staged");
  auto generic = comm->split(0, comm->rank());
  EXPECT_TRUE(generic->uses_device_memory());
  collectives(*half);
  all_block_exchanges(*half);
}

// A free function: nvcc accepts device lambdas only in functions whose address can be taken (not TestBody).
template <class IdxView, class RowView>
void fill_routing(const IdxView& topk, const RowView& x) {
  Kokkos::parallel_for(
      "init", Kokkos::RangePolicy<Kokkos::DefaultExecutionSpace>(0, topk.extent(0)), KOKKOS_LAMBDA(const std::int64_t t) {
        topk(t, 0) = (3 * t) % 5;
        topk(t, 1) = (3 * t + 1 + t % 4) % 5;
        for (int c = 0; c < 7; ++c) x(t, c) = 10.0 * t + c;
      });
}

TEST(MpiDevice, DispatchCombineRoundTripOnDeviceViews) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  using Mem = Kokkos::DefaultExecutionSpace::memory_space;
  if (Kokkos::SpaceAccessibility<Kokkos::HostSpace, Mem>::accessible)
    GTEST_SKIP() << "Kokkos' default memory space is host memory: this build has no device views";
  auto world = comm::MpiCommunicator::world(comm::BufferMemory::device);
  comm::ExpertParallel layout(*world, 5);
  const std::int64_t tokens = 29 + world->rank();
  Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Mem> topk("topk", tokens, 2);
  Kokkos::View<double**, Kokkos::LayoutRight, Mem> x("x", tokens, 7);
  fill_routing(topk, x);
  const comm::DispatchHandle h(layout, topk);
  const auto rows = comm::dispatch_forward(h, x);
  const auto back = comm::combine_forward(h, rows);
  const auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), back);
  for (std::int64_t a = 0; a < 2 * tokens; ++a)
    for (int c = 0; c < 7; ++c) EXPECT_EQ(hb(a, c), 10.0 * (a / 2) + c);
}

}  // namespace
