// Communicator::alltoallv_blocks on the MPI backend (host buffers) under mpirun with 1-4 ranks: random block lists with
// several blocks per peer, empty blocks and self blocks, in f32, bf16 and i64, checked element by element (and the
// rows outside every receive block untouched); an expert-major receive against the plain alltoallv; argument errors.
#include <gtest/gtest.h>

#include "block_exchange.hpp"

#include <kmoe/comm/mpi_communicator.hpp>

#include <climits>
#include <functional>
#include <string>

namespace {

using namespace kmoe;

template <class T>
void run_random_exchanges(std::int64_t w) {
  auto comm = comm::MpiCommunicator::world();
  const int n = comm->size(), me = comm->rank();
  for (unsigned seed = 1; seed <= 8; ++seed) {
    const auto x = test::make_exchange(seed, me, n);
    const auto send = test::send_data<T>(me, x.send_rows, w);
    auto recv = test::recv_fill<T>(x.recv_rows, w);
    comm->alltoallv_blocks(send.data(), x.sends.data(), x.sends.size(), recv.data(), x.recvs.data(), x.recvs.size(),
                           w, comm::data_type_v<T>);
    EXPECT_EQ(test::count_wrong(x, recv, w), 0)
        << "seed " << seed << ", rank " << me << "/" << n << ", " << comm::name_of(comm::data_type_v<T>) << ", width "
        << w << ", " << x.sends.size() << " send / " << x.recvs.size() << " receive blocks";
  }
}

TEST(AlltoallvBlocks, RandomBlockListsF32) { run_random_exchanges<float>(3); }
TEST(AlltoallvBlocks, RandomBlockListsBf16) { run_random_exchanges<bf16>(5); }
TEST(AlltoallvBlocks, RandomBlockListsI64) { run_random_exchanges<std::int64_t>(1); }

TEST(AlltoallvBlocks, ManyBlocksPerPeer) {
  auto comm = comm::MpiCommunicator::world();
  const int n = comm->size(), me = comm->rank();
  const auto x = test::make_exchange(99, me, n, /*max_blocks=*/24, /*max_rows=*/3);
  const auto send = test::send_data<double>(me, x.send_rows, 2);
  auto recv = test::recv_fill<double>(x.recv_rows, 2);
  comm->alltoallv_blocks(send.data(), x.sends.data(), x.sends.size(), recv.data(), x.recvs.data(), x.recvs.size(), 2,
                         comm::DataType::f64);
  EXPECT_EQ(test::count_wrong(x, recv, 2), 0);
}

// The use the call is made for: rows sent peer-major (one block per (peer, expert)) land expert-major on the receiver,
// the same rows that a plain alltoallv delivers peer-major.
TEST(AlltoallvBlocks, ExpertMajorReceiveMatchesAlltoallv) {
  auto comm = comm::MpiCommunicator::world();
  const int n = comm->size(), me = comm->rank();
  const int experts = 3;  // local experts per rank
  const std::int64_t w = 4;
  // rows(q -> p, expert j) for every q, p, j: every rank can compute it.
  auto rows = [](int q, int p, int j) -> std::int64_t { return (q * 5 + p * 3 + j * 7) % 4; };
  std::vector<comm::RowBlock> sends, recvs;
  std::vector<std::int64_t> sc(n), so(n), rc(n), ro(n);
  std::int64_t at = 0;
  for (int p = 0; p < n; ++p) {
    so[p] = at;
    for (int j = 0; j < experts; ++j) {
      sends.push_back({p, at, rows(me, p, j)});
      at += rows(me, p, j);
    }
    sc[p] = at - so[p];
  }
  const std::int64_t send_rows = at;
  at = 0;
  for (int j = 0; j < experts; ++j)
    for (int q = 0; q < n; ++q) {
      recvs.push_back({q, at, rows(q, me, j)});
      at += rows(q, me, j);
    }
  const std::int64_t recv_rows = at;
  for (int q = 0; q < n; ++q) {
    rc[q] = 0;
    for (int j = 0; j < experts; ++j) rc[q] += rows(q, me, j);
    ro[q] = q == 0 ? 0 : ro[q - 1] + rc[q - 1];
  }
  const auto send = test::send_data<float>(me, send_rows, w);
  std::vector<float> by_expert(recv_rows * w, -1.0f), by_peer(recv_rows * w, -1.0f);
  comm->alltoallv_blocks(send.data(), sends.data(), sends.size(), by_expert.data(), recvs.data(), recvs.size(), w,
                         comm::DataType::f32);
  comm->alltoallv(send.data(), sc.data(), so.data(), by_peer.data(), rc.data(), ro.data(), w, comm::DataType::f32);
  // Unpack the peer-major rows into expert-major order by hand and compare.
  std::int64_t out = 0;
  for (int j = 0; j < experts; ++j)
    for (int q = 0; q < n; ++q) {
      std::int64_t in = ro[q];
      for (int i = 0; i < j; ++i) in += rows(q, me, i);
      for (std::int64_t r = 0; r < rows(q, me, j); ++r, ++in, ++out)
        for (std::int64_t c = 0; c < w; ++c)
          ASSERT_EQ(by_expert[out * w + c], by_peer[in * w + c]) << "expert " << j << " from " << q << " row " << r;
    }
  EXPECT_EQ(out, recv_rows);
}

TEST(AlltoallvBlocks, NothingToMove) {
  auto comm = comm::MpiCommunicator::world();
  // No blocks at all, and a zero row width (the buffers are never touched).
  comm->alltoallv_blocks(nullptr, nullptr, 0, nullptr, nullptr, 0, 3, comm::DataType::f32);
  const comm::RowBlock b{comm->rank(), 5, 7};
  comm->alltoallv_blocks(nullptr, &b, 1, nullptr, &b, 1, 0, comm::DataType::f32);
  // Only empty blocks.
  const comm::RowBlock e{comm->size() - 1, 1000, 0};
  comm->alltoallv_blocks(nullptr, &e, 1, nullptr, &e, 1, 4, comm::DataType::bf16);
}

// Every rank makes the same mistake, so every rank throws before communicating and none hangs.
void expect_usage_error(const std::function<void()>& call, const std::string& needle) {
  try {
    call();
    ADD_FAILURE() << "no kmoe::UsageError; expected one naming '" << needle << "'";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("alltoallv_blocks"), std::string::npos) << e.what();
  }
}

