// Grouped expert GEMMs on bf16 tensor cores (WMMA 16x16x16, fp32 accumulate), with the split sizes read on the device.
//
// Row-grouped kernel (grouped_gemm): one block computes a 128x128 tile of C for one group. Blocks are numbered over
// all groups' row tiles (tile_offsets = prefix of ceil(rows_g/128), built by the dispatch plan on the device); the grid
// is sized for the upper bound rows/128 + groups, and surplus blocks exit, so the host never waits for the counts.
// A rows come through an optional index (ScatterMoE: token rows read through the plan, no gathered copy), C rows go
// out through an optional index (results written in pair order). Three-stage cp.async pipeline, BK = 32.
//
// Epilogues (GemmEpilogue, kernels.hpp): the tile goes through shared memory; Store writes it, SwigluForward maps the
// block's 128 columns to 64 columns f of h1 and the same 64 of h3 (W1 rows f, W3 rows f) so act = silu(h1)·h3 is
// computed in the block, SwigluBackward turns the d_act tile into dh13 with the h13 tile it prefetched into shared
// memory during the main loop. Measured fused vs separate passes: perf/NOTES.md.
//
// Weight-gradient kernel (grouped_gemm_tn): C_g = A_gᵀ·B_g over the rows of group g (the reduction axis), one block
// per 128x128 tile of C_g.
#include "common.cuh"

#include <mma.h>

#include <algorithm>
#include <string>

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
constexpr int LDH = 2 * BN + 8;  // SwigluBackward: [BM][h1 | h3] bf16 tile behind the pipeline
constexpr int kSmemBytesSwigluBwd = kPipeBytes + BM * LDH * 2;
static_assert(kPipeBytes >= kEpilogueBytes && kSmemBytesSwigluBwd <= 227 * 1024, "Hs lies past the epilogue's tile");

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

/// Stages the block's accumulators in shared memory as a [BM][LDC] fp32 tile, after the main loop's copies have
/// drained (the tile reuses the pipeline's shared memory).
__device__ __forceinline__ const float* stage_accumulators(unsigned char* smem_raw, FragAcc (&acc)[4][2], int wm,
                                                           int wn) {
  detail::cp_async_wait<0>();
  __syncthreads();
  float* Cs = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 64 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  return Cs;
}

/// Calls f(rl, cc, v) for each 8-wide run of the staged tile's first Cols columns (v: row rl, columns cc..cc+7), the
/// block's threads striding over the runs: C rows may be scattered (c_index), so each thread writes whole runs.
template <int Cols, class F>
__device__ __forceinline__ void for_each_run(const float* Cs, F&& f) {
  static_assert(BM * Cols / 8 % kThreads == 0, "runs split evenly over the threads");
#pragma unroll
  for (int i = 0; i < BM * Cols / 8 / kThreads; ++i) {
    const int item = threadIdx.x + i * kThreads;
    const int rl = item / (Cols / 8), cc = (item % (Cols / 8)) * 8;
    f(rl, cc, Cs + rl * LDC + cc);
  }
}

/// Stores v[0, min(count, 8)) as bf16 at dst: one 16-byte store when all 8 fit and `vec` (dst 16-byte aligned).
__device__ __forceinline__ void store_bf16x8(bf16_t* dst, const float (&v)[8], std::int64_t count, bool vec) {
  if (vec && count >= 8) {
    *reinterpret_cast<detail::Bf16x8*>(dst) = detail::pack8(v);
    return;
  }
  for (int e = 0; e < 8 && e < count; ++e) dst[e] = detail::float_to_bf16(v[e]);
}

