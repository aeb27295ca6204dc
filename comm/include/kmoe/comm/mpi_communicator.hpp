/// \file mpi_communicator.hpp
/// \brief The MPI backend of kmoe::comm::Communicator (CPU ranks, the bootstrap of the NCCL backend, and several
/// processes sharing one GPU), and the checked-call macro for MPI.
#pragma once

#include <kmoe/comm/communicator.hpp>
#include <kmoe/config.hpp>

#if !KMOE_ENABLE_MPI
#error "kmoe was built without MPI (KMOE_ENABLE_MPI=OFF): <kmoe/comm/mpi_communicator.hpp> is not available"
#endif

#include <mpi.h>

#include <cstddef>

/// 1 when kmoe links the CUDA runtime (KMOE_ENABLE_CUDA or KMOE_ENABLE_NCCL): an MpiCommunicator can then take device
/// buffers (BufferMemory::device).
#define KMOE_MPI_DEVICE_BUFFERS (KMOE_ENABLE_CUDA || KMOE_ENABLE_NCCL)

namespace kmoe::comm {

namespace detail {
/// Throws kmoe::InternalError "MPI call failed at FILE:LINE: CALL: <MPI error string>".
[[noreturn]] void throw_mpi_error(int code, const char* call, const char* file, int line);
/// The MPI datatype of `type`.
MPI_Datatype mpi_type(DataType type);
}  // namespace detail

/// Checks an MPI call: anything but MPI_SUCCESS throws kmoe::InternalError with the call text, MPI's error string and
/// file:line. Communicators built by kmoe set MPI_ERRORS_RETURN so that errors come back here instead of aborting.
#define KMOE_MPI_CHECK(call)                                                                        \
  do {                                                                                              \
    const int kmoe_mpi_rc_ = (call);                                                                \
    if (kmoe_mpi_rc_ != MPI_SUCCESS) ::kmoe::comm::detail::throw_mpi_error(kmoe_mpi_rc_, #call, __FILE__, __LINE__); \
  } while (0)

/// A Communicator over an MPI communicator; every data-moving call blocks.
///
/// With BufferMemory::host the data buffers are host memory. With BufferMemory::device they are CUDA device pointers
/// (several processes on one GPU, where NCCL refuses to run): alltoallv, alltoallv_blocks, allreduce_sum and
/// broadcast first wait for all work queued on the device (cudaDeviceSynchronize), then either hand the device
/// pointers to MPI, when the MPI library is CUDA-aware (Open MPI's MPIX_Query_cuda_support() at run time), or stage
/// through pinned host buffers (cudaMallocHost, grown as needed and kept until destruction: copy in, MPI on the host,
/// copy out). Either way they return with the results in place. device_transport() says which path is taken.
/// Counts and the *_host calls take host memory in both modes.
class MpiCommunicator final : public Communicator {
 public:
  /// Wraps `comm` (MPI must be initialised). With `owned` the communicator is freed on destruction;
  /// MPI_COMM_WORLD is never freed. Sets MPI_ERRORS_RETURN on `comm`. Collective over `comm` (duplicates it once).
  /// \param comm   [in] the MPI communicator
  /// \param owned  [in] free `comm` on destruction
  /// \param memory [in] where the data buffers live. BufferMemory::device throws kmoe::UsageError when kmoe was built
  ///                    without the CUDA runtime (KMOE_ENABLE_CUDA=OFF and KMOE_ENABLE_NCCL=OFF) or this process sees
  ///                    no CUDA device.
  explicit MpiCommunicator(MPI_Comm comm, bool owned = false, BufferMemory memory = BufferMemory::host);
  ~MpiCommunicator() override;

  /// MPI_COMM_WORLD with data buffers in `memory`. Throws kmoe::UsageError when MPI is not initialised.
  static std::unique_ptr<MpiCommunicator> world(BufferMemory memory = BufferMemory::host);

  /// The wrapped MPI communicator (for code that calls MPI itself).
  MPI_Comm native() const { return comm_; }
  /// Where the data buffers live. Not collective.
  BufferMemory memory() const { return memory_; }
  /// How device buffers travel: "cuda-aware" (device pointers handed to MPI), "host-staged" (pinned host copies) or
  /// "none" (BufferMemory::host). Not collective.
  const char* device_transport() const;
  /// Stages device buffers through pinned host memory even when MPI is CUDA-aware (to compare the two paths, or to
  /// step around a CUDA-aware MPI that misbehaves); `false` goes back to the default choice. Only for
  /// BufferMemory::device (kmoe::UsageError otherwise). Not collective, but every rank should make the same choice.
  void set_host_staging(bool staged);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }
  bool uses_device_memory() const override { return memory_ == BufferMemory::device; }
  void barrier() override;
  void alltoall_counts(const std::int64_t* send, std::int64_t* recv, int per_peer) override;
  /// MPI_Alltoallv with a datatype of one row (int counts are rows). Blocks.
  void alltoallv(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets, void* recv,
                 const std::int64_t* recv_counts, const std::int64_t* recv_offsets, std::int64_t row_elems,
                 DataType type) override;
  /// MPI_Irecv/MPI_Isend per non-empty block (MPI's non-overtaking order matches the n-th blocks of a pair), then
  /// MPI_Waitall. Self blocks go through MPI too. Each block's row count must fit in int. Blocks.
  void alltoallv_blocks(const void* send, const RowBlock* sends, std::size_t num_sends, void* recv,
                        const RowBlock* recvs, std::size_t num_recvs, std::int64_t row_elems,
                        DataType type) override;
  void allreduce_sum(void* data, std::int64_t count, DataType type) override;
  void allreduce_sum_host(double* data, std::int64_t count) override;
  void broadcast(void* data, std::int64_t bytes, int root) override;
  /// Nothing to wait for: every call has finished when it returns (in both memory modes).
  void synchronize() override {}
  /// Keeps the memory mode (and a forced host staging).
  std::unique_ptr<Communicator> split(int color, int key) override;
  /// The concrete type of split(), for callers that need MPI_Comm (e.g. to bootstrap NCCL on a sub-group).
  std::unique_ptr<MpiCommunicator> split_mpi(int color, int key);
  [[noreturn]] void abort(int code, const std::string& message) override;

 private:
  bool staged() const { return memory_ == BufferMemory::device && (force_staging_ || !cuda_aware_); }
  // The host halves of the calls above, on buffers MPI can read (host memory, or device memory when CUDA-aware).
  void alltoallv_on(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets, void* recv,
                    const std::int64_t* recv_counts, const std::int64_t* recv_offsets, std::int64_t row_elems,
                    DataType type);
  void alltoallv_blocks_on(const void* send, const RowBlock* sends, std::size_t num_sends, void* recv,
                           const RowBlock* recvs, std::size_t num_recvs, std::int64_t row_elems, DataType type);
  void allreduce_sum_on(void* data, std::int64_t count, DataType type);
  // BufferMemory::device: waits for all work queued on the device (cudaDeviceSynchronize). Host: nothing.
  void wait_for_device() const;
  // The pinned staging buffer `which` (0: send/in-place, 1: receive), at least `bytes` long.
  void* staging(int which, std::size_t bytes);

  MPI_Comm comm_;
  // A private duplicate on which abort() lets failing ranks meet, so its barrier can never match a collective that
  // healthy ranks are running on comm_.
  MPI_Comm failure_comm_ = MPI_COMM_NULL;
  bool owned_;
  int rank_ = 0, size_ = 1;
  BufferMemory memory_ = BufferMemory::host;
  bool cuda_aware_ = false;     // the MPI library takes device pointers (checked at construction)
  bool force_staging_ = false;  // set_host_staging(true)
  void* stage_[2] = {nullptr, nullptr};  // pinned host memory (cudaMallocHost)
  std::size_t stage_bytes_[2] = {0, 0};
};

}  // namespace kmoe::comm
