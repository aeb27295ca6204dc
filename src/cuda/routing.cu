// Routing on the GPU: logits on the tensor cores, then softmax -> top-k -> renormalise fused in one warp per token;
// and the backward through renormalisation and softmax.
#include "common.cuh"

#include <limits>

namespace kmoe::core::cuda {

namespace {

constexpr int kMaxExperts = 256;          // 8 logits per lane
constexpr int kPerLane = kMaxExperts / 32;
constexpr int kWarpsPerBlock = 8;

__global__ void softmax_topk_kernel(const float* __restrict__ logits, std::int64_t tokens, int experts, int k,
                                    float* __restrict__ probs, std::int64_t* __restrict__ topk_idx,
                                    float* __restrict__ topk_weight) {
  const int lane = threadIdx.x % 32;
  const std::int64_t t = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= tokens) return;
  const float* row = logits + t * experts;
  float v[kPerLane];
  float mx = -std::numeric_limits<float>::infinity();
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < experts ? row[e] : -std::numeric_limits<float>::infinity();
    mx = fmaxf(mx, v[i]);
  }
  mx = detail::warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < experts ? __expf(v[i] - mx) : 0.f;
    sum += v[i];
  }
  sum = detail::warp_sum(sum);
  const float inv = 1.f / sum;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] *= inv;
    if (probs && e < experts) probs[t * experts + e] = v[i];
  }
  // k rounds of a warp argmax over the experts not yet chosen; ties go to the lower index (torch.topk).
  unsigned taken = 0;  // bit i: this lane's expert lane + 32 i is chosen
  float my_p = 0.f;    // lane s keeps the s-th choice
  std::int64_t my_e = 0;
  float chosen_sum = 0.f;
  for (int s = 0; s < k; ++s) {
    float best = -1.f;
    int best_e = std::numeric_limits<int>::max();
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < experts && !(taken & (1u << i)) && v[i] > best) {
        best = v[i];
        best_e = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
    if (best_e % 32 == lane) taken |= 1u << (best_e / 32);
    if (lane == s) {
      my_p = best;
      my_e = best_e;
    }
    chosen_sum += best;
  }
  if (lane < k) {
    topk_idx[t * k + lane] = my_e;
    topk_weight[t * k + lane] = my_p / chosen_sum;
  }
}

/// d_logits from d_topk_weight (one warp per token); also writes d_logits as bf16 with a padded row (GEMM operand).
__global__ void routing_backward_kernel(const float* __restrict__ probs, const std::int64_t* __restrict__ topk_idx,
                                        const float* __restrict__ topk_weight, const float* __restrict__ d_topk_weight,
                                        const float* __restrict__ d_logits_add, std::int64_t tokens, int experts,
                                        int k, float* __restrict__ d_logits, bf16_t* __restrict__ dl_bf16,
                                        int ld_bf16) {
  const int lane = threadIdx.x % 32;
  const std::int64_t t = std::int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= tokens) return;
  // w_s = p_s / S (S = sum of chosen p): dL/dp_s = (dw_s - <dw, w>) / S on chosen s, 0 elsewhere;
  // softmax: dL/dl_e = p_e (dp_e - sum_j p_j dp_j).
  float sum_p = 0.f, dw_dot_w = 0.f;
  for (int s = 0; s < k; ++s) {
    sum_p += probs[t * experts + topk_idx[t * k + s]];
    dw_dot_w += d_topk_weight[t * k + s] * topk_weight[t * k + s];
  }
  float p_dot_dp = 0.f;
  for (int s = 0; s < k; ++s)
    p_dot_dp += probs[t * experts + topk_idx[t * k + s]] * (d_topk_weight[t * k + s] - dw_dot_w) / sum_p;
  for (int e = lane; e < ld_bf16; e += 32) {
    float dl = 0.f;
    if (e < experts) {
      float dp = 0.f;
      for (int s = 0; s < k; ++s)
        if (topk_idx[t * k + s] == e) dp = (d_topk_weight[t * k + s] - dw_dot_w) / sum_p;
      dl = probs[t * experts + e] * (dp - p_dot_dp);
      if (d_logits_add) dl += d_logits_add[t * experts + e];  // e.g. a router loss's gradient
      d_logits[t * experts + e] = dl;
    }
    dl_bf16[t * ld_bf16 + e] = detail::float_to_bf16(dl);
  }
}

int padded_experts(int experts) { return (experts + 7) / 8 * 8; }