template <bool BTrans, GemmEpilogue Ep>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(const GroupedGemmArgs args) {
  static_assert(Ep != GemmEpilogue::SwigluForward || BTrans, "the paired h1/h3 columns are stored rows of [W1;W3]");
  // SwigluForward: the block's BN columns are kHalf columns f of h1 (stored rows f) then the same kHalf columns of
  // h3 (stored rows b_split + f); blockIdx.y counts f tiles of kHalf.
  constexpr bool kPaired = Ep == GemmEpilogue::SwigluForward;
  constexpr int kHalf = BN / 2;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  RowTile rt;
  if (!locate_tile(args, blockIdx.x, rt)) return;
  const std::int64_t n0 = std::int64_t(blockIdx.y) * (kPaired ? kHalf : BN);
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
  // The stored row of B behind the tile's column nl (BTrans), or -1 outside the matrix.
  auto column_row = [&](int nl) -> std::int64_t {
    if constexpr (kPaired) {
      const std::int64_t f = n0 + nl % kHalf;
      return f < split ? (nl < kHalf ? f : split + f) : -1;
    } else {
      const std::int64_t n = n0 + nl;
      return n < N ? n : -1;
    }
  };
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
        const std::int64_t j = column_row(nl);
        const int bytes = j >= 0 ? chunk_bytes(k0 + kc, K) : 0;
        cp_async16(Bs + nl * LDB_T + kc, bytes ? b_row(j) + k0 + kc : b0, bytes);
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

  // SwigluBackward: the tile's h1 and h3 (BN columns each, at C's rows) go to their own shared memory Hs, one
  // cp.async group committed before the pipeline's, so the loads overlap the main loop instead of stalling the
  // epilogue (1 block per SM: the tensor cores idle while the epilogue waits). C may alias h13_in: each element is
  // read here, before the epilogue of the same block overwrites it, and no other block touches it.
  __nv_bfloat16* Hs = smem + kStages * (kStageA + kStageB);
  if constexpr (Ep == GemmEpilogue::SwigluBackward) {
    const auto* h13 = reinterpret_cast<const __nv_bfloat16*>(args.h13_in);
    constexpr int kRowChunks = 2 * BN / 8;
    for (int c = tid; c < BM * kRowChunks; c += kThreads) {
      const int rl = c / kRowChunks, j = c % kRowChunks, cc = (j % (BN / 8)) * 8, half = j / (BN / 8);
      const std::int64_t r = rt.row0 + rl, f = n0 + cc;
      const bool inside = r < rt.row_end && f < N;
      const std::int64_t crow = inside ? (args.c_index ? args.c_index[r] : r) : 0;
      cp_async16(Hs + rl * LDH + half * BN + cc, inside ? h13 + crow * args.ld_h13 + half * N + f : h13,
                 inside ? 16 : 0);
    }
    detail::cp_async_commit();
  }

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
  const float* Cs = stage_accumulators(smem_raw, acc, wm, wn);
  auto c_row = [&](int rl) -> std::int64_t {  // the C row of tile row rl, -1 past the group's rows
    const std::int64_t r = rt.row0 + rl;
    if (r >= rt.row_end) return -1;
    return args.c_index ? args.c_index[r] : r;
  };
  if constexpr (Ep == GemmEpilogue::Store) {
    const bool vec = N % 8 == 0 && args.ldc % 8 == 0 && (reinterpret_cast<std::uintptr_t>(args.c_bf16) & 15) == 0;
    for_each_run<BN>(Cs, [&](int rl, int cc, const float* src) {
      const std::int64_t n = n0 + cc, crow = c_row(rl);
      if (n >= N || crow < 0) return;
      if (args.c_bf16) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = src[e];
        store_bf16x8(args.c_bf16 + crow * args.ldc + n, v, N - n, vec);
      } else {
        float* dst = args.c_f32 + crow * args.ldc + n;
        for (int e = 0; e < 8 && n + e < N; ++e) dst[e] = args.accumulate ? dst[e] + src[e] : src[e];
      }
    });
  } else if constexpr (Ep == GemmEpilogue::SwigluForward) {
    const std::int64_t F = split;  // grouped_gemm checked F % 8 == 0: runs are whole
    for_each_run<kHalf>(Cs, [&](int rl, int cc, const float* src) {
      const std::int64_t f = n0 + cc, crow = c_row(rl);
      if (f >= F || crow < 0) return;
      float h1[8], h3[8], act[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        h1[e] = detail::round_bf16(src[e]);
        h3[e] = detail::round_bf16(src[kHalf + e]);
        act[e] = detail::swiglu(h1[e], h3[e]);
      }
      if (args.h13_out) {
        store_bf16x8(args.h13_out + crow * args.ld_h13 + f, h1, 8, true);
        store_bf16x8(args.h13_out + crow * args.ld_h13 + F + f, h3, 8, true);
      }
      store_bf16x8(args.c_bf16 + crow * args.ldc + f, act, 8, true);
    });
  } else {  // SwigluBackward: the tile is d_act; its h1 and h3 wait in Hs (prefetched before the main loop)
    for_each_run<BN>(Cs, [&](int rl, int cc, const float* src) {
      const std::int64_t f = n0 + cc, crow = c_row(rl);
      if (f >= N || crow < 0) return;
      float h1[8], h3[8], d1[8], d3[8];
      detail::unpack8(*reinterpret_cast<const detail::Bf16x8*>(Hs + rl * LDH + cc), h1);
      detail::unpack8(*reinterpret_cast<const detail::Bf16x8*>(Hs + rl * LDH + BN + cc), h3);
#pragma unroll
      for (int e = 0; e < 8; ++e) detail::swiglu_grad(h1[e], h3[e], detail::round_bf16(src[e]), d1[e], d3[e]);
      store_bf16x8(args.c_bf16 + crow * args.ldc + f, d1, 8, true);
      store_bf16x8(args.c_bf16 + crow * args.ldc + N + f, d3, 8, true);
    });
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
  const float* Cs = stage_accumulators(smem_raw, acc, wm, wn);
  const bool bf16_out = args.c0_bf16 != nullptr;
  const std::int64_t split = (args.c1 || args.c1_bf16) ? args.c_split : M;
  for_each_run<BN>(Cs, [&](int ml, int cc, const float* src) {
    const std::int64_t m = m0 + ml, n = n0 + cc;
    if (m >= M || n >= N) return;
    const bool first = m < split;
    const std::int64_t at = first ? (std::int64_t(g) * split + m) * N + n : (std::int64_t(g) * (M - split) + (m - split)) * N + n;
    if (bf16_out) {  // gradients stored in bf16 (MoeGrads::dw*_bf16): rounded once, from the fp32 accumulators
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = src[e];
      store_bf16x8((first ? args.c0_bf16 : args.c1_bf16) + at, v, N - n, N % 8 == 0);
      return;
    }
    float* dst = (first ? args.c0 : args.c1) + at;
    for (int e = 0; e < 8 && n + e < N; ++e) dst[e] = src[e];
  });
}

