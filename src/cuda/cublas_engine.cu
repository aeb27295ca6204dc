// The cuBLAS engine of the expert GEMMs: cublasGemmEx per expert (bf16 in, fp32 compute), measured ~5x faster than
// kmoe's grouped kernel on large experts (perf/RESULTS.md); it needs the group offsets on the host.
// Row-major C[M,N] = A·op(B) is computed as the column-major Cᵀ = op(B)ᵀ·Aᵀ, so no operand is copied.
#include "common.cuh"

#include <algorithm>

namespace kmoe::core::cuda::detail {

namespace {

/// One cuBLAS handle per host thread and device, created on first use (creation costs milliseconds).
cublasHandle_t handle_for(cudaStream_t stream) {
  static thread_local cublasHandle_t handles[16] = {};
  int dev = 0;
  KMOE_CUDA_CHECK(cudaGetDevice(&dev));
  KMOE_CHECK_INPUT(dev >= 0 && dev < 16, "kmoe::core::cuda: device ", dev, " beyond the 16 the cuBLAS engine caches");
  if (!handles[dev]) KMOE_CUBLAS_CHECK(cublasCreate(&handles[dev]));
  KMOE_CUBLAS_CHECK(cublasSetStream(handles[dev], stream));
  return handles[dev];
}

/// Side streams (non-blocking) with one cuBLAS handle each (a handle's workspace must not be shared between streams
/// running at the same time), per host thread and device, and the events that fork from and join to the caller's
/// stream. fork(): every side stream waits for the work enqueued so far; join(): the caller's stream waits for them.
class SideStreams {
 public:
  static SideStreams& get(int n) {
    static thread_local SideStreams per_device[16];
    int dev = 0;
    KMOE_CUDA_CHECK(cudaGetDevice(&dev));
    SideStreams& s = per_device[dev];
    s.init(n);
    return s;
  }
  cublasHandle_t handle(int i) const { return handles_[i]; }
  cudaStream_t stream(int i) const { return streams_[i]; }
  void fork(cudaStream_t main) {
    KMOE_CUDA_CHECK(cudaEventRecord(fork_, main));
    for (int i = 0; i < n_; ++i) KMOE_CUDA_CHECK(cudaStreamWaitEvent(streams_[i], fork_, 0));
  }
  void join(cudaStream_t main) {
    for (int i = 0; i < n_; ++i) {
      KMOE_CUDA_CHECK(cudaEventRecord(join_[i], streams_[i]));
      KMOE_CUDA_CHECK(cudaStreamWaitEvent(main, join_[i], 0));
    }
  }

 private:
  /// Creates side streams up to n (1..8); existing ones are kept.
  void init(int n) {
    if (n <= n_) return;
    KMOE_ASSERT(n <= 8, "at most 8 side streams");
    if (!fork_) KMOE_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    for (int i = n_; i < n; ++i) {
      KMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&streams_[i], cudaStreamNonBlocking));
      KMOE_CUDA_CHECK(cudaEventCreateWithFlags(&join_[i], cudaEventDisableTiming));
      KMOE_CUBLAS_CHECK(cublasCreate(&handles_[i]));
      KMOE_CUBLAS_CHECK(cublasSetStream(handles_[i], streams_[i]));
    }
    n_ = n;
  }
  int n_ = 0;
  cudaEvent_t fork_ = nullptr;
  cudaStream_t streams_[8] = {};
  cudaEvent_t join_[8] = {};
  cublasHandle_t handles_[8] = {};
};

/// Where group g's GEMMs go: the caller's stream and handle, or side stream g % n (between fork and join).
struct GroupStreams {
  GroupStreams(cudaStream_t main, int n) : main_(main) {
    if (n > 1) {
      side_ = &SideStreams::get(n);
      n_ = n;
      side_->fork(main);
    } else {
      h_ = handle_for(main);
    }
  }
  /// The caller's stream waits for the side streams (call once, after the last GEMM).
  void join() const {
    if (side_) side_->join(main_);
  }
  cublasHandle_t handle(int g) const { return side_ ? side_->handle(g % n_) : h_; }
  cudaStream_t stream(int g) const { return side_ ? side_->stream(g % n_) : main_; }

 private:
  cudaStream_t main_;
  int n_ = 1;
  SideStreams* side_ = nullptr;
  cublasHandle_t h_ = nullptr;
};

