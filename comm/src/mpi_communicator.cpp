#include <kmoe/comm/mpi_communicator.hpp>

#include <chrono>
#include <climits>
#include <cstdio>
#include <thread>
#include <vector>

namespace kmoe::comm {
namespace detail {

void throw_mpi_error(int code, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) std::snprintf(text, sizeof text, "MPI error code %d", code);
  throw InternalError(kmoe::detail::concat("MPI call failed at ", file, ":", line, ": ", call, ": ", text));
}

MPI_Datatype mpi_type(DataType type) {
  switch (type) {
    case DataType::f32: return MPI_FLOAT;
    case DataType::f64: return MPI_DOUBLE;
    case DataType::bf16: return MPI_UINT16_T;  // moved as bits; MPI has no bf16 arithmetic
    case DataType::i32: return MPI_INT32_T;
    case DataType::i64: return MPI_INT64_T;
  }
  KMOE_ASSERT(false, "unknown DataType ", static_cast<int>(type));
}

namespace {
// MPI-3 counts and displacements are int: convert, naming what overflowed.
int to_int(std::int64_t v, const char* what) {
  KMOE_CHECK_USAGE(v >= 0 && v <= INT_MAX, "kmoe::comm::MpiCommunicator: ", what, " = ", v,
                   " does not fit MPI's int counts (split the batch)");
  return static_cast<int>(v);
}

// A datatype of one row (row_elems elements), so that alltoallv counts rows rather than elements: a batch of rows
// with more than 2^31 elements still has int-sized counts.
class RowType {
 public:
  RowType(std::int64_t row_elems, DataType type) {
    KMOE_MPI_CHECK(MPI_Type_contiguous(to_int(row_elems, "row width"), mpi_type(type), &type_));
    KMOE_MPI_CHECK(MPI_Type_commit(&type_));
  }
  ~RowType() { MPI_Type_free(&type_); }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};
}  // namespace
}  // namespace detail

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
  KMOE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  KMOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  KMOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  KMOE_MPI_CHECK(MPI_Comm_dup(comm_, &failure_comm_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (failure_comm_ != MPI_COMM_NULL) MPI_Comm_free(&failure_comm_);
  if (owned_ && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::world() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  KMOE_CHECK_USAGE(initialized, "kmoe::comm::MpiCommunicator::world: MPI is not initialised (call MPI_Init first)");
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false);
}

void MpiCommunicator::barrier() { KMOE_MPI_CHECK(MPI_Barrier(comm_)); }

void MpiCommunicator::alltoall_counts(const std::int64_t* send, std::int64_t* recv, int per_peer) {
  KMOE_ASSERT(per_peer >= 1);
  KMOE_MPI_CHECK(MPI_Alltoall(send, per_peer, MPI_INT64_T, recv, per_peer, MPI_INT64_T, comm_));
}

void MpiCommunicator::alltoallv(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets,
                                void* recv, const std::int64_t* recv_counts, const std::int64_t* recv_offsets,
                                std::int64_t row_elems, DataType type) {
  if (row_elems == 0) return;  // the width is the same on every rank: nobody sends anything
  std::vector<int> sc(size_), so(size_), rc(size_), ro(size_);
  for (int p = 0; p < size_; ++p) {
    sc[p] = detail::to_int(send_counts[p], "send count");
    so[p] = detail::to_int(send_offsets[p], "send offset");
    rc[p] = detail::to_int(recv_counts[p], "receive count");
    ro[p] = detail::to_int(recv_offsets[p], "receive offset");
  }
  const detail::RowType row(row_elems, type);
  KMOE_MPI_CHECK(MPI_Alltoallv(send, sc.data(), so.data(), row.get(), recv, rc.data(), ro.data(), row.get(), comm_));
}

void MpiCommunicator::allreduce_sum(void* data, std::int64_t count, DataType type) {
  KMOE_CHECK_USAGE(type != DataType::bf16,
                   "kmoe::comm::MpiCommunicator::allreduce_sum: MPI cannot sum bf16; reduce gradients in f32 or f64");
  // Large buffers go in int-sized pieces.
  const std::int64_t chunk = INT_MAX / 2;
  auto* bytes = static_cast<char*>(data);
  for (std::int64_t off = 0; off < count; off += chunk) {
    const int n = static_cast<int>(std::min(chunk, count - off));
    KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, bytes + off * size_of(type), n, detail::mpi_type(type), MPI_SUM, comm_));
  }
}

void MpiCommunicator::allreduce_sum_host(double* data, std::int64_t count) {
  allreduce_sum(data, count, DataType::f64);
}

void MpiCommunicator::broadcast(void* data, std::int64_t bytes, int root) {
  KMOE_MPI_CHECK(MPI_Bcast(data, detail::to_int(bytes, "broadcast bytes"), MPI_BYTE, root, comm_));
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split_mpi(int color, int key) {
  MPI_Comm sub = MPI_COMM_NULL;
  KMOE_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  return std::make_unique<MpiCommunicator>(sub, true);
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) { return split_mpi(color, key); }

void MpiCommunicator::abort(int code, const std::string& message) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  // Often every rank fails the same check (a bad layout, a bad file): give the others a moment to report their own
  // message before MPI_Abort kills them. A non-blocking barrier bounds the wait, so a lone failing rank still takes
  // the job down promptly while its peers sit in some other collective.
  MPI_Request all_failed = MPI_REQUEST_NULL;
  if (failure_comm_ != MPI_COMM_NULL && MPI_Ibarrier(failure_comm_, &all_failed) == MPI_SUCCESS) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    int done = 0;
    while (!done && std::chrono::steady_clock::now() < deadline) {
      if (MPI_Test(&all_failed, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; this is for a broken MPI that does
}

}  // namespace kmoe::comm
