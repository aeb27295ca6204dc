// The NCCL communicator on the device machine (label cuda; skips without a GPU). With one rank every exchange is a
// self-send, which still runs NCCL's grouped send/recv, all-reduce and broadcast kernels on the stream. With a CUDA
// Kokkos build, the dispatch/combine transports also run on device views through NCCL.
#include <gtest/gtest.h>

#include "block_exchange.hpp"
#include "device_buffer.hpp"

#include <kmoe/comm/alltoall.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/nccl_communicator.hpp>

#include <cuda_runtime_api.h>

#include <numeric>
#include <vector>

namespace {

using namespace kmoe;

using test::DeviceBuffer;
using test::have_gpu;

TEST(Nccl, CollectivesOnDevicePointers) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto comm = comm::NcclCommunicator::world();
  const int n = comm->size(), me = comm->rank();
  EXPECT_STREQ(comm->backend(), "nccl");

  // allreduce_sum: sum over ranks of (rank + i).
  DeviceBuffer<double> a(5);
  std::vector<double> ha(5);
  std::iota(ha.begin(), ha.end(), static_cast<double>(me));
  a.upload(ha);
  comm->allreduce_sum(a.ptr, 5, comm::DataType::f64);
  comm->synchronize();
  const auto ra = a.download();
  for (int i = 0; i < 5; ++i) EXPECT_EQ(ra[i], n * i + n * (n - 1) / 2.0);

  // alltoallv: rank q sends q+1 rows of width 3 to every peer p, valued 100 q + 10 p + c.
  const int w = 3;
  std::vector<std::int64_t> sc(n, me + 1), so(n), rc(n), ro(n);
  for (int p = 0; p < n; ++p) so[p] = p * (me + 1);
  comm->alltoall_counts(sc.data(), rc.data(), 1);
  for (int p = 1; p < n; ++p) ro[p] = ro[p - 1] + rc[p - 1];
  for (int q = 0; q < n; ++q) EXPECT_EQ(rc[q], q + 1);
  std::vector<float> hs(static_cast<std::size_t>(n) * (me + 1) * w);
  for (int p = 0; p < n; ++p)
    for (int r = 0; r < me + 1; ++r)
      for (int c = 0; c < w; ++c) hs[((so[p] + r) * w) + c] = static_cast<float>(100 * me + 10 * p + c);
  const std::int64_t total = ro[n - 1] + rc[n - 1];
  DeviceBuffer<float> s(hs.size()), r(static_cast<std::size_t>(total) * w);
  s.upload(hs);
  comm->alltoallv(s.ptr, sc.data(), so.data(), r.ptr, rc.data(), ro.data(), w, comm::DataType::f32);
  comm->synchronize();
  const auto hr = r.download();
  for (int q = 0; q < n; ++q)
    for (int row = 0; row < rc[q]; ++row)
      for (int c = 0; c < w; ++c) EXPECT_EQ(hr[(ro[q] + row) * w + c], 100 * q + 10 * me + c);

  // Device-resident counts.
  DeviceBuffer<std::int64_t> dsc(n), drc(n);
  dsc.upload(sc);
  comm->alltoall_counts_device(dsc.ptr, drc.ptr, 1);
  comm->synchronize();
  EXPECT_EQ(drc.download(), rc);

  // broadcast from the last rank.
  DeviceBuffer<int> b(4);
  b.upload({me, me, me, me});
  comm->broadcast(b.ptr, 4 * sizeof(int), n - 1);
  comm->synchronize();
  for (int v : b.download()) EXPECT_EQ(v, n - 1);

  // A split communicator works too.
  auto half = comm->split(me % 2, me);
  EXPECT_EQ(half->size(), (n + 1 - me % 2) / 2);
  comm->barrier();
}

// alltoallv_blocks with the random block lists of the host test: with one rank every block is a self block (device
// copies on the stream), with more a mix of grouped ncclSend/ncclRecv and self copies.
template <class T>
void nccl_block_exchanges(comm::NcclCommunicator& comm, std::int64_t w) {
  const int n = comm.size(), me = comm.rank();
  for (unsigned seed = 1; seed <= 6; ++seed) {
    const auto x = test::make_exchange(seed, me, n, /*max_blocks=*/seed == 6 ? 16 : 4);
    DeviceBuffer<T> send(test::send_data<T>(me, x.send_rows, w)), recv(test::recv_fill<T>(x.recv_rows, w));
    comm.alltoallv_blocks(send.ptr, x.sends.data(), x.sends.size(), recv.ptr, x.recvs.data(), x.recvs.size(), w,
                          comm::data_type_v<T>);
    comm.synchronize();
    EXPECT_EQ(test::count_wrong(x, recv.download(), w), 0)
        << "seed " << seed << ", rank " << me << "/" << n << ", " << comm::name_of(comm::data_type_v<T>);
  }
}

TEST(Nccl, AlltoallvBlocksOnDevicePointers) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  auto comm = comm::NcclCommunicator::world();
  nccl_block_exchanges<float>(*comm, 3);
  nccl_block_exchanges<bf16>(*comm, 5);
  nccl_block_exchanges<std::int64_t>(*comm, 2);
  // Self blocks whose row counts differ are refused before anything is enqueued.
  const comm::RowBlock s{comm->rank(), 0, 2}, r{comm->rank(), 0, 3};
  EXPECT_THROW(comm->alltoallv_blocks(nullptr, &s, 1, nullptr, &r, 1, 1, comm::DataType::f32), UsageError);
  const comm::RowBlock bad{comm->size(), 0, 1};
  EXPECT_THROW(comm->alltoallv_blocks(nullptr, &bad, 1, nullptr, &r, 1, 1, comm::DataType::f32), UsageError);
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

TEST(Nccl, DispatchCombineRoundTripOnDeviceViews) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  using Mem = Kokkos::DefaultExecutionSpace::memory_space;
  if (Kokkos::SpaceAccessibility<Kokkos::HostSpace, Mem>::accessible)
    GTEST_SKIP() << "Kokkos' default memory space is host memory: this build cannot hand NCCL device views";
  auto world = comm::NcclCommunicator::world();
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