/// Device copies of the A/B/C pointer arrays of grouped calls (cuBLAS reads them on the device): a ring of pinned
/// host + device slots per host thread and device; a slot is reused only after the event of its last use completed.
class PointerRing {
 public:
  static constexpr int kSlots = 32;
  static constexpr int kMaxGemms = 1024;  ///< per call (2 per expert, E <= 256 in the router); more: per-GEMM calls
  static PointerRing& get() {
    static thread_local PointerRing per_device[16];
    int dev = 0;
    KMOE_CUDA_CHECK(cudaGetDevice(&dev));
    return per_device[dev];
  }
  /// Copies 3*count pointers to a device slot on `stream`; returns the device array.
  const void** upload(const std::vector<const void*>& ptrs, cudaStream_t stream) {
    if (!host_) {
      KMOE_CUDA_CHECK(cudaMallocHost(&host_, sizeof(void*) * 3 * kMaxGemms * kSlots));
      KMOE_CUDA_CHECK(cudaMalloc(&dev_, sizeof(void*) * 3 * kMaxGemms * kSlots));
      for (auto& e : events_) KMOE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    const int slot = next_++ % kSlots;
    if (used_[slot]) KMOE_CUDA_CHECK(cudaEventSynchronize(events_[slot]));
    const void** h = host_ + std::size_t(slot) * 3 * kMaxGemms;
    const void** d = dev_ + std::size_t(slot) * 3 * kMaxGemms;
    std::copy(ptrs.begin(), ptrs.end(), h);
    KMOE_CUDA_CHECK(cudaMemcpyAsync(d, h, sizeof(void*) * ptrs.size(), cudaMemcpyHostToDevice, stream));
    slot_ = slot;
    return d;
  }
  /// Marks the slot of the last upload as in use until the work enqueued on `stream` so far completes.
  void release(cudaStream_t stream) {
    KMOE_CUDA_CHECK(cudaEventRecord(events_[slot_], stream));
    used_[slot_] = true;
  }

 private:
  const void** host_ = nullptr;
  const void** dev_ = nullptr;
  cudaEvent_t events_[kSlots] = {};
  bool used_[kSlots] = {};
  int next_ = 0, slot_ = 0;
};

/// Column-major GEMMs collected for one cublasGemmGroupedBatchedEx (bf16 A/B, fp32 compute, one C type).
class GemmBatch {
 public:
  void add(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void* A, int lda, const void* B,
           int ldb, float beta, void* C, int ldc) {
    ta_.push_back(ta), tb_.push_back(tb), m_.push_back(m), n_.push_back(n), k_.push_back(k);
    lda_.push_back(lda), ldb_.push_back(ldb), ldc_.push_back(ldc), alpha_.push_back(1.f), beta_.push_back(beta);
    a_.push_back(A), b_.push_back(B), c_.push_back(C);
  }
  void launch(cublasHandle_t h, cudaStream_t stream, cudaDataType_t ctype) {
    const int count = static_cast<int>(m_.size());
    if (count == 0) return;
    const std::vector<int> ones(count, 1);
    // cuBLAS' grouped GEMM takes bf16 A/B only with a bf16 C (run 19: CUBLAS_STATUS_NOT_SUPPORTED for an fp32 C, the
    // weight gradients); those, and calls with more GEMMs than a slot holds, go one GEMM per call.
    if (ctype != CUDA_R_16BF || count > PointerRing::kMaxGemms) {
      for (int i = 0; i < count; ++i)
        KMOE_CUBLAS_CHECK(cublasGemmEx(h, ta_[i], tb_[i], m_[i], n_[i], k_[i], &alpha_[i], a_[i], CUDA_R_16BF, lda_[i],
                                       b_[i], CUDA_R_16BF, ldb_[i], &beta_[i], c_[i], ctype, ldc_[i],
                                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return;
    }
    std::vector<const void*> ptrs(a_);
    ptrs.insert(ptrs.end(), b_.begin(), b_.end());
    ptrs.insert(ptrs.end(), c_.begin(), c_.end());
    PointerRing& ring = PointerRing::get();
    const void** d = ring.upload(ptrs, stream);
    KMOE_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        h, ta_.data(), tb_.data(), m_.data(), n_.data(), k_.data(), alpha_.data(), d, CUDA_R_16BF, lda_.data(),
        d + count, CUDA_R_16BF, ldb_.data(), beta_.data(), const_cast<void* const*>(d + 2 * count), ctype,
        ldc_.data(), count, ones.data(), CUBLAS_COMPUTE_32F));
    ring.release(stream);
  }

