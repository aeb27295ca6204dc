// Grouped expert GEMMs on bf16 tensor cores (WMMA 16x16x16, fp32 accumulate), with the split sizes read on the device.
//
// Row-grouped kernel (grouped_gemm): one block computes a 128x128 tile of C for one group. Blocks are numbered over
// all groups' row tiles (tile_offsets = prefix of ceil(rows_g/128), built by the dispatch plan on the device); the grid
// is sized for the upper bound rows/128 + groups, and surplus blocks exit, so the host never waits for the counts.
// A rows come through an optional index (ScatterMoE: token rows read through the plan, no gathered copy), C rows go
// out through an optional index (results written in pair order). Three-stage cp.async pipeline, BK = 32.
//
// Weight-gradient kernel (grouped_gemm_tn): C_g = A_gᵀ·B_g over the rows of group g (the reduction axis), one block
// per 128x128 tile of C_g.
#include "common.cuh"

#include <mma.h>

#include <algorithm>

namespace kmoe::core::cuda {

namespace {

using namespace nvcuda;
using detail::cp_async16;

constexpr int BM = kGemmTileRows;  // 128 rows of C per block
constexpr int BN = 128;
constexpr int BK = 64;  // 32 measured 140 TFLOP/s; 64 halves the barriers per MMA (perf/RESULTS.md)
constexpr int kStages = 3;
constexpr int kThreads = 256;   // 8 warps: 2 (rows) x 4 (cols), each 64x32 = 4x2 fragments
constexpr int kChunksPerThread = BM * BK / 8 / kThreads;  // 16-byte chunks of one operand tile per thread
static_assert(BM == BN && BM * BK / 8 % kThreads == 0, "tile loads split evenly over the threads");
constexpr int LDA = BK + 8;     // smem leading dims (+8 bf16 = 16 bytes: staggers banks, keeps 32-byte alignment)
constexpr int LDB_T = BK + 8;
constexpr int LDB_N = BN + 8;
constexpr int LDC = BN + 4;
constexpr int kStageA = BM * LDA;                        // bf16 elements
constexpr int kStageBT = BN * LDB_T;
constexpr int kStageBN = BK * LDB_N;
constexpr int kStageB = kStageBT > kStageBN ? kStageBT : kStageBN;
constexpr int kPipeBytes = kStages * (kStageA + kStageB) * 2;
constexpr int kEpilogueBytes = BM * LDC * 4;
constexpr int kSmemBytes = kPipeBytes > kEpilogueBytes ? kPipeBytes : kEpilogueBytes;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

/// Bytes of the 8-element chunk starting at `at` that lie inside [0, limit): 16, a partial count, or 0.
__device__ __forceinline__ int chunk_bytes(std::int64_t at, std::int64_t limit) {
  const std::int64_t left = limit - at;
  return left >= 8 ? 16 : (left > 0 ? int(left) * 2 : 0);
}

struct RowTile {
  std::int64_t row0, row_end;
  int group;
};

/// Which group and rows block `tile` covers; false when the tile is past the last group's rows.
__device__ bool locate_tile(const GroupedGemmArgs& a, std::int64_t tile, RowTile& out) {
  if (a.offsets == nullptr) {
    out = {tile * BM, a.rows, 0};
    return out.row0 < a.rows;
  }
  if (tile >= a.tile_offsets[a.groups]) return false;
  int lo = 0, hi = a.groups - 1;  // largest g with tile_offsets[g] <= tile
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a.tile_offsets[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  out.group = lo;
  out.row0 = a.offsets[lo] + (tile - a.tile_offsets[lo]) * BM;
  out.row_end = a.offsets[lo + 1];
  return out.row0 < out.row_end;
}

template <bool BTrans>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(const GroupedGemmArgs args) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  RowTile rt;
  if (!locate_tile(args, blockIdx.x, rt)) return;
  const std::int64_t n0 = std::int64_t(blockIdx.y) * BN;
  const std::int64_t N = args.n, K = args.k;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 4, wn = warp % 4;

  // This group's B: stored rows j < b_split from b0, the rest from b1. With BTrans the stored matrix is [N,K]
  // (row = n, length K); otherwise [K,N] (row = k, length N).
  const std::int64_t stored_rows = BTrans ? N : K, row_len = BTrans ? K : N;
  const std::int64_t split = args.b1 ? args.b_split : stored_rows;
  const auto* b0 = reinterpret_cast<const __nv_bfloat16*>(args.b0) + std::int64_t(rt.group) * split * row_len;
  const auto* b1 = args.b1 ? reinterpret_cast<const __nv_bfloat16*>(args.b1) +
                                 std::int64_t(rt.group) * (stored_rows - split) * row_len
                           : b0;
  auto b_row = [&](std::int64_t j) { return j < split ? b0 + j * row_len : b1 + (j - split) * row_len; };
  const auto* A = reinterpret_cast<const __nv_bfloat16*>(args.a);

  // Each thread loads kChunksPerThread chunks of A per stage, always the same rows: resolve them once.
  constexpr int kRowChunks = BK / 8, kRowsPerPass = kThreads / kRowChunks;
  const __nv_bfloat16* a_src[kChunksPerThread];
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const std::int64_t r = rt.row0 + tid / kRowChunks + i * kRowsPerPass;
    a_src[i] = nullptr;
    if (r < rt.row_end) {
      std::int64_t src = r;
      if (args.a_index) {
        const std::int64_t ix = args.a_index[r];
        src = ix < 0 ? -1 : ix / args.a_div;
      }
      if (src >= 0) a_src[i] = A + src * args.lda;
    }
  }

