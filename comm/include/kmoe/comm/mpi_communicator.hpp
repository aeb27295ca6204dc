/// \file mpi_communicator.hpp
/// \brief The MPI backend of kmoe::comm::Communicator (CPU ranks, and the bootstrap of the NCCL backend), and the
/// checked-call macro for MPI.
#pragma once

#include <kmoe/comm/communicator.hpp>
#include <kmoe/config.hpp>

#if !KMOE_ENABLE_MPI
#error "kmoe was built without MPI (KMOE_ENABLE_MPI=OFF): <kmoe/comm/mpi_communicator.hpp> is not available"
#endif

#include <mpi.h>

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

/// A Communicator over an MPI communicator: host buffers, blocking collectives.
class MpiCommunicator final : public Communicator {
 public:
  /// Wraps `comm` (MPI must be initialised). With `owned` the communicator is freed on destruction;
  /// MPI_COMM_WORLD is never freed. Sets MPI_ERRORS_RETURN on `comm`.
  explicit MpiCommunicator(MPI_Comm comm, bool owned = false);
  ~MpiCommunicator() override;

  /// MPI_COMM_WORLD. Throws kmoe::UsageError when MPI is not initialised.
  static std::unique_ptr<MpiCommunicator> world();

  /// The wrapped MPI communicator (for code that calls MPI itself).
  MPI_Comm native() const { return comm_; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }
  bool uses_device_memory() const override { return false; }
  void barrier() override;
  void alltoall_counts(const std::int64_t* send, std::int64_t* recv, int per_peer) override;
  void alltoallv(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets, void* recv,
                 const std::int64_t* recv_counts, const std::int64_t* recv_offsets, std::int64_t row_elems,
                 DataType type) override;
  void allreduce_sum(void* data, std::int64_t count, DataType type) override;
  void allreduce_sum_host(double* data, std::int64_t count) override;
  void broadcast(void* data, std::int64_t bytes, int root) override;
  void synchronize() override {}
  std::unique_ptr<Communicator> split(int color, int key) override;
  /// The concrete type of split(), for callers that need MPI_Comm (e.g. to bootstrap NCCL on a sub-group).
  std::unique_ptr<MpiCommunicator> split_mpi(int color, int key);
  [[noreturn]] void abort(int code, const std::string& message) override;

 private:
  MPI_Comm comm_;
  // A private duplicate on which abort() lets failing ranks meet, so its barrier can never match a collective that
  // healthy ranks are running on comm_.
  MPI_Comm failure_comm_ = MPI_COMM_NULL;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace kmoe::comm