void check_ptr16(const void* p, const char* what) {
  KMOE_CHECK_INPUT(p == nullptr || detail::aligned16(p), "kmoe::core::cuda::grouped_gemm: ", what,
                   " is not 16-byte aligned");
}

/// What the fused SwiGLU epilogues assume (kernels.hpp, GemmEpilogue): whole 16-byte runs of h1, h3 and C.
void check_swiglu(const GroupedGemmArgs& a) {
  constexpr const char* fn = "kmoe::core::cuda::grouped_gemm (SwiGLU epilogue)";
  const bool fwd = a.epilogue == GemmEpilogue::SwigluForward;
  const std::int64_t ffn = fwd ? a.b_split : a.n;
  KMOE_CHECK_INPUT(a.c_bf16 && !a.accumulate, fn, ": needs the bf16 output, not accumulated");
  KMOE_CHECK_INPUT(fwd ? (a.b_trans && a.b1 && a.n == 2 * a.b_split) : !a.b_trans, fn,
                   fwd ? ": the forward needs C = A·[W1;W3]ᵀ (b_trans, b1, n = 2·b_split); n = "
                       : ": the backward needs C = A·W2 (b_trans false); n = ",
                   a.n, ", b_split = ", a.b_split);
  KMOE_CHECK_INPUT(fwd || a.h13_in, fn, ": the backward reads h13_in");
  KMOE_CHECK_INPUT(ffn % 8 == 0 && a.ldc % 8 == 0 && a.ld_h13 % 8 == 0, fn, ": ffn ", ffn, ", ldc ", a.ldc,
                   ", ld_h13 ", a.ld_h13, " must be multiples of 8");
  KMOE_CHECK_INPUT(a.ldc >= (fwd ? ffn : 2 * ffn) && ((fwd && !a.h13_out) || a.ld_h13 >= 2 * ffn), fn, ": ldc ",
                   a.ldc, " or ld_h13 ", a.ld_h13, " shorter than the rows they hold (ffn ", ffn, ")");
  check_ptr16(a.c_bf16, "C");
  check_ptr16(a.h13_out, "h13_out");
  check_ptr16(a.h13_in, "h13_in");
}