  auto load_stage = [&](int stage, std::int64_t k0) {
    __nv_bfloat16* As = smem + stage * (kStageA + kStageB);
    __nv_bfloat16* Bs = As + kStageA;
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int rl = tid / kRowChunks + i * kRowsPerPass, kc = (tid % kRowChunks) * 8;
      const int bytes = a_src[i] ? chunk_bytes(k0 + kc, K) : 0;
      cp_async16(As + rl * LDA + kc, bytes ? a_src[i] + k0 + kc : A, bytes);
    }
    if (BTrans) {  // B tile: BN stored rows (n) x BK (k)
#pragma unroll
      for (int i = 0; i < kChunksPerThread; ++i) {
        const int nl = tid / kRowChunks + i * kRowsPerPass, kc = (tid % kRowChunks) * 8;
        const std::int64_t n = n0 + nl;
        const int bytes = n < N ? chunk_bytes(k0 + kc, K) : 0;
        cp_async16(Bs + nl * LDB_T + kc, bytes ? b_row(n) + k0 + kc : b0, bytes);
      }
    } else {  // B tile: BK stored rows (k) x BN (n)
#pragma unroll
      for (int i = 0; i < kChunksPerThread; ++i) {
        const int c = tid + i * kThreads, kl = c / (BN / 8), nc = (c % (BN / 8)) * 8;
        const std::int64_t kk = k0 + kl;
        const int bytes = kk < K ? chunk_bytes(n0 + nc, N) : 0;
        cp_async16(Bs + kl * LDB_N + nc, bytes ? b_row(kk) + n0 + nc : b0, bytes);
      }
    }
  };

  FragAcc acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const std::int64_t ktiles = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s * BK);
    detail::cp_async_commit();
  }
  for (std::int64_t kt = 0; kt < ktiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();
    const std::int64_t next = kt + kStages - 1;
    if (next < ktiles) load_stage(int(next % kStages), next * BK);
    detail::cp_async_commit();
    const __nv_bfloat16* As = smem + int(kt % kStages) * (kStageA + kStageB);
    const __nv_bfloat16* Bs = As + kStageA;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      FragA fa[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 64 + i * 16) * LDA + kk, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (BTrans) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, Bs + (wn * 32 + j * 16) * LDB_T + kk, LDB_T);
#pragma unroll
          for (int i = 0; i < 4; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        } else {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, Bs + kk * LDB_N + wn * 32 + j * 16, LDB_N);
#pragma unroll
          for (int i = 0; i < 4; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        }
      }
    }
  }
  detail::cp_async_wait<0>();
  __syncthreads();

  // Epilogue through shared memory: rows of C may be scattered (c_index), so each thread writes whole 8-wide runs.
  float* Cs = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 64 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  const bool vec = (N % 8 == 0) && (args.ldc % 8 == 0);
  for (int item = tid; item < BM * BN / 8; item += kThreads) {
    const int rl = item / (BN / 8), cc = (item % (BN / 8)) * 8;
    const std::int64_t r = rt.row0 + rl, n = n0 + cc;
    if (r >= rt.row_end || n >= N) continue;
    const std::int64_t crow = args.c_index ? args.c_index[r] : r;
    const float* src = Cs + rl * LDC + cc;
    if (args.c_bf16) {
      bf16_t* dst = args.c_bf16 + crow * args.ldc + n;
      if (vec) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = src[e];
        *reinterpret_cast<detail::Bf16x8*>(dst) = detail::pack8(v);
      } else {
        for (int e = 0; e < 8 && n + e < N; ++e) dst[e] = detail::float_to_bf16(src[e]);
      }
    } else {
      float* dst = args.c_f32 + crow * args.ldc + n;
      for (int e = 0; e < 8 && n + e < N; ++e) dst[e] = args.accumulate ? dst[e] + src[e] : src[e];
    }
  }
}

// ---- weight gradients -------------------------------------------------------------------------------------------

