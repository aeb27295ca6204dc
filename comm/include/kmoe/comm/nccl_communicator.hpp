/// \file nccl_communicator.hpp
/// \brief The NCCL backend of kmoe::comm::Communicator: GPU collectives on raw device pointers, enqueued on a
/// cudaStream_t, bootstrapped over MPI (rank 0 makes the ncclUniqueId, MPI_Bcast hands it out). Plain C++: compiled
/// by the host compiler against the CUDA toolkit's headers, built when KMOE_ENABLE_NCCL=ON.
#pragma once

#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/config.hpp>

#if !KMOE_ENABLE_NCCL
#error "kmoe was built without NCCL (KMOE_ENABLE_NCCL=OFF): <kmoe/comm/nccl_communicator.hpp> is not available"
#endif

#include <kmoe/core/cuda/check.hpp>  // KMOE_CUDA_CHECK

#include <cuda_runtime_api.h>
#include <nccl.h>

namespace kmoe::comm {

namespace detail {
/// Throws kmoe::InternalError "NCCL call failed at FILE:LINE: CALL: <ncclGetErrorString> (<ncclGetLastError>)".
[[noreturn]] void throw_nccl_error(ncclResult_t rc, const char* call, const char* file, int line);
/// The NCCL datatype of `type`.
ncclDataType_t nccl_type(DataType type);
}  // namespace detail

/// Checks an NCCL call: anything but ncclSuccess throws kmoe::InternalError with the call text, NCCL's error string
/// (and its last-error detail) and file:line.
#define KMOE_NCCL_CHECK(call)                                                                               \
  do {                                                                                                      \
    const ncclResult_t kmoe_nccl_rc_ = (call);                                                              \
    if (kmoe_nccl_rc_ != ncclSuccess) ::kmoe::comm::detail::throw_nccl_error(kmoe_nccl_rc_, #call, __FILE__, __LINE__); \
  } while (0)

/// A Communicator over an NCCL communicator. Data buffers are device pointers; alltoallv and alltoallv_blocks (grouped
/// ncclSend/ncclRecv), allreduce_sum and broadcast are enqueued on stream() and return without waiting. Counts, *_host calls, barrier,
/// split and abort go through the MPI bootstrap communicator.
class NcclCommunicator final : public Communicator {
 public:
  /// Creates the NCCL communicator over the ranks of `bootstrap` (collective over it).
  /// \param bootstrap [in] the MPI communicator of the same ranks (owned from now on)
  /// \param stream    [in] where to enqueue; nullptr creates (and owns) a non-blocking stream on `device`
  /// \param device    [in] CUDA device of this rank; -1 keeps the current device
  NcclCommunicator(std::unique_ptr<MpiCommunicator> bootstrap, cudaStream_t stream = nullptr, int device = -1);
  ~NcclCommunicator() override;

  /// Over MPI_COMM_WORLD, each rank on device (rank within its node) % (devices on the node).
  static std::unique_ptr<NcclCommunicator> world(cudaStream_t stream = nullptr);

  ncclComm_t native() const { return comm_; }
  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  MpiCommunicator& bootstrap() const { return *bootstrap_; }

  int rank() const override { return bootstrap_->rank(); }
  int size() const override { return bootstrap_->size(); }
  const char* backend() const override { return "nccl"; }
  bool uses_device_memory() const override { return true; }
  /// Waits for this rank's stream, then an MPI barrier.
  void barrier() override;
  /// Host counts, through the MPI bootstrap.
  void alltoall_counts(const std::int64_t* send, std::int64_t* recv, int per_peer) override;
  /// The same exchange with device-resident counts (grouped ncclSend/ncclRecv of int64, enqueued on stream(), no host
  /// synchronisation): for pipelines that size their buffers on the device.
  void alltoall_counts_device(const std::int64_t* send, std::int64_t* recv, int per_peer);
  void alltoallv(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets, void* recv,
                 const std::int64_t* recv_counts, const std::int64_t* recv_offsets, std::int64_t row_elems,
                 DataType type) override;
  /// One ncclGroupStart/End with an ncclSend/ncclRecv per non-empty block to or from another rank (NCCL matches the
  /// operations of one pair in the order they were issued); self blocks are cudaMemcpyAsync device-to-device on
  /// stream(), paired in list order (kmoe::UsageError when their row counts differ). Enqueued on stream(), no host
  /// synchronisation.
  void alltoallv_blocks(const void* send, const RowBlock* sends, std::size_t num_sends, void* recv,
                        const RowBlock* recvs, std::size_t num_recvs, std::int64_t row_elems,
                        DataType type) override;
  void allreduce_sum(void* data, std::int64_t count, DataType type) override;
  void allreduce_sum_host(double* data, std::int64_t count) override { bootstrap_->allreduce_sum_host(data, count); }
  void broadcast(void* data, std::int64_t bytes, int root) override;
  void synchronize() override;
  /// Splits the bootstrap communicator and bootstraps a new NCCL communicator on it (same stream and device).
  std::unique_ptr<Communicator> split(int color, int key) override;
  [[noreturn]] void abort(int code, const std::string& message) override;

 private:
  std::unique_ptr<MpiCommunicator> bootstrap_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool own_stream_ = false;
  int device_ = -1;
};

}  // namespace kmoe::comm
