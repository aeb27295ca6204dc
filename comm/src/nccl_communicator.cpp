#include <kmoe/comm/nccl_communicator.hpp>

#include <cfenv>
#include <cstdio>
#include <vector>

namespace kmoe::comm {
namespace detail {

void throw_nccl_error(ncclResult_t rc, const char* call, const char* file, int line) {
  const char* last = ncclGetLastError(nullptr);
  throw InternalError(kmoe::detail::concat("NCCL call failed at ", file, ":", line, ": ", call, ": ",
                                           ncclGetErrorString(rc),
                                           (last && *last) ? kmoe::detail::concat(" (", last, ")") : std::string()));
}

ncclDataType_t nccl_type(DataType type) {
  switch (type) {
    case DataType::f32: return ncclFloat32;
    case DataType::f64: return ncclFloat64;
    case DataType::bf16: return ncclBfloat16;
    case DataType::i32: return ncclInt32;
    case DataType::i64: return ncclInt64;
  }
  KMOE_ASSERT(false, "unknown DataType ", static_cast<int>(type));
}

}  // namespace detail

NcclCommunicator::NcclCommunicator(std::unique_ptr<MpiCommunicator> bootstrap, cudaStream_t stream, int device)
    : bootstrap_(std::move(bootstrap)), stream_(stream), device_(device) {
  KMOE_ASSERT(bootstrap_ != nullptr);
  if (device_ >= 0) KMOE_CUDA_CHECK(cudaSetDevice(device_));
  else KMOE_CUDA_CHECK(cudaGetDevice(&device_));
  if (!stream_) {
    KMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    own_stream_ = true;
  }
  // The bootstrap: rank 0 makes the id, MPI hands it to the others, then every rank joins.
  ncclUniqueId id;
  if (bootstrap_->rank() == 0) KMOE_NCCL_CHECK(ncclGetUniqueId(&id));
  // MPI directly: the id is host memory even when the bootstrap communicator takes device buffers.
  KMOE_MPI_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, bootstrap_->native()));
  // NCCL's topology/tuning model computes with inf/NaN on more than one rank (seen on 2 H200s: SIGFPE inside
  // ncclCommInitRank under the test main's FE_INVALID trap); hold FP traps for the call, as around cuBLAS.
  std::fenv_t env;
  std::feholdexcept(&env);
  const ncclResult_t rc = ncclCommInitRank(&comm_, bootstrap_->size(), id, bootstrap_->rank());
  std::fesetenv(&env);
  if (rc != ncclSuccess) detail::throw_nccl_error(rc, "ncclCommInitRank", __FILE__, __LINE__);
}

