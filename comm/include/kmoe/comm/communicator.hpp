/// \file communicator.hpp
/// \brief The communicator interface behind which kmoe's MPI (CPU ranks, bootstrap) and NCCL (GPU collectives)
/// backends sit, plus the rule for failing ranks (run_or_abort).
///
/// Buffers passed to the data-moving calls live in the backend's memory: host memory for MpiCommunicator (or device
/// memory for one made with BufferMemory::device), device memory for NcclCommunicator (enqueued on its stream; call
/// synchronize() before reading results on the host). Counts, offsets, block lists and the *_host calls always take
/// host memory: they are small, and the NCCL backend routes them through its MPI bootstrap communicator.
#pragma once

#include <kmoe/config.hpp>
#include <kmoe/core/bf16.hpp>
#include <kmoe/core/error.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>

namespace kmoe::comm {

/// Element types the communicators move and reduce.
enum class DataType { f32, f64, bf16, i32, i64 };

/// Size in bytes of one element of `type`.
std::size_t size_of(DataType type);
/// "f32", "f64", ... (for messages).
const char* name_of(DataType type);

/// The DataType of a C++ element type (float, double, kmoe::bf16, int32_t, int64_t).
template <class T>
struct data_type_of;
template <>
struct data_type_of<float> { static constexpr DataType value = DataType::f32; };
template <>
struct data_type_of<double> { static constexpr DataType value = DataType::f64; };
template <>
struct data_type_of<kmoe::bf16> { static constexpr DataType value = DataType::bf16; };
template <>
struct data_type_of<std::int32_t> { static constexpr DataType value = DataType::i32; };
template <>
struct data_type_of<std::int64_t> { static constexpr DataType value = DataType::i64; };
template <class T>
inline constexpr DataType data_type_v = data_type_of<std::remove_cv_t<T>>::value;

/// Where the data buffers of a communicator live (the MPI backend can take either; NCCL always takes device memory).
enum class BufferMemory { host, device };

/// One contiguous run of rows exchanged with one peer: rows [offset, offset + rows) of a buffer.
struct RowBlock {
  int peer = 0;
  std::int64_t offset = 0;
  std::int64_t rows = 0;
};

namespace detail {
/// Checks a block list at the boundary of alltoallv_blocks: `blocks` is not null when `count` > 0, every peer is in
/// [0, size), offsets and rows are >= 0. Throws kmoe::UsageError naming `function`, `which` ("sends"/"recvs"), the
/// index and the value.
void check_row_blocks(const char* function, const char* which, const RowBlock* blocks, std::size_t count, int size);
}  // namespace detail

/// A group of ranks that exchange data. Every call is collective over the group unless it says otherwise, and every
/// vendor call inside is checked (a failure throws kmoe::InternalError naming the call, the library's error string
/// and file:line).
class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  /// This rank's index in the group, 0 <= rank() < size(). Not collective.
  virtual int rank() const = 0;
  /// The number of ranks in the group. Not collective.
  virtual int size() const = 0;
  /// "mpi" or "nccl". Not collective.
  virtual const char* backend() const = 0;
  /// True when the data buffers of alltoallv/alltoallv_blocks/allreduce_sum/broadcast are device pointers. Not
  /// collective.
  virtual bool uses_device_memory() const = 0;

  /// Blocks until every rank has entered.
  virtual void barrier() = 0;

  /// Exchanges `per_peer` counts with every peer: send[p*per_peer + j] goes to rank p and arrives there as
  /// recv[rank()*per_peer + j]. Host memory on every backend. Blocks.
  /// \param send     [in]  size() * per_peer counts
  /// \param recv     [out] size() * per_peer counts
  /// \param per_peer [in]  counts per peer (>= 1)
  virtual void alltoall_counts(const std::int64_t* send, std::int64_t* recv, int per_peer) = 0;