TEST(AlltoallvBlocks, ArgumentErrors) {
  auto comm = comm::MpiCommunicator::world();
  const int n = comm->size();
  float buf[8] = {};
  const comm::RowBlock ok{0, 0, 1};
  auto call = [&](comm::RowBlock s, comm::RowBlock r, std::int64_t w = 1) {
    return [&comm, &buf, s, r, w] { comm->alltoallv_blocks(buf, &s, 1, buf + 4, &r, 1, w, comm::DataType::f32); };
  };
  expect_usage_error(call({n, 0, 1}, ok), "sends[0].peer = " + std::to_string(n));
  expect_usage_error(call(ok, {-1, 0, 1}), "recvs[0].peer = -1");
  expect_usage_error(call({0, -2, 1}, ok), "sends[0].offset = -2");
  expect_usage_error(call(ok, {0, 0, -3}), "recvs[0].rows = -3");
  expect_usage_error(call(ok, ok, -1), "row_elems = -1");
  expect_usage_error(call({0, 0, std::int64_t(INT_MAX) + 1}, ok), "does not fit MPI's int counts");
  expect_usage_error([&] { comm->alltoallv_blocks(buf, nullptr, 2, buf + 4, &ok, 1, 1, comm::DataType::f32); },
                     "sends is null but holds 2 blocks");
}

TEST(MpiCommunicator, HostModeReportsNoDeviceTransport) {
  auto comm = comm::MpiCommunicator::world();
  EXPECT_EQ(comm->memory(), comm::BufferMemory::host);
  EXPECT_FALSE(comm->uses_device_memory());
  EXPECT_STREQ(comm->device_transport(), "none");
  EXPECT_THROW(comm->set_host_staging(true), UsageError);
  auto sub = comm->split_mpi(0, comm->rank());
  EXPECT_EQ(sub->memory(), comm::BufferMemory::host);
}

#if !KMOE_MPI_DEVICE_BUFFERS
TEST(MpiCommunicator, DeviceModeNeedsTheCudaRuntime) {
  try {
    comm::MpiCommunicator::world(comm::BufferMemory::device);
    ADD_FAILURE() << "a device-mode communicator without the CUDA runtime";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("KMOE_ENABLE_NCCL"), std::string::npos) << e.what();
  }
}
#endif

}  // namespace
