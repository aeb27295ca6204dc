#include <kmoe/comm/mpi_communicator.hpp>

#if KMOE_MPI_DEVICE_BUFFERS
#include <kmoe/core/cuda/check.hpp>  // KMOE_CUDA_CHECK

#include <cuda_runtime_api.h>
#endif
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // Open MPI: MPIX_CUDA_AWARE_SUPPORT, MPIX_Query_cuda_support
#endif

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <thread>
#include <utility>
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

#if KMOE_MPI_DEVICE_BUFFERS
// Rows [begin, end) of a buffer.
using RowRange = std::pair<std::int64_t, std::int64_t>;

// The rows that the non-empty blocks cover, as sorted disjoint ranges (touching and overlapping blocks merged), so
// that staging copies each covered row once, in as few copies as the layout allows, and never touches other rows.
std::vector<RowRange> covered_rows(const RowBlock* blocks, std::size_t count) {
  std::vector<RowRange> r;
  r.reserve(count);
  for (std::size_t i = 0; i < count; ++i)
    if (blocks[i].rows > 0) r.emplace_back(blocks[i].offset, blocks[i].offset + blocks[i].rows);
  std::sort(r.begin(), r.end());
  std::vector<RowRange> merged;
  for (const auto& x : r) {
    if (!merged.empty() && x.first <= merged.back().second) merged.back().second = std::max(merged.back().second, x.second);
    else merged.push_back(x);
  }
  return merged;
}

// The blocks of alltoallv's counts and offsets (one per peer).
std::vector<RowBlock> blocks_of(const std::int64_t* counts, const std::int64_t* offsets, int size) {
  std::vector<RowBlock> b(static_cast<std::size_t>(size));
  for (int p = 0; p < size; ++p) b[p] = RowBlock{p, offsets[p], counts[p]};
  return b;
}

// Copies the rows of `ranges` between a device buffer and its host stage, where stage row 0 is buffer row `first`.
void copy_rows(char* dst, const char* src, const std::vector<RowRange>& ranges, std::int64_t first,
               std::size_t row_bytes, bool to_host) {
  for (const auto& [b, e] : ranges) {
    const std::size_t bytes = static_cast<std::size_t>(e - b) * row_bytes;
    const std::size_t dev = static_cast<std::size_t>(b) * row_bytes, host = static_cast<std::size_t>(b - first) * row_bytes;
    if (to_host) KMOE_CUDA_CHECK(cudaMemcpy(dst + host, src + dev, bytes, cudaMemcpyDeviceToHost));
    else KMOE_CUDA_CHECK(cudaMemcpy(dst + dev, src + host, bytes, cudaMemcpyHostToDevice));
  }
}
#endif
}  // namespace
}  // namespace detail

