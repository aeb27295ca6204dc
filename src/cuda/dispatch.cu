// The dispatch plan on the device, with no host synchronisation: per-chunk histograms, one scan over (chunk, expert)
// that also yields the expert offsets, GEMM tile offsets and MegaBlocks padded offsets, then a stable placement
// (a pair's rank among the same expert's pairs of its chunk counts only earlier pairs).
#include "common.cuh"

namespace kmoe::core::cuda {

namespace {

constexpr int kChunk = 256;         // pairs per chunk = threads per block of the histogram/placement kernels
constexpr int kMaxScanExperts = 1024;

std::int64_t chunks_for(std::int64_t pairs) { return (pairs + kChunk - 1) / kChunk; }
std::int64_t padded_capacity_for(std::int64_t pairs, int experts) {
  return pairs + std::int64_t(experts) * (kGemmTileRows - 1);
}
std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }

__global__ void chunk_histogram_kernel(const std::int64_t* __restrict__ topk_idx, std::int64_t pairs, int experts,
                                       std::int64_t* __restrict__ chunk_counts) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const std::int64_t p = std::int64_t(blockIdx.x) * kChunk + threadIdx.x;
  if (p < pairs) atomicAdd(&hist[topk_idx[p]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) chunk_counts[std::int64_t(blockIdx.x) * experts + e] = hist[e];
}

/// One block, one thread per expert: turns chunk_counts into each chunk's first row per expert, and scans the
/// experts into offsets / tile_offsets / padded_offsets / padded_tile_offsets.
__global__ void plan_scan_kernel(std::int64_t chunks, int experts, std::int64_t* __restrict__ chunk_counts,
                                 std::int64_t* __restrict__ counts, std::int64_t* __restrict__ offsets,
                                 std::int64_t* __restrict__ tile_offsets, std::int64_t* __restrict__ padded_offsets,
                                 std::int64_t* __restrict__ padded_tile_offsets) {
  __shared__ std::int64_t s_count[kMaxScanExperts];
  const int e = threadIdx.x;
  std::int64_t total = 0;
  if (e < experts) {
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::int64_t n = chunk_counts[c * experts + e];
      chunk_counts[c * experts + e] = total;  // exclusive, relative to the expert's first row
      total += n;
    }
    s_count[e] = total;
  }
  __syncthreads();
  if (e == 0) {  // E <= 1024 values: a serial scan is shorter than the launch
    std::int64_t row = 0, tile = 0, prow = 0;
    for (int j = 0; j < experts; ++j) {
      const std::int64_t n = s_count[j];
      const std::int64_t tiles = (n + kGemmTileRows - 1) / kGemmTileRows;
      counts[j] = n;
      offsets[j] = row;
      tile_offsets[j] = tile;
      padded_offsets[j] = prow;
      padded_tile_offsets[j] = prow / kGemmTileRows;
      row += n;
      tile += tiles;
      prow += tiles * kGemmTileRows;
    }
    offsets[experts] = row;
    tile_offsets[experts] = tile;
    padded_offsets[experts] = prow;
    padded_tile_offsets[experts] = prow / kGemmTileRows;
  }
  __syncthreads();
  if (e < experts) {
    const std::int64_t base = offsets[e];
    for (std::int64_t c = 0; c < chunks; ++c) chunk_counts[c * experts + e] += base;
  }
}

__global__ void plan_place_kernel(const std::int64_t* __restrict__ topk_idx, std::int64_t pairs, int experts,
                                  const std::int64_t* __restrict__ chunk_base, const std::int64_t* __restrict__ offsets,
                                  const std::int64_t* __restrict__ padded_offsets, std::int64_t* __restrict__ sorted_pair,
                                  std::int64_t* __restrict__ pair_row, std::int64_t* __restrict__ pair_padded_row,
                                  std::int64_t* __restrict__ padded_pair) {
  __shared__ int s_e[kChunk];
  const int i = threadIdx.x;
  const std::int64_t p = std::int64_t(blockIdx.x) * kChunk + i;
  const int e = p < pairs ? int(topk_idx[p]) : -1;
  s_e[i] = e;
  __syncthreads();
  if (e < 0) return;
  int rank = 0;
  for (int j = 0; j < i; ++j) rank += s_e[j] == e;
  const std::int64_t row = chunk_base[std::int64_t(blockIdx.x) * experts + e] + rank;
  const std::int64_t prow = padded_offsets[e] + (row - offsets[e]);
  sorted_pair[row] = p;
  pair_row[p] = row;
  pair_padded_row[p] = prow;
  padded_pair[prow] = p;
}

}  // namespace