/// Launches Kernel with `smem` bytes of dynamic shared memory, raising the kernel's limit at its first launch (one
/// instantiation, so one flag, per kernel). `name` names the launch in errors.
template <auto Kernel, class Args>
void launch(dim3 grid, int smem, const Args& a, cudaStream_t stream, const char* name) {
  static bool attr = false;
  if (!attr) {
    KMOE_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    attr = true;
  }
  Kernel<<<grid, kThreads, smem, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) detail::throw_cuda(err, (std::string("launch of ") + name).c_str(), __FILE__, __LINE__);
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
  if (a.epilogue != GemmEpilogue::Store) check_swiglu(a);
  const bool paired = a.epilogue == GemmEpilogue::SwigluForward;
  const std::int64_t row_tiles = (a.rows + BM - 1) / BM + (a.offsets ? a.groups : 0);
  const std::int64_t col_tiles = paired ? (a.b_split + BN / 2 - 1) / (BN / 2) : (a.n + BN - 1) / BN;
  KMOE_CHECK_INPUT(row_tiles < (1ll << 31) && col_tiles < 65536, fn, ": problem too large for one launch");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  switch (a.epilogue) {
    case GemmEpilogue::Store:
      if (a.b_trans)
        launch<grouped_gemm_kernel<true, GemmEpilogue::Store>>(grid, kSmemBytes, a, stream, "grouped_gemm_kernel<NT>");
      else
        launch<grouped_gemm_kernel<false, GemmEpilogue::Store>>(grid, kSmemBytes, a, stream, "grouped_gemm_kernel<NN>");
      break;
    case GemmEpilogue::SwigluForward:
      launch<grouped_gemm_kernel<true, GemmEpilogue::SwigluForward>>(grid, kSmemBytes, a, stream,
                                                                     "grouped_gemm_kernel<NT, SwiGLU forward>");
      break;
    case GemmEpilogue::SwigluBackward:
      launch<grouped_gemm_kernel<false, GemmEpilogue::SwigluBackward>>(grid, kSmemBytesSwigluBwd, a, stream,
                                                                       "grouped_gemm_kernel<NN, SwiGLU backward>");
      break;
  }
}

void grouped_gemm_tn(const GroupedGemmTNArgs& a, cudaStream_t stream) {
  constexpr const char* fn = "kmoe::core::cuda::grouped_gemm_tn";
  KMOE_CHECK_INPUT(a.groups >= 1 && a.m >= 0 && a.n >= 0 && a.rows >= 0, fn, ": groups ", a.groups, ", m ", a.m,
                   ", n ", a.n);
  KMOE_CHECK_INPUT(a.offsets != nullptr || a.groups == 1, fn, ": ", a.groups, " groups need device offsets");
  KMOE_CHECK_INPUT(a.lda % 8 == 0 && a.ldb % 8 == 0, fn, ": lda = ", a.lda, ", ldb = ", a.ldb,
                   " must be multiples of 8 (16-byte rows)");
  const bool bf16_out = a.c0_bf16 != nullptr;
  KMOE_CHECK_INPUT(bf16_out == (a.c0 == nullptr) && (bf16_out ? a.c1 == nullptr : a.c1_bf16 == nullptr), fn,
                   ": give c0 (and c1) in fp32 or c0_bf16 (and c1_bf16) in bf16, one kind");
  KMOE_CHECK_INPUT((a.c1 == nullptr && a.c1_bf16 == nullptr) || (a.c_split > 0 && a.c_split < a.m), fn, ": c_split ",
                   a.c_split, " outside [1, m)");
  check_ptr16(a.a, "A");
  check_ptr16(a.b, "B");
  check_ptr16(a.c0_bf16, "C0 (bf16)");
  check_ptr16(a.c1_bf16, "C1 (bf16)");
  if (a.m == 0 || a.n == 0) return;
  const dim3 grid(static_cast<unsigned>((a.m + BM - 1) / BM), static_cast<unsigned>((a.n + BN - 1) / BN),
                  static_cast<unsigned>(a.groups));
  KMOE_CHECK_INPUT(grid.y < 65536 && grid.z < 65536, fn, ": problem too large for one launch");
  launch<grouped_gemm_tn_kernel>(grid, kSmemBytesTN, a, stream, "grouped_gemm_tn_kernel");
}

}  // namespace kmoe::core::cuda