  /// Variable all-to-all of rows of `row_elems` elements of `type`: rows [send_offsets[p], +send_counts[p]) of `send`
  /// go to rank p, where they land at rows [recv_offsets[q], +recv_counts[q]) of `recv` for the sender q.
  /// The counts must match what the peers send (exchange them first with alltoall_counts).
  /// MPI: blocks. NCCL: enqueued on the stream (grouped ncclSend/ncclRecv), returns without waiting.
  /// \param send, recv [in], [out] buffers in backend memory; must not overlap
  /// \param send_counts, send_offsets, recv_counts, recv_offsets [in] size() row counts/offsets each, host memory
  virtual void alltoallv(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets,
                         void* recv, const std::int64_t* recv_counts, const std::int64_t* recv_offsets,
                         std::int64_t row_elems, DataType type) = 0;

  /// Block-wise all-to-all: for each sends[i], rows [offset, +rows) of `send` go to sends[i].peer; for each recvs[j],
  /// rows [offset, +rows) of `recv` are filled from recvs[j].peer. Between one sender and one receiver, the n-th
  /// non-empty block the sender lists for that peer lands in the n-th non-empty block the receiver lists for the
  /// sender (same row counts; empty blocks are skipped on both sides). peer may be this rank. Lets a caller receive
  /// rows straight into an expert-major layout (one block per (peer, expert)) with no unpack pass. Rows of `recv`
  /// outside every receive block are left untouched.
  /// Buffers in backend memory, must not overlap. MPI: blocks. NCCL: enqueued on the stream (one ncclGroup).
  /// \param send      [in]  rows of `row_elems` elements of `type`, in backend memory
  /// \param sends     [in]  num_sends blocks of `send`, host memory; several per peer allowed, in the order they match
  /// \param recv      [out] rows of `row_elems` elements of `type`, in backend memory
  /// \param recvs     [in]  num_recvs blocks of `recv`, host memory; must not overlap each other
  /// \param row_elems [in]  elements per row (>= 0; the same on every rank; 0 moves nothing)
  virtual void alltoallv_blocks(const void* send, const RowBlock* sends, std::size_t num_sends, void* recv,
                                const RowBlock* recvs, std::size_t num_recvs, std::int64_t row_elems,
                                DataType type) = 0;

  /// Sums `count` elements over all ranks, in place, in backend memory. MPI: blocks. NCCL: enqueued on the stream.
  virtual void allreduce_sum(void* data, std::int64_t count, DataType type) = 0;

  /// Sums `count` doubles over all ranks, in place, in host memory, on every backend. Blocks.
  virtual void allreduce_sum_host(double* data, std::int64_t count) = 0;

  /// Copies `bytes` bytes from rank `root` to every rank, in backend memory. MPI: blocks. NCCL: enqueued.
  virtual void broadcast(void* data, std::int64_t bytes, int root) = 0;

  /// Waits until the work this communicator enqueued has finished (NCCL: the stream; MPI: nothing to wait for).
  virtual void synchronize() = 0;

  /// A new communicator of the same backend over the ranks that pass the same `color`, ordered by `key`
  /// (then by rank()). Collective over this group.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  /// Prints `message` to stderr prefixed with this rank, then ends the whole job with exit status `code`
  /// (MPI_Abort on the world). Not collective: meant for one rank that failed while the others may be waiting.
  [[noreturn]] virtual void abort(int code, const std::string& message) = 0;
};

/// The exit code kmoe's command uses for an exception: 1 InputError, 2 UsageError, 3 anything else.
int exit_code_for(const std::exception& e);

/// Runs `body` on this rank. When it throws and the group has more than one rank, prints
/// "`program`: rank R/N: <what>" and ends the whole job (Communicator::abort with exit_code_for(e)), because the other
/// ranks may be waiting in a collective for this one and would hang. With one rank the exception propagates unchanged.
template <class Body>
auto run_or_abort(Communicator& comm, const std::string& program, Body&& body) -> decltype(body()) {
  if (comm.size() == 1) return body();
  try {
    return body();
  } catch (const std::exception& e) {
    comm.abort(exit_code_for(e), program + ": rank " + std::to_string(comm.rank()) + "/" +
                                     std::to_string(comm.size()) + ": " + e.what());
  }
  std::abort();  // not reached: abort() ends the job
}

}  // namespace kmoe::comm
