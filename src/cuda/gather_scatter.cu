// Row movement and elementwise kernels: padded/weighted gather, deterministic combine over slots (no atomics),
// combine-weight gradients, SwiGLU forward/backward. 16-byte accesses: every row holds a multiple of 8 bf16.
#include "common.cuh"

namespace kmoe::core::cuda {

namespace {

using detail::Bf16x8;

// Row kernels: a block is by rows × bx threads (bx along a row's 16-byte chunks). Each thread reads its row's index
// and weight once and then only streams chunks — no 64-bit division per chunk, which the flat-index version paid
// and which held it at 66–91% of the copy rate (perf/NOTES.md, session 2).
struct RowBlock {
  int bx, by;
};
RowBlock row_block(std::int64_t cols8) {
  int bx = 32;
  while (bx < 256 && bx < cols8) bx *= 2;
  return {bx, 256 / bx};
}
unsigned row_grid(std::int64_t rows, RowBlock b) { return detail::grid_for(rows, b.by, std::int64_t(1) << 20); }

__global__ void gather_rows_kernel(const bf16_t* __restrict__ src, std::int64_t cols8,
                                   const std::int64_t* __restrict__ index, int div, const float* __restrict__ scale,
                                   bf16_t* __restrict__ dst, std::int64_t rows) {
  for (std::int64_t r = std::int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += std::int64_t(gridDim.x) * blockDim.y) {
    const std::int64_t ix = index ? index[r] : r;
    auto* out = reinterpret_cast<Bf16x8*>(dst) + r * cols8;
    if (ix < 0) {  // padding row
      for (std::int64_t c = threadIdx.x; c < cols8; c += blockDim.x) out[c] = Bf16x8{};
      continue;
    }
    const auto* in = reinterpret_cast<const Bf16x8*>(src) + (ix / div) * cols8;
    if (!scale) {
#pragma unroll 4
      for (std::int64_t c = threadIdx.x; c < cols8; c += blockDim.x) out[c] = in[c];
      continue;
    }
    const float s = scale[ix];
#pragma unroll 4
    for (std::int64_t c = threadIdx.x; c < cols8; c += blockDim.x) {
      float v[8];
      detail::unpack8(in[c], v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] *= s;
      out[c] = detail::pack8(v);
    }
  }
}

__global__ void combine_rows_kernel(const bf16_t* __restrict__ src, std::int64_t cols8,
                                    const std::int64_t* __restrict__ row_map, const float* __restrict__ w,
                                    std::int64_t tokens, int k, bf16_t* __restrict__ out_bf16,
                                    float* __restrict__ out_f32, bool accumulate) {
  for (std::int64_t t = std::int64_t(blockIdx.x) * blockDim.y + threadIdx.y; t < tokens;
       t += std::int64_t(gridDim.x) * blockDim.y) {
    for (std::int64_t c = threadIdx.x; c < cols8; c += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      // Unrolled so the k slots' loads are in flight together (run 23: rolled, combine_bf16 reached 0.87-0.94 of
      // the copy rate). The row map and weights of token t stay in L1 across its chunks.
#pragma unroll 4
      for (int s = 0; s < k; ++s) {
        const std::int64_t p = t * k + s;
        const float ws = w ? w[p] : 1.f;
        float v[8];
        detail::unpack8(reinterpret_cast<const Bf16x8*>(src)[(row_map ? row_map[p] : p) * cols8 + c], v);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += ws * v[e];
      }
      const std::int64_t o8 = t * cols8 + c;
      if (out_bf16) {
        if (accumulate) {
          float old[8];
          detail::unpack8(reinterpret_cast<const Bf16x8*>(out_bf16)[o8], old);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] += old[e];
        }
        reinterpret_cast<Bf16x8*>(out_bf16)[o8] = detail::pack8(acc);
      } else {
        auto* o = reinterpret_cast<float4*>(out_f32 + o8 * 8);
        float4 a = make_float4(acc[0], acc[1], acc[2], acc[3]), b = make_float4(acc[4], acc[5], acc[6], acc[7]);
        if (accumulate) {
          const float4 oa = o[0], ob = o[1];
          a.x += oa.x; a.y += oa.y; a.z += oa.z; a.w += oa.w;
          b.x += ob.x; b.y += ob.y; b.z += ob.z; b.w += ob.w;
        }
        o[0] = a;
        o[1] = b;
      }
    }
  }
}

constexpr int kDotWarps = 8;

__global__ void pair_dot_kernel(const bf16_t* __restrict__ dy, const bf16_t* __restrict__ src, std::int64_t cols8,
                                const std::int64_t* __restrict__ row_map, std::int64_t pairs, int k,
                                float* __restrict__ d_w) {
  const int lane = threadIdx.x % 32;
  const std::int64_t p = std::int64_t(blockIdx.x) * kDotWarps + threadIdx.x / 32;
  if (p >= pairs) return;
  const std::int64_t t = p / k, row = row_map ? row_map[p] : p;
  const auto* a = reinterpret_cast<const Bf16x8*>(dy) + t * cols8;
  const auto* b = reinterpret_cast<const Bf16x8*>(src) + row * cols8;
  float acc = 0.f;
#pragma unroll 4
  for (std::int64_t c = lane; c < cols8; c += 32) {
    float va[8], vb[8];
    detail::unpack8(a[c], va);
    detail::unpack8(b[c], vb);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += va[e] * vb[e];
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) d_w[p] = acc;
}

__global__ void swiglu_forward_kernel(const bf16_t* __restrict__ h13, std::int64_t rows, std::int64_t ffn8,
                                      bf16_t* __restrict__ act) {
  const std::int64_t items = rows * ffn8;
  for (std::int64_t it = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; it < items;
       it += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = it / ffn8, c = it % ffn8;
    const auto* row = reinterpret_cast<const Bf16x8*>(h13) + r * 2 * ffn8;
    float h1[8], h3[8], o[8];
    detail::unpack8(row[c], h1);
    detail::unpack8(row[ffn8 + c], h3);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = detail::swiglu(h1[e], h3[e]);
    reinterpret_cast<Bf16x8*>(act)[r * ffn8 + c] = detail::pack8(o);
  }
}

// dh13 may be h13 (the expert MLP backward runs it in place): each thread reads an element's h1, h3 before it writes that
// element's dh1, dh3 and touches no other, so h13 and dh13 carry no __restrict__.
__global__ void swiglu_backward_kernel(const bf16_t* h13, const bf16_t* __restrict__ d_act, std::int64_t rows,
                                       std::int64_t ffn8, bf16_t* dh13) {
  const std::int64_t items = rows * ffn8;
  for (std::int64_t it = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; it < items;
       it += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = it / ffn8, c = it % ffn8;
    const auto* row = reinterpret_cast<const Bf16x8*>(h13) + r * 2 * ffn8;
    float h1[8], h3[8], da[8], d1[8], d3[8];
    detail::unpack8(row[c], h1);
    detail::unpack8(row[ffn8 + c], h3);
    detail::unpack8(reinterpret_cast<const Bf16x8*>(d_act)[r * ffn8 + c], da);
#pragma unroll
    for (int e = 0; e < 8; ++e) detail::swiglu_grad(h1[e], h3[e], da[e], d1[e], d3[e]);
    auto* out = reinterpret_cast<Bf16x8*>(dh13) + r * 2 * ffn8;
    out[c] = detail::pack8(d1);
    out[ffn8 + c] = detail::pack8(d3);
  }
}

void check_cols(const char* fn, std::int64_t cols) {
  KMOE_CHECK_INPUT(cols > 0 && cols % 8 == 0, fn, ": rows of ", cols, " values (the CUDA kernels need a multiple of 8)");
}

constexpr int kThreads = 256;

}  // namespace