NcclCommunicator::~NcclCommunicator() {
  // Destructors must not throw: errors here are ignored (the job is ending or already failed).
  if (comm_) ncclCommDestroy(comm_);
  if (own_stream_ && stream_) cudaStreamDestroy(stream_);
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::world(cudaStream_t stream) {
  auto world = MpiCommunicator::world();
  // Ranks on one node share its GPUs round-robin.
  MPI_Comm node = MPI_COMM_NULL;
  KMOE_MPI_CHECK(MPI_Comm_split_type(world->native(), MPI_COMM_TYPE_SHARED, world->rank(), MPI_INFO_NULL, &node));
  const MpiCommunicator node_comm(node, true);
  int devices = 0;
  KMOE_CUDA_CHECK(cudaGetDeviceCount(&devices));
  KMOE_CHECK_USAGE(devices > 0, "kmoe::comm::NcclCommunicator::world: no CUDA device on this node");
  return std::make_unique<NcclCommunicator>(world->split_mpi(0, world->rank()), stream, node_comm.rank() % devices);
}

void NcclCommunicator::barrier() {
  synchronize();
  bootstrap_->barrier();
}

void NcclCommunicator::alltoall_counts(const std::int64_t* send, std::int64_t* recv, int per_peer) {
  bootstrap_->alltoall_counts(send, recv, per_peer);
}

void NcclCommunicator::alltoall_counts_device(const std::int64_t* send, std::int64_t* recv, int per_peer) {
  KMOE_ASSERT(per_peer >= 1);
  KMOE_NCCL_CHECK(ncclGroupStart());
  for (int p = 0; p < size(); ++p) {
    KMOE_NCCL_CHECK(ncclSend(send + static_cast<std::size_t>(p) * per_peer, per_peer, ncclInt64, p, comm_, stream_));
    KMOE_NCCL_CHECK(ncclRecv(recv + static_cast<std::size_t>(p) * per_peer, per_peer, ncclInt64, p, comm_, stream_));
  }
  KMOE_NCCL_CHECK(ncclGroupEnd());
}

void NcclCommunicator::alltoallv(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets,
                                 void* recv, const std::int64_t* recv_counts, const std::int64_t* recv_offsets,
                                 std::int64_t row_elems, DataType type) {
  if (row_elems == 0) return;
  const std::size_t row_bytes = static_cast<std::size_t>(row_elems) * size_of(type);
  const ncclDataType_t t = detail::nccl_type(type);
  const auto* s = static_cast<const char*>(send);
  auto* r = static_cast<char*>(recv);
  // One group: NCCL schedules every pair's send and receive together, so no ordering can deadlock.
  KMOE_NCCL_CHECK(ncclGroupStart());
  for (int p = 0; p < size(); ++p) {
    if (send_counts[p] > 0)
      KMOE_NCCL_CHECK(ncclSend(s + send_offsets[p] * row_bytes, static_cast<std::size_t>(send_counts[p] * row_elems), t,
                               p, comm_, stream_));
    if (recv_counts[p] > 0)
      KMOE_NCCL_CHECK(ncclRecv(r + recv_offsets[p] * row_bytes, static_cast<std::size_t>(recv_counts[p] * row_elems), t,
                               p, comm_, stream_));
  }
  KMOE_NCCL_CHECK(ncclGroupEnd());
}

void NcclCommunicator::alltoallv_blocks(const void* send, const RowBlock* sends, std::size_t num_sends, void* recv,
                                        const RowBlock* recvs, std::size_t num_recvs, std::int64_t row_elems,
                                        DataType type) {
  constexpr const char* fn = "kmoe::comm::NcclCommunicator::alltoallv_blocks";
  detail::check_row_blocks(fn, "sends", sends, num_sends, size());
  detail::check_row_blocks(fn, "recvs", recvs, num_recvs, size());
  KMOE_CHECK_USAGE(row_elems >= 0, fn, ": row_elems = ", row_elems, " is negative");
  if (row_elems == 0) return;
  const int me = rank();
  const std::size_t row_bytes = static_cast<std::size_t>(row_elems) * size_of(type);
  const ncclDataType_t t = detail::nccl_type(type);
  const auto* s = static_cast<const char*>(send);
  auto* r = static_cast<char*>(recv);

  // Self blocks: the n-th non-empty one sent to this rank fills the n-th non-empty one received from it. Checked
  // before anything is enqueued.
  std::vector<std::size_t> self_sends, self_recvs;
  for (std::size_t i = 0; i < num_sends; ++i)
    if (sends[i].peer == me && sends[i].rows > 0) self_sends.push_back(i);
  for (std::size_t j = 0; j < num_recvs; ++j)
    if (recvs[j].peer == me && recvs[j].rows > 0) self_recvs.push_back(j);
  KMOE_CHECK_USAGE(self_sends.size() == self_recvs.size(), fn, ": rank ", me, " sends itself ", self_sends.size(),
                   " non-empty blocks but receives ", self_recvs.size(), " from itself");
  for (std::size_t n = 0; n < self_sends.size(); ++n)
    KMOE_CHECK_USAGE(sends[self_sends[n]].rows == recvs[self_recvs[n]].rows, fn, ": self block ", n, " sends ",
                     sends[self_sends[n]].rows, " rows (sends[", self_sends[n], "]) into ", recvs[self_recvs[n]].rows,
                     " rows (recvs[", self_recvs[n], "])");
  for (std::size_t n = 0; n < self_sends.size(); ++n) {
    const RowBlock &a = sends[self_sends[n]], &b = recvs[self_recvs[n]];
    KMOE_CUDA_CHECK(cudaMemcpyAsync(r + static_cast<std::size_t>(b.offset) * row_bytes,
                                    s + static_cast<std::size_t>(a.offset) * row_bytes,
                                    static_cast<std::size_t>(a.rows) * row_bytes, cudaMemcpyDeviceToDevice, stream_));
  }

  // One group: NCCL schedules every pair's sends and receives together (several per pair are matched in issue order),
  // so no ordering of the blocks can deadlock.
  KMOE_NCCL_CHECK(ncclGroupStart());
  for (std::size_t j = 0; j < num_recvs; ++j) {
    const RowBlock& b = recvs[j];
    if (b.rows == 0 || b.peer == me) continue;
    KMOE_NCCL_CHECK(ncclRecv(r + static_cast<std::size_t>(b.offset) * row_bytes,
                             static_cast<std::size_t>(b.rows * row_elems), t, b.peer, comm_, stream_));
  }
  for (std::size_t i = 0; i < num_sends; ++i) {
    const RowBlock& b = sends[i];
    if (b.rows == 0 || b.peer == me) continue;
    KMOE_NCCL_CHECK(ncclSend(s + static_cast<std::size_t>(b.offset) * row_bytes,
                             static_cast<std::size_t>(b.rows * row_elems), t, b.peer, comm_, stream_));
  }
  KMOE_NCCL_CHECK(ncclGroupEnd());
}

void NcclCommunicator::allreduce_sum(void* data, std::int64_t count, DataType type) {
  if (count == 0) return;
  KMOE_NCCL_CHECK(ncclAllReduce(data, data, static_cast<std::size_t>(count), detail::nccl_type(type), ncclSum, comm_,
                                stream_));
}

void NcclCommunicator::broadcast(void* data, std::int64_t bytes, int root) {
  if (bytes == 0) return;
  KMOE_NCCL_CHECK(ncclBroadcast(data, data, static_cast<std::size_t>(bytes), ncclChar, root, comm_, stream_));
}

void NcclCommunicator::synchronize() { KMOE_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  return std::make_unique<NcclCommunicator>(bootstrap_->split_mpi(color, key), stream_, device_);
}

void NcclCommunicator::abort(int code, const std::string& message) {
  // Unblock this rank's NCCL kernels first, so that MPI_Abort is not stuck behind a collective on the GPU.
  if (comm_) ncclCommAbort(comm_);
  comm_ = nullptr;
  bootstrap_->abort(code, message);
}

}  // namespace kmoe::comm