 private:
  std::vector<cublasOperation_t> ta_, tb_;
  std::vector<int> m_, n_, k_, lda_, ldb_, ldc_;
  std::vector<float> alpha_, beta_;
  std::vector<const void*> a_, b_;
  std::vector<void*> c_;
};

/// Row-major C[m,n] (ldc) = alpha · A[m,k] (lda, row-major) · op(B) + beta · C, op(B) = Bᵀ with B [n,k] (ldb) when
/// b_trans, else B [k,n] (ldb). C is bf16 or fp32.
void gemm_rm(cublasHandle_t h, bool b_trans, std::int64_t m, std::int64_t n, std::int64_t k, const bf16_t* a,
             std::int64_t lda, const bf16_t* b, std::int64_t ldb, float beta, void* c, bool c_f32, std::int64_t ldc,
             GemmBatch* batch = nullptr) {
  if (m == 0 || n == 0) return;
  KMOE_CHECK_INPUT(m < (1ll << 31) && n < (1ll << 31) && k < (1ll << 31) && lda < (1ll << 31) && ldb < (1ll << 31) &&
                       ldc < (1ll << 31),
                   "kmoe::core::cuda: GEMM [", m, ",", n, ",", k, "] exceeds cuBLAS' 32-bit sizes");
  const cublasOperation_t ta = b_trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (batch) return batch->add(ta, CUBLAS_OP_N, int(n), int(m), int(k), b, int(ldb), a, int(lda), beta, c, int(ldc));
  const float alpha = 1.f;
  KMOE_CUBLAS_CHECK(cublasGemmEx(h, ta, CUBLAS_OP_N, int(n), int(m), int(k), &alpha, b, CUDA_R_16BF, int(ldb), a,
                                 CUDA_R_16BF, int(lda), &beta, c, c_f32 ? CUDA_R_32F : CUDA_R_16BF, int(ldc),
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void grouped_gemm_cublas(const GroupedGemmArgs& a, const std::vector<std::int64_t>& off, const CublasSettings& settings,
                         cudaStream_t stream) {
  const HoldFpExceptions hold;
  KMOE_ASSERT(a.a_index == nullptr && a.c_index == nullptr, "the cuBLAS engine takes unindexed rows");
  KMOE_ASSERT(static_cast<int>(off.size()) == a.groups + 1);
  const std::int64_t N = a.n, K = a.k;
  const std::int64_t stored_rows = a.b_trans ? N : K, row_len = a.b_trans ? K : N;
  const std::int64_t split = a.b1 ? a.b_split : stored_rows;
  const bool grouped = settings.grouped;
  const GroupStreams gs(stream, grouped ? 1 : settings.streams);
  // grouped: first = every GEMM that overwrites its C, second = the accumulating halves (they must follow the first)
  GemmBatch first, second;
  GemmBatch* b_first = grouped ? &first : nullptr;
  GemmBatch* b_second = grouped ? &second : nullptr;
  const bool f32 = a.c_f32 != nullptr;
  const std::size_t c_elem = f32 ? sizeof(float) : sizeof(bf16_t);
  auto* c_base = f32 ? static_cast<void*>(a.c_f32) : static_cast<void*>(a.c_bf16);
  const float beta0 = a.accumulate ? 1.f : 0.f;
  for (int g = 0; g < a.groups; ++g) {
    const std::int64_t r0 = off[g], rows = off[g + 1] - off[g];
    if (rows == 0) continue;
    cublasHandle_t h = gs.handle(g);
    const bf16_t* A = a.a + r0 * a.lda;
    auto* C = static_cast<unsigned char*>(c_base) + std::size_t(r0 * a.ldc) * c_elem;
    const bf16_t* b0 = a.b0 + std::int64_t(g) * split * row_len;
    if (!a.b1) {
      gemm_rm(h, a.b_trans, rows, N, K, A, a.lda, b0, row_len, beta0, C, f32, a.ldc, b_first);
      continue;
    }
    const bf16_t* b1 = a.b1 + std::int64_t(g) * (stored_rows - split) * row_len;
    if (a.b_trans) {  // stored rows are output columns: C[:, :split] from b0, C[:, split:] from b1
      gemm_rm(h, true, rows, split, K, A, a.lda, b0, row_len, beta0, C, f32, a.ldc, b_first);
      gemm_rm(h, true, rows, N - split, K, A, a.lda, b1, row_len, beta0, C + std::size_t(split) * c_elem, f32, a.ldc,
              b_first);
    } else {  // stored rows are the reduction: C = A[:, :split]·b0 + A[:, split:]·b1
      gemm_rm(h, false, rows, N, split, A, a.lda, b0, row_len, beta0, C, f32, a.ldc, b_first);
      gemm_rm(h, false, rows, N, K - split, A + split, a.lda, b1, row_len, 1.f, C, f32, a.ldc, b_second);
    }
  }
  if (grouped) {
    const cudaDataType_t ctype = f32 ? CUDA_R_32F : CUDA_R_16BF;
    first.launch(gs.handle(0), stream, ctype);
    second.launch(gs.handle(0), stream, ctype);
  }
  gs.join();
}

void grouped_gemm_tn_cublas(const GroupedGemmTNArgs& a, const std::vector<std::int64_t>& off,
                            const CublasSettings& settings, cudaStream_t stream) {
  const HoldFpExceptions hold;
  KMOE_ASSERT(a.a_index == nullptr && a.b_index == nullptr, "the cuBLAS engine takes unindexed rows");
  KMOE_ASSERT(static_cast<int>(off.size()) == a.groups + 1);
  const std::int64_t M = a.m, N = a.n;
  const bool has_c1 = a.c1 || a.c1_bf16;
  const std::int64_t split = has_c1 ? a.c_split : M;
  const bool bf16_out = a.c0_bf16 != nullptr;
  KMOE_ASSERT(bf16_out == (a.c0 == nullptr) && (!has_c1 || bf16_out == (a.c1_bf16 != nullptr)),
              "grouped_gemm_tn: c0/c1 both fp32 or both bf16");
  const cudaDataType_t ctype = bf16_out ? CUDA_R_16BF : CUDA_R_32F;
  const std::size_t c_elem = bf16_out ? sizeof(bf16_t) : sizeof(float);
  // Group g's block of rows [m0, m0+m) of output 0 or 1, as bytes (the element type is the caller's).
  auto c_block = [&](int which, int g, std::int64_t rows_per_group) {
    auto* base = static_cast<unsigned char*>(which == 0 ? (bf16_out ? static_cast<void*>(a.c0_bf16) : a.c0)
                                                        : (bf16_out ? static_cast<void*>(a.c1_bf16) : a.c1));
    return static_cast<void*>(base + std::size_t(g) * rows_per_group * N * c_elem);
  };
  const bool grouped = settings.grouped;
  const GroupStreams gs(stream, grouped ? 1 : settings.streams);
  GemmBatch batch;
  const float alpha = 1.f, beta = 0.f;
  // C_g[m0:m1, :] = A[rows, m0:m1]ᵀ · B[rows, :]  (column-major: Cᵀ = Bᵀ·A)
  auto part = [&](int g, const bf16_t* A, std::int64_t rows, const bf16_t* B, std::int64_t m, void* C) {
    if (m == 0 || N == 0) return;
    if (rows == 0) {
      KMOE_CUDA_CHECK(cudaMemsetAsync(C, 0, c_elem * m * N, gs.stream(g)));
      return;
    }
    if (grouped)
      return batch.add(CUBLAS_OP_N, CUBLAS_OP_T, int(N), int(m), int(rows), B, int(a.ldb), A, int(a.lda), beta, C,
                       int(N));
    KMOE_CUBLAS_CHECK(cublasGemmEx(gs.handle(g), CUBLAS_OP_N, CUBLAS_OP_T, int(N), int(m), int(rows), &alpha, B,
                                   CUDA_R_16BF, int(a.ldb), A, CUDA_R_16BF, int(a.lda), &beta, C, ctype, int(N),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  for (int g = 0; g < a.groups; ++g) {
    const std::int64_t r0 = off[g], rows = off[g + 1] - off[g];
    const bf16_t* A = a.a + r0 * a.lda;
    const bf16_t* B = a.b + r0 * a.ldb;
    part(g, A, rows, B, split, c_block(0, g, split));
    if (has_c1) part(g, A + split, rows, B, M - split, c_block(1, g, M - split));
  }
  if (grouped) batch.launch(gs.handle(0), stream, ctype);
  gs.join();
}

}  // namespace kmoe::core::cuda::detail