void gather_rows(const bf16_t* src, std::int64_t cols, const std::int64_t* index, int div, const float* scale,
                 bf16_t* dst, std::int64_t rows, cudaStream_t stream) {
  check_cols("kmoe::core::cuda::gather_rows", cols);
  if (rows == 0) return;
  const RowBlock b = row_block(cols / 8);
  gather_rows_kernel<<<row_grid(rows, b), dim3(b.bx, b.by), 0, stream>>>(src, cols / 8, index, div, scale, dst, rows);
  KMOE_CUDA_CHECK_LAUNCH("gather_rows_kernel");
}

void combine_rows(const bf16_t* src, std::int64_t cols, const std::int64_t* row_map, const float* w,
                  std::int64_t tokens, int k, bf16_t* out_bf16, float* out_f32, bool accumulate, cudaStream_t stream) {
  check_cols("kmoe::core::cuda::combine_rows", cols);
  KMOE_CHECK_INPUT((out_bf16 == nullptr) != (out_f32 == nullptr),
                   "kmoe::core::cuda::combine_rows: give exactly one of out_bf16 / out_f32");
  if (tokens == 0) return;
  const RowBlock b = row_block(cols / 8);
  combine_rows_kernel<<<row_grid(tokens, b), dim3(b.bx, b.by), 0, stream>>>(src, cols / 8, row_map, w, tokens, k,
                                                                            out_bf16, out_f32, accumulate);
  KMOE_CUDA_CHECK_LAUNCH("combine_rows_kernel");
}

void pair_dot(const bf16_t* dy, const bf16_t* src, std::int64_t cols, const std::int64_t* row_map, std::int64_t tokens,
              int k, float* d_w, cudaStream_t stream) {
  check_cols("kmoe::core::cuda::pair_dot", cols);
  const std::int64_t pairs = tokens * k;
  if (pairs == 0) return;
  pair_dot_kernel<<<static_cast<unsigned>((pairs + kDotWarps - 1) / kDotWarps), kDotWarps * 32, 0, stream>>>(
      dy, src, cols / 8, row_map, pairs, k, d_w);
  KMOE_CUDA_CHECK_LAUNCH("pair_dot_kernel");
}

void swiglu_forward(const bf16_t* h13, std::int64_t rows, std::int64_t ffn, bf16_t* act, cudaStream_t stream) {
  check_cols("kmoe::core::cuda::swiglu_forward", ffn);
  if (rows == 0) return;
  swiglu_forward_kernel<<<detail::grid_for(rows * (ffn / 8), kThreads), kThreads, 0, stream>>>(h13, rows, ffn / 8,
                                                                                               act);
  KMOE_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
}

void swiglu_backward(const bf16_t* h13, const bf16_t* d_act, std::int64_t rows, std::int64_t ffn, bf16_t* dh13,
                     cudaStream_t stream) {
  check_cols("kmoe::core::cuda::swiglu_backward", ffn);
  if (rows == 0) return;
  swiglu_backward_kernel<<<detail::grid_for(rows * (ffn / 8), kThreads), kThreads, 0, stream>>>(h13, d_act, rows,
                                                                                                ffn / 8, dh13);
  KMOE_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
}

}  // namespace kmoe::core::cuda