MpiCommunicator::MpiCommunicator(MPI_Comm comm, bool owned, BufferMemory memory)
    : comm_(comm), owned_(owned), memory_(memory) {
  if (memory_ == BufferMemory::device) {
#if KMOE_MPI_DEVICE_BUFFERS
    int devices = 0;
    const cudaError_t rc = cudaGetDeviceCount(&devices);
    cudaGetLastError();  // clear a "no device" error: it is reported below
    KMOE_CHECK_USAGE(rc == cudaSuccess && devices > 0, "kmoe::comm::MpiCommunicator: BufferMemory::device needs a "
                     "CUDA device, but this process sees none (", cudaGetErrorString(rc), ")");
#if defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
    cuda_aware_ = MPIX_Query_cuda_support() == 1;  // built with CUDA support, and enabled in this run
#endif
#else
    throw UsageError("kmoe::comm::MpiCommunicator: BufferMemory::device needs the CUDA runtime, but this kmoe was "
                     "built without it (configure with KMOE_ENABLE_CUDA=ON or KMOE_ENABLE_NCCL=ON)");
#endif
  }
  KMOE_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  KMOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  KMOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  KMOE_MPI_CHECK(MPI_Comm_dup(comm_, &failure_comm_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
#if KMOE_MPI_DEVICE_BUFFERS
  for (void* p : stage_)
    if (p) cudaFreeHost(p);  // destructors must not throw: an error here is ignored
#endif
  if (finalized) return;
  if (failure_comm_ != MPI_COMM_NULL) MPI_Comm_free(&failure_comm_);
  if (owned_ && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::world(BufferMemory memory) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  KMOE_CHECK_USAGE(initialized, "kmoe::comm::MpiCommunicator::world: MPI is not initialised (call MPI_Init first)");
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false, memory);
}

const char* MpiCommunicator::device_transport() const {
  if (memory_ == BufferMemory::host) return "none";
  return staged() ? "host-staged" : "cuda-aware";
}

void MpiCommunicator::set_host_staging(bool staged) {
  KMOE_CHECK_USAGE(memory_ == BufferMemory::device, "kmoe::comm::MpiCommunicator::set_host_staging: this "
                   "communicator takes host buffers (BufferMemory::host); staging applies to device buffers only");
  force_staging_ = staged;
}

void MpiCommunicator::wait_for_device() const {
#if KMOE_MPI_DEVICE_BUFFERS
  // Kernels on any stream may still be writing the buffers MPI is about to read.
  if (memory_ == BufferMemory::device) KMOE_CUDA_CHECK(cudaDeviceSynchronize());
#endif
}

void* MpiCommunicator::staging(int which, std::size_t bytes) {
#if KMOE_MPI_DEVICE_BUFFERS
  if (bytes > stage_bytes_[which]) {
    // Grow geometrically, so that a slowly growing batch does not reallocate pinned memory every step.
    const std::size_t want = std::max(bytes, stage_bytes_[which] + stage_bytes_[which] / 2);
    if (stage_[which]) KMOE_CUDA_CHECK(cudaFreeHost(stage_[which]));
    stage_[which] = nullptr;
    stage_bytes_[which] = 0;
    KMOE_CUDA_CHECK(cudaMallocHost(&stage_[which], want));
    stage_bytes_[which] = want;
  }
  return stage_[which];
#else
  (void)which;
  (void)bytes;
  KMOE_ASSERT(false, "host staging without the CUDA runtime");
#endif
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
  KMOE_CHECK_USAGE(row_elems > 0, "kmoe::comm::MpiCommunicator::alltoallv: row_elems = ", row_elems, " is negative");
  wait_for_device();
  if (!staged()) return alltoallv_on(send, send_counts, send_offsets, recv, recv_counts, recv_offsets, row_elems, type);
#if KMOE_MPI_DEVICE_BUFFERS
  // Stage the covered rows; on the host, row r of a buffer sits at stage row r - first.
  const std::size_t row_bytes = static_cast<std::size_t>(row_elems) * size_of(type);
  const auto sb = detail::blocks_of(send_counts, send_offsets, size_), rb = detail::blocks_of(recv_counts, recv_offsets, size_);
  detail::check_row_blocks("kmoe::comm::MpiCommunicator::alltoallv", "send counts/offsets", sb.data(), sb.size(), size_);
  detail::check_row_blocks("kmoe::comm::MpiCommunicator::alltoallv", "receive counts/offsets", rb.data(), rb.size(), size_);
  const auto sr = detail::covered_rows(sb.data(), sb.size()), rr = detail::covered_rows(rb.data(), rb.size());
  const std::int64_t s0 = sr.empty() ? 0 : sr.front().first, s1 = sr.empty() ? 0 : sr.back().second;
  const std::int64_t r0 = rr.empty() ? 0 : rr.front().first, r1 = rr.empty() ? 0 : rr.back().second;
  auto* hs = static_cast<char*>(staging(0, static_cast<std::size_t>(s1 - s0) * row_bytes));
  auto* hr = static_cast<char*>(staging(1, static_cast<std::size_t>(r1 - r0) * row_bytes));
  detail::copy_rows(hs, static_cast<const char*>(send), sr, s0, row_bytes, true);
  std::vector<std::int64_t> so(size_), ro(size_);
  for (int p = 0; p < size_; ++p) {
    so[p] = send_counts[p] > 0 ? send_offsets[p] - s0 : 0;
    ro[p] = recv_counts[p] > 0 ? recv_offsets[p] - r0 : 0;
  }
  alltoallv_on(hs, send_counts, so.data(), hr, recv_counts, ro.data(), row_elems, type);
  detail::copy_rows(static_cast<char*>(recv), hr, rr, r0, row_bytes, false);
#endif
}

void MpiCommunicator::alltoallv_on(const void* send, const std::int64_t* send_counts, const std::int64_t* send_offsets,
                                   void* recv, const std::int64_t* recv_counts, const std::int64_t* recv_offsets,
                                   std::int64_t row_elems, DataType type) {
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

void MpiCommunicator::alltoallv_blocks(const void* send, const RowBlock* sends, std::size_t num_sends, void* recv,
                                       const RowBlock* recvs, std::size_t num_recvs, std::int64_t row_elems,
                                       DataType type) {
  constexpr const char* fn = "kmoe::comm::MpiCommunicator::alltoallv_blocks";
  detail::check_row_blocks(fn, "sends", sends, num_sends, size_);
  detail::check_row_blocks(fn, "recvs", recvs, num_recvs, size_);
  KMOE_CHECK_USAGE(row_elems >= 0, fn, ": row_elems = ", row_elems, " is negative");
  if (row_elems == 0) return;  // the width is the same on every rank: nobody sends anything
  // Counts are rows of a row datatype, in int: check every block before anything is posted.
  for (std::size_t i = 0; i < num_sends; ++i)
    KMOE_CHECK_USAGE(sends[i].rows <= INT_MAX, fn, ": sends[", i, "].rows = ", sends[i].rows,
                     " does not fit MPI's int counts (split the block)");
  for (std::size_t j = 0; j < num_recvs; ++j)
    KMOE_CHECK_USAGE(recvs[j].rows <= INT_MAX, fn, ": recvs[", j, "].rows = ", recvs[j].rows,
                     " does not fit MPI's int counts (split the block)");
  wait_for_device();
  if (!staged()) return alltoallv_blocks_on(send, sends, num_sends, recv, recvs, num_recvs, row_elems, type);
#if KMOE_MPI_DEVICE_BUFFERS
  const std::size_t row_bytes = static_cast<std::size_t>(row_elems) * size_of(type);
  const auto sr = detail::covered_rows(sends, num_sends), rr = detail::covered_rows(recvs, num_recvs);
  const std::int64_t s0 = sr.empty() ? 0 : sr.front().first, s1 = sr.empty() ? 0 : sr.back().second;
  const std::int64_t r0 = rr.empty() ? 0 : rr.front().first, r1 = rr.empty() ? 0 : rr.back().second;
  auto* hs = static_cast<char*>(staging(0, static_cast<std::size_t>(s1 - s0) * row_bytes));
  auto* hr = static_cast<char*>(staging(1, static_cast<std::size_t>(r1 - r0) * row_bytes));
  detail::copy_rows(hs, static_cast<const char*>(send), sr, s0, row_bytes, true);
  std::vector<RowBlock> sb(sends, sends + num_sends), rb(recvs, recvs + num_recvs);
  for (auto& b : sb) b.offset = b.rows > 0 ? b.offset - s0 : 0;
  for (auto& b : rb) b.offset = b.rows > 0 ? b.offset - r0 : 0;
  alltoallv_blocks_on(hs, sb.data(), sb.size(), hr, rb.data(), rb.size(), row_elems, type);
  detail::copy_rows(static_cast<char*>(recv), hr, rr, r0, row_bytes, false);
#endif
}

void MpiCommunicator::alltoallv_blocks_on(const void* send, const RowBlock* sends, std::size_t num_sends, void* recv,
                                          const RowBlock* recvs, std::size_t num_recvs, std::int64_t row_elems,
                                          DataType type) {
  // One tag for every block: MPI matches the messages of one (sender, receiver, tag) in the order they were posted,
  // which is the matching alltoallv_blocks promises. Collectives never match point-to-point messages.
  constexpr int tag = 0x6b6d;
  const std::size_t row_bytes = static_cast<std::size_t>(row_elems) * size_of(type);
  const detail::RowType row(row_elems, type);
  std::vector<MPI_Request> requests;
  requests.reserve(num_sends + num_recvs);
  // Post every receive first, so that no send waits for its receive to be posted.
  std::size_t posted_recvs = 0;
  for (std::size_t j = 0; j < num_recvs; ++j) {
    const RowBlock& b = recvs[j];
    if (b.rows == 0) continue;
    requests.push_back(MPI_REQUEST_NULL);
    KMOE_MPI_CHECK(MPI_Irecv(static_cast<char*>(recv) + static_cast<std::size_t>(b.offset) * row_bytes,
                             detail::to_int(b.rows, "alltoallv_blocks: rows of one receive block"), row.get(), b.peer,
                             tag, comm_, &requests.back()));
    ++posted_recvs;
  }
  for (std::size_t i = 0; i < num_sends; ++i) {
    const RowBlock& b = sends[i];
    if (b.rows == 0) continue;
    requests.push_back(MPI_REQUEST_NULL);
    KMOE_MPI_CHECK(MPI_Isend(static_cast<const char*>(send) + static_cast<std::size_t>(b.offset) * row_bytes,
                             detail::to_int(b.rows, "alltoallv_blocks: rows of one send block"), row.get(), b.peer,
                             tag, comm_, &requests.back()));
  }
  std::vector<MPI_Status> statuses(requests.size());
  const int rc = MPI_Waitall(static_cast<int>(requests.size()), requests.data(), statuses.data());
  if (rc == MPI_ERR_IN_STATUS) {
    // Name the first failed block: a truncated receive means that a sender's block is longer than the receiver's.
    for (std::size_t i = 0; i < statuses.size(); ++i) {
      const int err = statuses[i].MPI_ERROR;
      if (err == MPI_SUCCESS || err == MPI_ERR_PENDING) continue;
      char text[MPI_MAX_ERROR_STRING] = {0};
      int len = 0;
      MPI_Error_string(err, text, &len);
      throw InternalError(kmoe::detail::concat("kmoe::comm::MpiCommunicator::alltoallv_blocks: the ",
                                               i < posted_recvs ? "receive" : "send", " of a non-empty block failed: ",
                                               text, " (do senders and receivers list blocks of the same row counts?)"));
    }
  }
  KMOE_MPI_CHECK(rc);
}

void MpiCommunicator::allreduce_sum(void* data, std::int64_t count, DataType type) {
  KMOE_CHECK_USAGE(type != DataType::bf16,
                   "kmoe::comm::MpiCommunicator::allreduce_sum: MPI cannot sum bf16; reduce gradients in f32 or f64");
  if (count <= 0) return;
  wait_for_device();
  if (!staged()) return allreduce_sum_on(data, count, type);
#if KMOE_MPI_DEVICE_BUFFERS
  const std::size_t bytes = static_cast<std::size_t>(count) * size_of(type);
  void* host = staging(0, bytes);
  KMOE_CUDA_CHECK(cudaMemcpy(host, data, bytes, cudaMemcpyDeviceToHost));
  allreduce_sum_on(host, count, type);
  KMOE_CUDA_CHECK(cudaMemcpy(data, host, bytes, cudaMemcpyHostToDevice));
#endif
}

void MpiCommunicator::allreduce_sum_on(void* data, std::int64_t count, DataType type) {
  // Large buffers go in int-sized pieces.
  const std::int64_t chunk = INT_MAX / 2;
  auto* bytes = static_cast<char*>(data);
  for (std::int64_t off = 0; off < count; off += chunk) {
    const int n = static_cast<int>(std::min(chunk, count - off));
    KMOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, bytes + off * size_of(type), n, detail::mpi_type(type), MPI_SUM, comm_));
  }
}

void MpiCommunicator::allreduce_sum_host(double* data, std::int64_t count) {
  if (count > 0) allreduce_sum_on(data, count, DataType::f64);
}

void MpiCommunicator::broadcast(void* data, std::int64_t bytes, int root) {
  const int n = detail::to_int(bytes, "broadcast bytes");
  wait_for_device();
  if (!staged()) {
    KMOE_MPI_CHECK(MPI_Bcast(data, n, MPI_BYTE, root, comm_));
    return;
  }
#if KMOE_MPI_DEVICE_BUFFERS
  if (n == 0) return;
  void* host = staging(0, static_cast<std::size_t>(n));
  if (rank_ == root) KMOE_CUDA_CHECK(cudaMemcpy(host, data, static_cast<std::size_t>(n), cudaMemcpyDeviceToHost));
  KMOE_MPI_CHECK(MPI_Bcast(host, n, MPI_BYTE, root, comm_));
  if (rank_ != root) KMOE_CUDA_CHECK(cudaMemcpy(data, host, static_cast<std::size_t>(n), cudaMemcpyHostToDevice));
#endif
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split_mpi(int color, int key) {
  MPI_Comm sub = MPI_COMM_NULL;
  KMOE_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  auto out = std::make_unique<MpiCommunicator>(sub, true, memory_);
  out->force_staging_ = force_staging_;
  return out;
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