constexpr int LDT = BM + 8;  // [BK rows][128 + 8] tiles of A and B
constexpr int kStageTN = BK * LDT;
constexpr int kPipeBytesTN = kStages * 2 * kStageTN * 2;
constexpr int kSmemBytesTN = kPipeBytesTN > kEpilogueBytes ? kPipeBytesTN : kEpilogueBytes;

__global__ void __launch_bounds__(kThreads) grouped_gemm_tn_kernel(const GroupedGemmTNArgs args) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  const int g = blockIdx.z;
  const std::int64_t m0 = std::int64_t(blockIdx.x) * BM, n0 = std::int64_t(blockIdx.y) * BN;
  const std::int64_t M = args.m, N = args.n;
  const std::int64_t r_begin = args.offsets ? args.offsets[g] : 0;
  const std::int64_t r_end = args.offsets ? args.offsets[g + 1] : args.rows;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 4, wn = warp % 4;
  const auto* A = reinterpret_cast<const __nv_bfloat16*>(args.a);
  const auto* B = reinterpret_cast<const __nv_bfloat16*>(args.b);

  auto src_row = [](const std::int64_t* index, int div, std::int64_t r) -> std::int64_t {
    if (!index) return r;
    const std::int64_t ix = index[r];
    return ix < 0 ? -1 : ix / div;
  };
  // Per stage: A tile [BK rows][BM cols of m], B tile [BK rows][BN cols of n]; kChunksPerThread chunks each per thread.
  auto load_stage = [&](int stage, std::int64_t r0) {
    __nv_bfloat16* As = smem + stage * 2 * kStageTN;
    __nv_bfloat16* Bs = As + kStageTN;
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const int c = tid + i * kThreads, rl = c / (BM / 8), cc = (c % (BM / 8)) * 8;
      const std::int64_t r = r0 + rl;
      const std::int64_t ra = r < r_end ? src_row(args.a_index, args.a_div, r) : -1;
      const std::int64_t rb = r < r_end ? src_row(args.b_index, args.b_div, r) : -1;
      const int ab = ra >= 0 ? chunk_bytes(m0 + cc, M) : 0;
      const int bb = rb >= 0 ? chunk_bytes(n0 + cc, N) : 0;
      cp_async16(As + rl * LDT + cc, ab ? A + ra * args.lda + m0 + cc : A, ab);
      cp_async16(Bs + rl * LDT + cc, bb ? B + rb * args.ldb + n0 + cc : B, bb);
    }
  };

  FragAcc acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  const std::int64_t ktiles = (r_end - r_begin + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, r_begin + s * BK);
    detail::cp_async_commit();
  }
  for (std::int64_t kt = 0; kt < ktiles; ++kt) {
    detail::cp_async_wait<kStages - 2>();
    __syncthreads();
    const std::int64_t next = kt + kStages - 1;
    if (next < ktiles) load_stage(int(next % kStages), r_begin + next * BK);
    detail::cp_async_commit();
    const __nv_bfloat16* As = smem + int(kt % kStages) * 2 * kStageTN;
    const __nv_bfloat16* Bs = As + kStageTN;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> fa[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], As + kk * LDT + wm * 64 + i * 16, LDT);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, Bs + kk * LDT + wn * 32 + j * 16, LDT);
#pragma unroll
        for (int i = 0; i < 4; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
      }
    }
  }
  detail::cp_async_wait<0>();
  __syncthreads();
  float* Cs = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 64 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  const std::int64_t split = args.c1 ? args.c_split : M;
  for (int item = tid; item < BM * BN / 8; item += kThreads) {
    const int ml = item / (BN / 8), cc = (item % (BN / 8)) * 8;
    const std::int64_t m = m0 + ml, n = n0 + cc;
    if (m >= M || n >= N) continue;
    float* dst = m < split ? args.c0 + (std::int64_t(g) * split + m) * N + n
                           : args.c1 + (std::int64_t(g) * (M - split) + (m - split)) * N + n;
    const float* src = Cs + ml * LDC + cc;
    for (int e = 0; e < 8 && n + e < N; ++e) dst[e] = src[e];
  }
}

void check_ptr16(const void* p, const char* what) {
  KMOE_CHECK_INPUT(p == nullptr || detail::aligned16(p), "kmoe::core::cuda::grouped_gemm: ", what,
                   " is not 16-byte aligned");
}

}  // namespace