void check_routing(const char* fn, std::int64_t tokens, int experts, int k) {
  KMOE_CHECK_INPUT(tokens >= 0, fn, ": tokens = ", tokens);
  KMOE_CHECK_INPUT(experts >= 1 && experts <= kMaxExperts, fn, ": ", experts, " experts (the CUDA router handles 1..",
                   kMaxExperts, ")");
  KMOE_CHECK_INPUT(k >= 1 && k <= experts && k <= 32, fn, ": top_k = ", k, " outside [1, min(", experts, ", 32)]");
}

}  // namespace

void routing_softmax_topk(const float* logits, std::int64_t tokens, int experts, int k, float* probs,
                          std::int64_t* topk_idx, float* topk_weight, cudaStream_t stream) {
  check_routing("kmoe::core::cuda::routing_softmax_topk", tokens, experts, k);
  if (tokens == 0) return;
  const std::int64_t blocks = (tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  softmax_topk_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(logits, tokens, experts, k,
                                                                                        probs, topk_idx, topk_weight);
  KMOE_CUDA_CHECK_LAUNCH("softmax_topk_kernel");
}

// The router's GEMMs (logits = x·Gᵀ, dx += d_logits·G, d_gate = d_logitsᵀ·x) have one dimension of E <= 256 and
// one GEMM each: cuBLAS (small-N and split-K kernels) rather than kmoe's 128×128-tile kernel, which ran them at
// 7–10% SM throughput — 0.28 / 0.55 / 0.75 ms per step on Mixtral T=2048, fine-grained, Mixtral T=8192 (ncu, run 25),
// the largest non-expert cost of the fine-grained step. A single group's offsets {0, T} are known on the host, so
// this waits for nothing (and stays capturable in a CUDA graph: cuBLAS 12.2+ allocates its workspace stream-ordered).
namespace {
std::vector<std::int64_t> one_group(std::int64_t rows) { return {0, rows}; }
}  // namespace

void routing_forward(const bf16_t* x, const bf16_t* gate, std::int64_t tokens, int hidden, int experts, int k,
                     float* logits, float* probs, std::int64_t* topk_idx, float* topk_weight, cudaStream_t stream) {
  check_routing("kmoe::core::cuda::routing_forward", tokens, experts, k);
  if (tokens == 0) return;
  GroupedGemmArgs g;
  g.rows = tokens;
  g.n = experts;
  g.k = hidden;
  g.a = x;
  g.lda = hidden;
  g.b_trans = true;
  g.b0 = gate;
  g.c_f32 = logits;
  g.ldc = experts;
  detail::grouped_gemm_cublas(g, one_group(tokens), CublasSettings{}, stream);
  routing_softmax_topk(logits, tokens, experts, k, probs, topk_idx, topk_weight, stream);
}

std::size_t routing_backward_workspace_bytes(std::int64_t tokens, int experts) {
  return std::size_t(tokens) * padded_experts(experts) * sizeof(bf16_t) + 256;
}

void routing_backward(const bf16_t* x, const bf16_t* gate, const float* probs, const std::int64_t* topk_idx,
                      const float* topk_weight, const float* d_topk_weight, std::int64_t tokens, int hidden,
                      int experts, int k, float* d_logits, float* d_gate, float* dx, void* work,
                      cudaStream_t stream, const float* d_logits_add) {
  check_routing("kmoe::core::cuda::routing_backward", tokens, experts, k);
  if (tokens == 0) {
    KMOE_CUDA_CHECK(cudaMemsetAsync(d_gate, 0, sizeof(float) * experts * hidden, stream));
    return;
  }
  const int ld = padded_experts(experts);
  auto* dl_bf16 = static_cast<bf16_t*>(work);
  const std::int64_t blocks = (tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  routing_backward_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      probs, topk_idx, topk_weight, d_topk_weight, d_logits_add, tokens, experts, k, d_logits, dl_bf16, ld);
  KMOE_CUDA_CHECK_LAUNCH("routing_backward_kernel");
  // dx += d_logits·G: [T,E]·[E,H]
  GroupedGemmArgs g;
  g.rows = tokens;
  g.n = hidden;
  g.k = experts;
  g.a = dl_bf16;
  g.lda = ld;
  g.b_trans = false;
  g.b0 = gate;
  g.c_f32 = dx;
  g.ldc = hidden;
  g.accumulate = true;
  detail::grouped_gemm_cublas(g, one_group(tokens), CublasSettings{}, stream);
  // d_gate = d_logitsᵀ·x: [E,T]·[T,H]
  GroupedGemmTNArgs w;
  w.rows = tokens;
  w.m = experts;
  w.n = hidden;
  w.a = dl_bf16;
  w.lda = ld;
  w.b = x;
  w.ldb = hidden;
  w.c0 = d_gate;
  detail::grouped_gemm_tn_cublas(w, one_group(tokens), CublasSettings{}, stream);
}

}  // namespace kmoe::core::cuda