std::size_t dispatch_plan_bytes(std::int64_t tokens, int experts, int k) {
  const std::int64_t pairs = tokens * k;
  const std::size_t i8 = sizeof(std::int64_t);
  return align256(i8 * experts) + 4 * align256(i8 * (experts + 1)) + 3 * align256(i8 * pairs) +
         align256(i8 * padded_capacity_for(pairs, experts)) + align256(i8 * chunks_for(pairs) * experts);
}

DispatchPlan dispatch_plan_carve(void* buffer, std::int64_t tokens, int experts, int k) {
  KMOE_CHECK_INPUT(tokens >= 0 && experts >= 1 && experts <= kMaxScanExperts && k >= 1 && k <= experts,
                   "kmoe::core::cuda::dispatch_plan_carve: tokens ", tokens, ", experts ", experts, " (max ",
                   kMaxScanExperts, "), k ", k);
  KMOE_CHECK_INPUT(detail::aligned16(buffer), "kmoe::core::cuda::dispatch_plan_carve: buffer is not aligned");
  DispatchPlan plan;
  plan.tokens = tokens;
  plan.experts = experts;
  plan.k = k;
  plan.pairs = tokens * k;
  plan.padded_capacity = padded_capacity_for(plan.pairs, experts);
  auto* at = static_cast<unsigned char*>(buffer);
  auto take = [&](std::int64_t n) {
    auto* p = reinterpret_cast<std::int64_t*>(at);
    at += align256(sizeof(std::int64_t) * n);
    return p;
  };
  plan.counts = take(experts);
  plan.offsets = take(experts + 1);
  plan.tile_offsets = take(experts + 1);
  plan.padded_offsets = take(experts + 1);
  plan.padded_tile_offsets = take(experts + 1);
  plan.sorted_pair = take(plan.pairs);
  plan.pair_row = take(plan.pairs);
  plan.pair_padded_row = take(plan.pairs);
  plan.padded_pair = take(plan.padded_capacity);
  plan.chunk_counts = take(chunks_for(plan.pairs) * experts);
  return plan;
}

void dispatch_plan_build(const std::int64_t* topk_idx, const DispatchPlan& plan, cudaStream_t stream) {
  const std::int64_t chunks = chunks_for(plan.pairs);
  // Padding rows of the MegaBlocks layout read pair -1 (all bytes 0xFF).
  KMOE_CUDA_CHECK(cudaMemsetAsync(plan.padded_pair, 0xFF, sizeof(std::int64_t) * plan.padded_capacity, stream));
  if (chunks > 0) {
    chunk_histogram_kernel<<<static_cast<unsigned>(chunks), kChunk, sizeof(int) * plan.experts, stream>>>(
        topk_idx, plan.pairs, plan.experts, plan.chunk_counts);
    KMOE_CUDA_CHECK_LAUNCH("chunk_histogram_kernel");
  }
  const int scan_threads = (plan.experts + 31) / 32 * 32;
  plan_scan_kernel<<<1, scan_threads, 0, stream>>>(chunks, plan.experts, plan.chunk_counts, plan.counts,
                                                   plan.offsets, plan.tile_offsets, plan.padded_offsets,
                                                   plan.padded_tile_offsets);
  KMOE_CUDA_CHECK_LAUNCH("plan_scan_kernel");
  if (chunks > 0) {
    plan_place_kernel<<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(
        topk_idx, plan.pairs, plan.experts, plan.chunk_counts, plan.offsets, plan.padded_offsets, plan.sorted_pair,
        plan.pair_row, plan.pair_padded_row, plan.padded_pair);
    KMOE_CUDA_CHECK_LAUNCH("plan_place_kernel");
  }
}

}  // namespace kmoe::core::cuda