void grouped_gemm(const GroupedGemmArgs& a, cudaStream_t stream) {
  constexpr const char* fn = "kmoe::core::cuda::grouped_gemm";
  KMOE_CHECK_INPUT(a.groups >= 1 && a.rows >= 0 && a.n >= 0 && a.k >= 0, fn, ": groups ", a.groups, ", rows ", a.rows,
                   ", n ", a.n, ", k ", a.k);
  KMOE_CHECK_INPUT((a.offsets == nullptr) == (a.tile_offsets == nullptr), fn,
                   ": offsets and tile_offsets come together");
  KMOE_CHECK_INPUT(a.offsets != nullptr || a.groups == 1, fn, ": ", a.groups, " groups need device offsets");
  KMOE_CHECK_INPUT((a.c_bf16 == nullptr) != (a.c_f32 == nullptr), fn, ": give exactly one of c_bf16 / c_f32");
  KMOE_CHECK_INPUT(!a.accumulate || a.c_f32, fn, ": accumulate needs the fp32 output");
  KMOE_CHECK_INPUT(a.lda % 8 == 0, fn, ": lda = ", a.lda, " is not a multiple of 8 (16-byte rows)");
  const std::int64_t row_len = a.b_trans ? a.k : a.n;
  KMOE_CHECK_INPUT(row_len % 8 == 0, fn, ": B's stored rows hold ", row_len, " values, not a multiple of 8");
  KMOE_CHECK_INPUT(a.b1 == nullptr || (a.b_split > 0 && a.b_split < (a.b_trans ? a.n : a.k)), fn, ": b_split ",
                   a.b_split, " outside the stored rows");
  check_ptr16(a.a, "A");
  check_ptr16(a.b0, "B");
  check_ptr16(a.b1, "B (second part)");
  if (a.rows == 0 || a.n == 0) return;
  if (a.k == 0 && !a.accumulate) {
    // Nothing to reduce over: C = 0 on the touched rows. Not needed by the MoE block; refuse rather than guess.
    KMOE_CHECK_INPUT(false, fn, ": k = 0");
  }
  const std::int64_t row_tiles = (a.rows + BM - 1) / BM + (a.offsets ? a.groups : 0);
  const std::int64_t col_tiles = (a.n + BN - 1) / BN;
  KMOE_CHECK_INPUT(row_tiles < (1ll << 31) && col_tiles < 65536, fn, ": problem too large for one launch");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  if (a.b_trans) {
    static bool attr = false;
    if (!attr) {
      KMOE_CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           kSmemBytes));
      attr = true;
    }
    grouped_gemm_kernel<true><<<grid, kThreads, kSmemBytes, stream>>>(a);
    KMOE_CUDA_CHECK_LAUNCH("grouped_gemm_kernel<NT>");
  } else {
    static bool attr = false;
    if (!attr) {
      KMOE_CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           kSmemBytes));
      attr = true;
    }
    grouped_gemm_kernel<false><<<grid, kThreads, kSmemBytes, stream>>>(a);
    KMOE_CUDA_CHECK_LAUNCH("grouped_gemm_kernel<NN>");
  }
}

void grouped_gemm_tn(const GroupedGemmTNArgs& a, cudaStream_t stream) {
  constexpr const char* fn = "kmoe::core::cuda::grouped_gemm_tn";
  KMOE_CHECK_INPUT(a.groups >= 1 && a.m >= 0 && a.n >= 0 && a.rows >= 0, fn, ": groups ", a.groups, ", m ", a.m,
                   ", n ", a.n);
  KMOE_CHECK_INPUT(a.offsets != nullptr || a.groups == 1, fn, ": ", a.groups, " groups need device offsets");
  KMOE_CHECK_INPUT(a.lda % 8 == 0 && a.ldb % 8 == 0, fn, ": lda = ", a.lda, ", ldb = ", a.ldb,
                   " must be multiples of 8 (16-byte rows)");
  KMOE_CHECK_INPUT(a.c1 == nullptr || (a.c_split > 0 && a.c_split < a.m), fn, ": c_split ", a.c_split,
                   " outside [1, m)");
  KMOE_CHECK_INPUT(a.c0_bf16 == nullptr && a.c1_bf16 == nullptr, fn,
                   ": bf16 weight gradients are written by the cuBLAS engine only (GemmEngine::Cublas)");
  check_ptr16(a.a, "A");
  check_ptr16(a.b, "B");
  if (a.m == 0 || a.n == 0) return;
  const dim3 grid(static_cast<unsigned>((a.m + BM - 1) / BM), static_cast<unsigned>((a.n + BN - 1) / BN),
                  static_cast<unsigned>(a.groups));
  KMOE_CHECK_INPUT(grid.y < 65536 && grid.z < 65536, fn, ": problem too large for one launch");
  static bool attr = false;
  if (!attr) {
    KMOE_CUDA_CHECK(
        cudaFuncSetAttribute(grouped_gemm_tn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytesTN));
    attr = true;
  }
  grouped_gemm_tn_kernel<<<grid, kThreads, kSmemBytesTN, stream>>>(a);
  KMOE_CUDA_CHECK_LAUNCH("grouped_gemm_tn_kernel");
}

}  // namespace kmoe::core::cuda
