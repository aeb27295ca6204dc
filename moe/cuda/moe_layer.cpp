// MoeLayer<bf16, Kokkos::Cuda>: the MoE block composed once from kmoe's CUDA primitives (core/cuda/kernels.hpp, an
// internal header), for one GPU and under expert parallelism. The Kokkos side checks shapes, owns the workspaces and
// passes view.data() and the space's stream; the policy (engine, workspace, saved state) lives here.
#include <kmoe/moe/cuda/moe_layer.hpp>

#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/cutlass_grouped.hpp>
#include <kmoe/core/cuda/kernels.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace kmoe::moe {

namespace kc = core::cuda;
static_assert(detail::kCudaPaddedTileRows == kc::kGemmTileRows, "the options check and the CUDA block disagree");
static_assert(sizeof(bf16) == sizeof(kc::bf16_t), "kmoe::bf16 is the bf16 bit pattern");

namespace {

const kc::bf16_t* bits(const bf16* p) { return reinterpret_cast<const kc::bf16_t*>(p); }
kc::bf16_t* bits(bf16* p) { return reinterpret_cast<kc::bf16_t*>(p); }

/// The one mapping of the layer's engine choice onto the primitives' engine.
kc::GemmEngine engine_of(detail::CudaEngine e) {
  switch (e) {
    case detail::CudaEngine::Kernel: return kc::GemmEngine::Kernel;
    case detail::CudaEngine::Cublas: return kc::GemmEngine::Cublas;
    case detail::CudaEngine::Cutlass: return kc::GemmEngine::Cutlass;
    case detail::CudaEngine::Auto: break;
  }
  return kc::GemmEngine::Auto;
}

const char* engine_name(kc::GemmEngine e) {
  switch (e) {
    case kc::GemmEngine::Cublas: return "cublas";
    case kc::GemmEngine::Cutlass: return "cutlass";
    case kc::GemmEngine::Kernel: return "kernel";
    case kc::GemmEngine::Auto: break;
  }
  return "";
}

template <class V>
void check_contiguous(const char* fn, const char* what, const V& v) {
  KMOE_CHECK_INPUT(v.span_is_contiguous(), fn, ": ", what,
                   " is not contiguous (the CUDA kernels take contiguous row-major Views)");
}

/// An unmanaged device View over n elements at p (the workspace's arrays as Routing's Views).
template <class V, class P, class... N>
V over(P* p, N... n) {
  return V(p, static_cast<std::size_t>(n)...);
}

std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }

/// Carves 256-byte aligned pieces from a buffer, or (base nullptr) only counts their bytes.
class Carver {
 public:
  explicit Carver(void* base = nullptr) : at_(static_cast<unsigned char*>(base)) {}
  template <class T>
  T* take(std::int64_t elems) {
    const std::size_t bytes = align256(sizeof(T) * static_cast<std::size_t>(std::max<std::int64_t>(elems, 0)));
    T* p = at_ ? reinterpret_cast<T*>(at_ + used_) : nullptr;
    used_ += bytes;
    return p;
  }
  void* take_bytes(std::size_t bytes) { return take<unsigned char>(static_cast<std::int64_t>(bytes)); }
  std::size_t used() const { return used_; }

 private:
  unsigned char* at_;
  std::size_t used_ = 0;
};

/// A device buffer that grows (never shrinks); growing is the only allocation (and so the only implicit
/// synchronisation) of a training loop whose shapes repeat.
using DeviceBytes = Kokkos::View<unsigned char*, Kokkos::CudaSpace>;
/// Makes `buffer` hold at least `bytes` from its 256-byte aligned start (Kokkos' allocation header leaves the data
/// 128-byte aligned; the carved tensors start on 256 bytes like cudaMalloc's).
void ensure(DeviceBytes& buffer, std::size_t bytes, const char* label) {
  if (buffer.extent(0) >= bytes + 256) return;
  buffer = DeviceBytes();
  buffer = DeviceBytes(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), bytes + 256);
}
void* aligned_start(const DeviceBytes& buffer) {
  const auto p = reinterpret_cast<std::uintptr_t>(buffer.data());
  return reinterpret_cast<void*>((p + 255) / 256 * 256);
}

}  // namespace

namespace detail {

/// The block's workspaces and the state one forward leaves for its backward. One forward serves one backward: the
/// backward writes its [R,·] intermediates over the forward's saved buffers as each dies (workspace 3F+2H bf16 per
/// row, perf/NOTES.md).
class CudaBlock {
 public:
  CudaBlock(const MoeWeights<bf16, Kokkos::Cuda>& w, const MoeOptions& options)
      : opt_(cuda_block_options(options)),
        hidden_(static_cast<int>(w.hidden())),
        ffn_(static_cast<int>(w.ffn())),
        experts_(static_cast<int>(w.num_experts())),
        local_experts_(static_cast<int>(w.num_local_experts())),
        first_expert_(w.first_expert),
        k_(static_cast<int>(options.top_k)),
        shared_ffn_(static_cast<int>(w.shared_ffn())) {
    constexpr const char* fn = "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>";
    KMOE_CHECK_INPUT(experts_ <= 256, fn, ": ", experts_, " experts (the fused CUDA routing kernel takes at most 256)");
    KMOE_CHECK_INPUT(hidden_ % 8 == 0 && ffn_ % 8 == 0 && shared_ffn_ % 8 == 0, fn, ": hidden ", hidden_, ", ffn ",
                     ffn_, " and shared ffn ", shared_ffn_, " must be multiples of 8 (16-byte rows)");
    KMOE_CHECK_INPUT(k_ >= 1 && k_ <= experts_ && k_ <= 32, fn, ": top_k = ", k_, " outside [1, min(", experts_,
                     ", 32)]");
    if (opt_.engine == CudaEngine::Cutlass)
      KMOE_CHECK_USAGE(kc::cutlass_grouped_available(), fn, ": gemm = Cutlass needs a build with KMOE_ENABLE_CUTLASS "
                       "and a Hopper (sm_90) device");
  }

  ~CudaBlock() {
    if (counts_ready_) cudaEventDestroy(counts_ready_);
  }
  CudaBlock(const CudaBlock&) = delete;
  CudaBlock& operator=(const CudaBlock&) = delete;

  const CudaBlockOptions& options() const { return opt_; }
  std::int64_t tokens() const { return tokens_; }
  const kc::DispatchPlan& plan() const { return plan_; }
  float* logits() const { return logits_; }
  float* probs() const { return probs_; }
  std::int64_t* topk_idx() const { return topk_idx_; }
  float* topk_weight() const { return topk_weight_; }
  const char* engine() const { return engine_name(mlp_.engine); }
  bool consumed() const { return consumed_; }
  /// The next forward's token count.
  void forward_tokens(std::int64_t tokens) { tokens_ = tokens; }

  void forward(const kc::bf16_t* x, const MoeWeights<bf16, Kokkos::Cuda>& w, kc::bf16_t* y, ExpertExchange* ex,
               const Kokkos::Cuda& space);
  /// expert_grads: bf16 storage of the expert weight gradients instead of out.grads.w1/w3/w2 (nullptr: fp32).
  void backward(const kc::bf16_t* x, const MoeWeights<bf16, Kokkos::Cuda>& w, const kc::bf16_t* dy,
                const MoeBackward<bf16, Kokkos::Cuda>& out,
                const MoeLayer<bf16, Kokkos::Cuda>::Bf16ExpertGrads* expert_grads, const float* d_logits_add,
                ExpertExchange* ex, const Kokkos::Cuda& space);
  std::size_t workspace_bytes() const { return work_.extent(0) + local_work_.extent(0); }

 private:
  std::int64_t pairs() const { return tokens_ * k_; }
  /// Lays out the token-side buffers for T tokens (routing, plan, gathered rows, shared expert, backward scratch) in
  /// work_; `rows` = the rows of the gathered buffer (the expert rows on one GPU, the send buffer under EP).
  void carve_tokens(std::int64_t rows, bool expert_rows_here);
  /// Expert parallelism: the count exchange and the local, expert-major layout of the received rows.
  void plan_exchange(ExpertExchange& ex, const Kokkos::Cuda& space);
  kc::ExpertMlp shared_mlp(const MoeWeights<bf16, Kokkos::Cuda>& w) const;

  CudaBlockOptions opt_;
  int hidden_, ffn_, experts_, local_experts_;
  std::int64_t first_expert_;
  int k_, shared_ffn_;

  DeviceBytes work_, local_work_;
  Kokkos::View<std::int64_t*, Kokkos::CudaHostPinnedSpace> pinned_;  // counts down, local offsets up
  cudaEvent_t counts_ready_ = nullptr;                                // the counts' copy has landed
  // The last forward.
  std::int64_t tokens_ = 0, rows_ = 0;  // rows_: rows the expert MLP ran on
  bool exchanged_ = false, indexed_ = false;
  kc::DispatchPlan plan_{};
  float *logits_ = nullptr, *probs_ = nullptr, *topk_weight_ = nullptr;
  std::int64_t* topk_idx_ = nullptr;
  kc::bf16_t *gathered_ = nullptr;  // [P or padded, H]: x in expert order (one GPU) / the send buffer (EP)
  kc::bf16_t *rows_x_ = nullptr;    // the rows the experts read (gathered_, or the receive buffer under EP)
  kc::bf16_t *h13_ = nullptr, *act_ = nullptr, *out_ = nullptr;  // [rows_, 2F], [rows_, F], [rows_, H]
  kc::bf16_t *shared_h13_ = nullptr, *shared_act_ = nullptr;
  float *d_w_ = nullptr, *d_logits_ = nullptr;
  void* route_work_ = nullptr;
  void* cutlass_work_ = nullptr;
  kc::ExpertMlp mlp_{};
  std::vector<std::int64_t> host_offsets_;  // [groups+1] rows of the GEMM groups (cuBLAS engine, EP layout)
  const std::int64_t* combine_map_ = nullptr;  // pair -> row of the expert outputs the combine reads
  kc::bf16_t* combine_rows_ = nullptr;
  // Expert parallelism: this rank's counts, everyone's, the blocks of both directions.
  std::vector<std::int64_t> counts_, all_counts_;
  std::vector<ExpertExchange::Block> sends_, recvs_;
  bool consumed_ = false;
};

void CudaBlock::carve_tokens(std::int64_t rows, bool expert_rows_here) {
  const std::int64_t T = tokens_, P = pairs(), E = experts_, H = hidden_, F = ffn_, S = shared_ffn_;
  auto lay = [&](Carver& c) {
    plan_ = kc::dispatch_plan_carve(c.take_bytes(kc::dispatch_plan_bytes(T, experts_, k_)), T, experts_, k_);
    logits_ = c.take<float>(T * E);
    probs_ = c.take<float>(T * E);
    topk_idx_ = c.take<std::int64_t>(P);
    topk_weight_ = c.take<float>(P);
    gathered_ = c.take<kc::bf16_t>(rows * H);
    if (expert_rows_here) {
      h13_ = c.take<kc::bf16_t>(rows * 2 * F);
      act_ = c.take<kc::bf16_t>(rows * F);
      out_ = c.take<kc::bf16_t>(rows * H);
    }
    shared_h13_ = c.take<kc::bf16_t>(T * 3 * S);
    shared_act_ = shared_h13_ ? shared_h13_ + T * 2 * S : nullptr;
    d_w_ = c.take<float>(P);
    d_logits_ = c.take<float>(T * E);
    route_work_ = c.take_bytes(kc::routing_backward_workspace_bytes(T, experts_));
    cutlass_work_ = c.take_bytes(kc::cutlass_grouped_workspace_bytes(std::max(experts_, local_experts_)));
  };
  Carver count;
  lay(count);
  ensure(work_, count.used(), "kmoe::moe::cuda_workspace");
  Carver carve(aligned_start(work_));
  lay(carve);
}

kc::ExpertMlp CudaBlock::shared_mlp(const MoeWeights<bf16, Kokkos::Cuda>& w) const {
  kc::ExpertMlp s;  // one group over all tokens, on kmoe's kernel (SwiGLU fused unless switched off)
  s.rows = tokens_;
  s.hidden = hidden_;
  s.ffn = shared_ffn_;
  s.engine = kc::GemmEngine::Kernel;
  s.fuse_swiglu = opt_.fuse_swiglu;
  s.w1 = bits(w.shared_w1.data());
  s.w3 = bits(w.shared_w3.data());
  s.w2 = bits(w.shared_w2.data());
  return s;
}

void CudaBlock::plan_exchange(ExpertExchange& ex, const Kokkos::Cuda& space) {
  const int peers = ex.size();
  const std::int64_t E = experts_, T = tokens_;
  counts_.assign(E, 0);
  if (T > 0) {
    // The one wait of the expert-parallel forward: the E counts copied right after the plan (the gather and the
    // shared expert enqueued since keep the GPU busy meanwhile).
    KMOE_CUDA_CHECK(cudaEventSynchronize(counts_ready_));
    std::copy(pinned_.data(), pinned_.data() + E, counts_.begin());
  }
  all_counts_.assign(std::size_t(peers) * E, 0);
  ex.exchange_counts(counts_.data(), E, all_counts_.data());
  // Send blocks: this rank's sorted rows are destination-major (owners hold increasing expert ranges): one block per
  // expert, straight from the gather buffer.
  sends_.clear();
  std::int64_t at = 0;
  for (std::int64_t e = 0; e < E; ++e) {
    if (counts_[e] > 0) sends_.push_back({ex.owner_of(e), at, counts_[e]});
    at += counts_[e];
  }
  // Receive blocks: local expert j's rows from source 0, 1, ... land contiguously (expert-major, padded to the GEMM
  // tile on the padded path), so the grouped GEMMs read the receive buffer in place.
  recvs_.clear();
  const std::int64_t G = local_experts_, tile = kc::kGemmTileRows;
  host_offsets_.assign(G + 1, 0);
  std::vector<std::int64_t> tiles(G + 1, 0);
  for (std::int64_t j = 0; j < G; ++j) {
    std::int64_t n = 0;
    for (int q = 0; q < peers; ++q) {
      const std::int64_t c = all_counts_[std::size_t(q) * E + first_expert_ + j];
      if (c > 0) recvs_.push_back({q, host_offsets_[j] + n, c});
      n += c;
    }
    const std::int64_t span = opt_.padded ? (n + tile - 1) / tile * tile : n;
    host_offsets_[j + 1] = host_offsets_[j] + span;
    tiles[j + 1] = tiles[j] + (n + tile - 1) / tile;
  }
  rows_ = host_offsets_[G];
  // The local layout's buffers, grown with slack: the received rows change from step to step.
  const std::int64_t R = std::max<std::int64_t>(rows_, 1), H = hidden_, F = ffn_;
  auto lay = [&](Carver& c) {
    rows_x_ = c.take<kc::bf16_t>(R * H);
    h13_ = c.take<kc::bf16_t>(R * 2 * F);
    act_ = c.take<kc::bf16_t>(R * F);
    out_ = c.take<kc::bf16_t>(R * H);
    mlp_.offsets = c.take<std::int64_t>(G + 1);
    mlp_.tile_offsets = c.take<std::int64_t>(G + 1);
  };
  Carver count;
  lay(count);
  if (local_work_.extent(0) < count.used() + 256)
    ensure(local_work_, count.used() + count.used() / 4, "kmoe::moe::cuda_ep_workspace");
  Carver carve(aligned_start(local_work_));
  lay(carve);
  // Offsets and tile offsets of the local groups to the device (the kernel and CUTLASS engines read them there).
  std::int64_t* up = pinned_.data() + E;
  std::copy(host_offsets_.begin(), host_offsets_.end(), up);
  std::copy(tiles.begin(), tiles.end(), up + G + 1);
  KMOE_CUDA_CHECK(cudaMemcpyAsync(const_cast<std::int64_t*>(mlp_.offsets), up, sizeof(std::int64_t) * (G + 1),
                                  cudaMemcpyHostToDevice, space.cuda_stream()));
  KMOE_CUDA_CHECK(cudaMemcpyAsync(const_cast<std::int64_t*>(mlp_.tile_offsets), up + G + 1,
                                  sizeof(std::int64_t) * (G + 1), cudaMemcpyHostToDevice, space.cuda_stream()));
  if (opt_.padded && rows_ > 0)  // padding rows must read as zeros (the weight-gradient GEMMs sum over them)
    KMOE_CUDA_CHECK(cudaMemsetAsync(rows_x_, 0, sizeof(kc::bf16_t) * rows_ * H, space.cuda_stream()));
}

void CudaBlock::forward(const kc::bf16_t* x, const MoeWeights<bf16, Kokkos::Cuda>& w, kc::bf16_t* y,
                        ExpertExchange* ex, const Kokkos::Cuda& space) {
  cudaStream_t stream = space.cuda_stream();
  const std::int64_t T = tokens_, P = pairs(), H = hidden_;
  const bool padded = opt_.padded;
  // A group of one rank exchanges nothing: its block is the one-GPU block (every expert is local).
  if (ex && ex->size() == 1) ex = nullptr;
  exchanged_ = ex != nullptr;
  consumed_ = false;
  mlp_ = kc::ExpertMlp{};
  mlp_.hidden = hidden_;
  mlp_.ffn = ffn_;
  mlp_.fuse_swiglu = opt_.fuse_swiglu;
  mlp_.cublas.streams = opt_.cublas_streams;
  mlp_.cublas.grouped = opt_.cublas_grouped;
  mlp_.w1 = bits(w.w1.data());
  mlp_.w3 = bits(w.w3.data());
  mlp_.w2 = bits(w.w2.data());

  // Rows of the gathered buffer: the expert rows on one GPU (padded capacity on the padded path), the send buffer
  // (pairs, sorted) under expert parallelism.
  const std::int64_t one_gpu_rows = padded ? P + std::int64_t(experts_) * (kc::kGemmTileRows - 1) : P;
  carve_tokens(ex ? P : one_gpu_rows, ex == nullptr);
  mlp_.cutlass_work = cutlass_work_;
  if (T > 0) {
    kc::routing_forward(x, bits(w.router.data()), T, hidden_, experts_, k_, logits_, probs_, topk_idx_, topk_weight_,
                        stream);
    kc::dispatch_plan_build(topk_idx_, plan_, stream);
  }
  if (!ex) {
    rows_ = one_gpu_rows;
    if (T == 0) return;
    mlp_.groups = experts_;
    mlp_.rows = rows_;
    mlp_.offsets = padded ? plan_.padded_offsets : plan_.offsets;
    mlp_.tile_offsets = padded ? plan_.padded_tile_offsets : plan_.tile_offsets;
    mlp_.engine = kc::resolve_gemm_engine(engine_of(opt_.engine), P / experts_, ffn_, hidden_);
    if (mlp_.engine == kc::GemmEngine::Cublas) {  // the one host synchronisation of this engine: the group offsets
      host_offsets_.resize(experts_ + 1);
      KMOE_CUDA_CHECK(cudaMemcpyAsync(host_offsets_.data(), mlp_.offsets, sizeof(std::int64_t) * (experts_ + 1),
                                      cudaMemcpyDeviceToHost, stream));
      KMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
      mlp_.host_offsets = &host_offsets_;
    }
    // ScatterMoE on kmoe's kernel: token rows read through the plan, outputs written in pair order (no gathered copy).
    // Otherwise x in expert order: padded blocks (MegaBlocks) or sorted rows for the library engines.
    indexed_ = !padded && mlp_.engine == kc::GemmEngine::Kernel;
    if (indexed_) {
      mlp_.row_index = plan_.sorted_pair;
      mlp_.row_div = k_;
      rows_x_ = const_cast<kc::bf16_t*>(x);
    } else {
      kc::gather_rows(x, H, padded ? plan_.padded_pair : plan_.sorted_pair, k_, nullptr, gathered_, rows_, stream);
      rows_x_ = gathered_;
    }
    kc::expert_mlp_forward(mlp_, rows_x_, h13_, act_, out_, stream);
    combine_rows_ = out_;
    combine_map_ = padded ? plan_.pair_padded_row : indexed_ ? nullptr : plan_.pair_row;
  } else {
    indexed_ = false;
    const std::size_t pinned_elems = std::size_t(experts_) + 2 * (std::size_t(local_experts_) + 1);
    if (pinned_.extent(0) < pinned_elems)
      pinned_ = decltype(pinned_)(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::moe::pinned")),
                                  pinned_elems);
    if (T > 0) {
      KMOE_CUDA_CHECK(cudaMemcpyAsync(pinned_.data(), plan_.counts, sizeof(std::int64_t) * experts_,
                                      cudaMemcpyDeviceToHost, stream));
      if (!counts_ready_) KMOE_CUDA_CHECK(cudaEventCreateWithFlags(&counts_ready_, cudaEventDisableTiming));
      KMOE_CUDA_CHECK(cudaEventRecord(counts_ready_, stream));
      kc::gather_rows(x, H, plan_.sorted_pair, k_, nullptr, gathered_, P, stream);  // the send buffer
    }
    // The shared expert writes y now, overlapping the count copy; the combine adds the routed experts later.
    if (shared_ffn_ > 0 && T > 0) kc::expert_mlp_forward(shared_mlp(w), x, shared_h13_, shared_act_, y, stream);
    plan_exchange(*ex, space);
    mlp_.groups = local_experts_;
    mlp_.rows = rows_;
    std::int64_t received = 0;
    for (std::int64_t j = 0; j < local_experts_; ++j)
      for (int q = 0; q < ex->size(); ++q) received += all_counts_[std::size_t(q) * experts_ + first_expert_ + j];
    mlp_.engine = kc::resolve_gemm_engine(engine_of(opt_.engine), received / local_experts_, ffn_, hidden_);
    mlp_.host_offsets = &host_offsets_;
    ex->exchange_rows(space, gathered_, sends_, rows_x_, recvs_, H);
    kc::expert_mlp_forward(mlp_, rows_x_, h13_, act_, out_, stream);
    // Outputs back into the send buffer (free again), in the sorted order of this rank's pairs.
    ex->exchange_rows(space, out_, recvs_, gathered_, sends_, H);
    combine_rows_ = gathered_;
    combine_map_ = plan_.pair_row;
    if (T == 0) return;
    kc::combine_rows(combine_rows_, H, combine_map_, topk_weight_, T, k_, y, nullptr, shared_ffn_ > 0, stream);
    return;
  }
  // The shared expert writes y first; the routed experts' combine adds to it.
  if (shared_ffn_ > 0) kc::expert_mlp_forward(shared_mlp(w), x, shared_h13_, shared_act_, y, stream);
  kc::combine_rows(combine_rows_, H, combine_map_, topk_weight_, T, k_, y, nullptr, shared_ffn_ > 0, stream);
}

void CudaBlock::backward(const kc::bf16_t* x, const MoeWeights<bf16, Kokkos::Cuda>& w, const kc::bf16_t* dy,
                         const MoeBackward<bf16, Kokkos::Cuda>& out,
                         const MoeLayer<bf16, Kokkos::Cuda>::Bf16ExpertGrads* expert_grads,
                         const float* d_logits_add, ExpertExchange* ex, const Kokkos::Cuda& space) {
  cudaStream_t stream = space.cuda_stream();
  const std::int64_t T = tokens_, P = pairs(), H = hidden_;
  const bool padded = opt_.padded;
  if (!exchanged_) ex = nullptr;  // the forward ran as one GPU's block (one rank, or no exchange)
  consumed_ = true;
  kc::ExpertMlpGrads g;
  if (expert_grads) {
    g.dw1_bf16 = bits(expert_grads->w1.data());
    g.dw3_bf16 = bits(expert_grads->w3.data());
    g.dw2_bf16 = bits(expert_grads->w2.data());
  } else {
    g.dw1 = out.grads.w1.data();
    g.dw3 = out.grads.w3.data();
    g.dw2 = out.grads.w2.data();
  }
  float* dx = out.dx.data();
  auto zero = [&](const auto& v) {
    using V = typename std::decay_t<decltype(v)>::value_type;
    if (v.size() > 0) KMOE_CUDA_CHECK(cudaMemsetAsync(v.data(), 0, sizeof(V) * v.size(), stream));
  };
  if (T == 0) {  // no tokens of this rank: router and shared gradients are zero
    zero(out.grads.router);
    zero(out.grads.shared_w1);
    zero(out.grads.shared_w3);
    zero(out.grads.shared_w2);
    if (!ex) {
      if (expert_grads) {
        zero(expert_grads->w1);
        zero(expert_grads->w3);
        zero(expert_grads->w2);
      } else {
        zero(out.grads.w1);
        zero(out.grads.w3);
        zero(out.grads.w2);
      }
      return;
    }
  }
  // y = Σ_s w_s out_s: d w_s = <dy, out_s>; d out_s = w_s dy, laid out like the expert rows.
  if (T > 0) kc::pair_dot(dy, combine_rows_, H, combine_map_, T, k_, d_w_, stream);
  if (!ex) {
    // d_out over out (dead after pair_dot), dx rows over the gathered x (dead after the weight gradients read it).
    kc::gather_rows(dy, H, padded ? plan_.padded_pair : plan_.sorted_pair, k_, topk_weight_, out_, rows_, stream);
    g.dx_rows = gathered_;
    kc::expert_mlp_backward(mlp_, rows_x_, h13_, act_, out_, g, stream);
    kc::combine_rows(gathered_, H, combine_map_, nullptr, T, k_, nullptr, dx, false, stream);
  } else {
    // d_out to the experts' ranks (from the send buffer, dead after pair_dot), dx rows back the same way.
    if (T > 0) kc::gather_rows(dy, H, plan_.sorted_pair, k_, topk_weight_, gathered_, P, stream);
    if (padded && rows_ > 0) KMOE_CUDA_CHECK(cudaMemsetAsync(out_, 0, sizeof(kc::bf16_t) * rows_ * H, stream));
    ex->exchange_rows(space, gathered_, sends_, out_, recvs_, H);
    g.dx_rows = rows_x_;
    kc::expert_mlp_backward(mlp_, rows_x_, h13_, act_, out_, g, stream);
    ex->exchange_rows(space, rows_x_, recvs_, gathered_, sends_, H);
    if (T == 0) return;
    kc::combine_rows(gathered_, H, plan_.pair_row, nullptr, T, k_, nullptr, dx, false, stream);
  }
  if (shared_ffn_ > 0) {
    kc::ExpertMlpGrads sg;
    sg.dw1 = out.grads.shared_w1.data();
    sg.dw3 = out.grads.shared_w3.data();
    sg.dw2 = out.grads.shared_w2.data();
    sg.dx_f32 = dx;
    kc::expert_mlp_backward(shared_mlp(w), x, shared_h13_, shared_act_, dy, sg, stream);
  }
  kc::routing_backward(x, bits(w.router.data()), probs_, topk_idx_, topk_weight_, d_w_, T, hidden_, experts_, k_,
                       d_logits_, out.grads.router.data(), dx, route_work_, stream, d_logits_add);
}

}  // namespace detail

// ---- the layer ---------------------------------------------------------------------------------------------------

MoeLayer<bf16, Kokkos::Cuda>::MoeLayer(MoeWeights<bf16, Kokkos::Cuda> weights, MoeOptions options, Kokkos::Cuda space)
    : weights_(std::move(weights)), options_(options), space_(space) {
  constexpr const char* fn = "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>";
  detail::check_layer_arguments(weights_, options_);
  for_each_weight_pair(weights_, weights_, [&](const auto& v, const auto&, const char* name) {
    check_contiguous(fn, name, v);
  });
  block_ = std::make_shared<detail::CudaBlock>(weights_, options_);
}

const char* MoeLayer<bf16, Kokkos::Cuda>::forward_region() const {
  return block_->options().padded ? "kmoe::moe::forward[cuda,padded]" : "kmoe::moe::forward[cuda,scattered]";
}

const char* MoeLayer<bf16, Kokkos::Cuda>::gemm_engine() const { return have_forward_ ? block_->engine() : ""; }

std::size_t MoeLayer<bf16, Kokkos::Cuda>::workspace_bytes() const { return block_->workspace_bytes(); }

MoeLayer<bf16, Kokkos::Cuda>::matrix MoeLayer<bf16, Kokkos::Cuda>::forward(const_matrix x) {
  matrix y(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::moe::y")), x.extent(0), x.extent(1));
  forward(x, y);
  return y;
}

void MoeLayer<bf16, Kokkos::Cuda>::forward(const_matrix x, matrix y) {
  detail::check_all_experts_local(weights_);
  forward_impl(x, y, nullptr);
}

void MoeLayer<bf16, Kokkos::Cuda>::forward(const_matrix x, matrix y, ExpertExchange& exchange) {
  forward_impl(x, y, &exchange);
}

void MoeLayer<bf16, Kokkos::Cuda>::forward_impl(const_matrix x, matrix y, ExpertExchange* exchange) {
  constexpr const char* fn = "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::forward";
  KMOE_CHECK_INPUT(std::int64_t(x.extent(1)) == weights_.hidden(), fn, ": x is [", x.extent(0), ",", x.extent(1),
                   "], expected [tokens, ", weights_.hidden(), "]");
  detail::check_matrix(fn, "y", y, x.extent(0), x.extent(1));
  check_contiguous(fn, "x", x);
  check_contiguous(fn, "y", y);
  Kokkos::Profiling::pushRegion(exchange ? (block_->options().padded ? "kmoe::moe::forward[cuda,padded,ep]"
                                                                      : "kmoe::moe::forward[cuda,scattered,ep]")
                                         : forward_region());
  have_forward_ = false;
  plan_on_host_ = false;
  x_ = x;
  block_->forward_tokens(x.extent(0));
  block_->forward(bits(x.data()), weights_, bits(y.data()), exchange, space_);
  forward_exchanged_ = exchange != nullptr;
  expose_routing();
  have_forward_ = true;
  Kokkos::Profiling::popRegion();
}

void MoeLayer<bf16, Kokkos::Cuda>::expose_routing() {
  using value_matrix = Routing<bf16, Kokkos::Cuda>::value_matrix;
  using index_matrix = views::index_matrix;
  using index_view = core::DispatchPlan<Kokkos::CudaSpace>::index_view;
  const std::int64_t t = block_->tokens(), e = weights_.num_experts(), k = options_.top_k, pairs = t * k;
  Routing<bf16, Kokkos::Cuda> r;
  r.logits = over<value_matrix>(block_->logits(), t, e);
  r.probs = over<value_matrix>(block_->probs(), t, e);
  r.topk_idx = over<index_matrix>(block_->topk_idx(), t, k);
  r.topk_weight = over<value_matrix>(block_->topk_weight(), t, k);
  auto& plan = r.plan;
  const auto& raw = block_->plan();
  plan.num_tokens = t;
  plan.top_k = k;
  plan.num_experts = e;
  plan.block = kc::kGemmTileRows;
  plan.counts = over<index_view>(raw.counts, e);
  plan.offsets = over<index_view>(raw.offsets, e + 1);
  plan.padded_offsets = over<index_view>(raw.padded_offsets, e + 1);
  plan.row_pair = over<index_view>(raw.sorted_pair, pairs);
  plan.pair_row = over<index_view>(raw.pair_row, pairs);
  plan.pair_padded_row = over<index_view>(raw.pair_padded_row, pairs);
  routing_ = std::move(r);
}

const Routing<bf16, Kokkos::Cuda>& MoeLayer<bf16, Kokkos::Cuda>::routing() const {
  if (have_forward_ && !plan_on_host_) {
    auto& plan = routing_.plan;
    const std::size_t e = static_cast<std::size_t>(plan.num_experts);
    if (plan.num_tokens == 0) {  // the block builds no plan for zero tokens
      plan.counts_host.assign(e, 0);
      plan.offsets_host.assign(e + 1, 0);
      plan.padded_offsets_host.assign(e + 1, 0);
    } else {
      auto fetch = [&](const auto& device, std::vector<std::int64_t>& host) {
        host.resize(device.extent(0));
        Kokkos::View<std::int64_t*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> h(host.data(),
                                                                                                  host.size());
        Kokkos::deep_copy(space_, h, device);
      };
      fetch(plan.counts, plan.counts_host);
      fetch(plan.offsets, plan.offsets_host);
      fetch(plan.padded_offsets, plan.padded_offsets_host);
      space_.fence();  // the one wait, on request
    }
    plan_on_host_ = true;
  }
  return routing_;
}

MoeBackward<bf16, Kokkos::Cuda> MoeLayer<bf16, Kokkos::Cuda>::backward(const_matrix dy, grad_const_matrix d_logits) {
  KMOE_CHECK_INPUT(have_forward_, "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::backward: no forward() to differentiate");
  MoeBackward<bf16, Kokkos::Cuda> out;
  out.dx = grad_matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::moe::dx")), x_.extent(0),
                       x_.extent(1));
  out.grads = uninitialized_like<float>(weights_);  // the block overwrites every element
  backward(dy, out, d_logits);
  return out;
}

void MoeLayer<bf16, Kokkos::Cuda>::backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out,
                                            grad_const_matrix d_logits) {
  KMOE_CHECK_INPUT(!forward_exchanged_, "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::backward: the last forward ran "
                   "under expert parallelism; call backward(dy, out, exchange)");
  backward_impl(dy, out, nullptr, nullptr, d_logits);
}

void MoeLayer<bf16, Kokkos::Cuda>::backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out,
                                            const Bf16ExpertGrads& expert_grads, grad_const_matrix d_logits) {
  KMOE_CHECK_INPUT(!forward_exchanged_, "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::backward: the last forward ran "
                   "under expert parallelism; call backward(dy, out, exchange)");
  backward_impl(dy, out, nullptr, &expert_grads, d_logits);
}

void MoeLayer<bf16, Kokkos::Cuda>::backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out,
                                            ExpertExchange& exchange, grad_const_matrix d_logits) {
  KMOE_CHECK_INPUT(!have_forward_ || forward_exchanged_, "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::backward: the last "
                   "forward ran on one process; call backward(dy, out)");
  backward_impl(dy, out, &exchange, nullptr, d_logits);
}

void MoeLayer<bf16, Kokkos::Cuda>::backward_impl(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out,
                                                 ExpertExchange* exchange, const Bf16ExpertGrads* expert_grads,
                                                 grad_const_matrix d_logits) {
  constexpr const char* fn = "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::backward";
  KMOE_CHECK_INPUT(have_forward_, fn, ": no forward() to differentiate");
  KMOE_CHECK_INPUT(!block_->consumed(), fn,
                   ": the last forward()'s saved activations were consumed by a backward() already (the block's "
                   "backward reuses them as scratch); run forward() again");
  detail::check_matrix(fn, "dy", dy, x_.extent(0), x_.extent(1));
  detail::check_matrix(fn, "dx", out.dx, x_.extent(0), weights_.hidden());
  check_contiguous(fn, "dy", dy);
  check_contiguous(fn, "dx", out.dx);
  // Every gradient the block writes has its weight's shape: the fp32 ones in out.grads, the expert ones in bf16
  // when expert_grads is given (out.grads.w1/w3/w2 are then not written).
  auto check_like = [&](const auto& g, const auto& like, const char* name) {
    for (unsigned r = 0; r < like.rank; ++r)
      KMOE_CHECK_INPUT(g.extent(r) == like.extent(r), fn, ": gradient ", name, " has extent(", r, ") = ", g.extent(r),
                       ", expected ", like.extent(r));
    check_contiguous(fn, name, g);
  };
  for_each_weight_pair(out.grads, weights_, [&](const auto& g, const auto& like, const char* name) {
    const std::string n = name;
    if (!(expert_grads && (n == "w1" || n == "w3" || n == "w2"))) check_like(g, like, name);
  });
  if (expert_grads) {
    check_like(expert_grads->w1, weights_.w1, "w1 (bf16)");
    check_like(expert_grads->w3, weights_.w3, "w3 (bf16)");
    check_like(expert_grads->w2, weights_.w2, "w2 (bf16)");
  }
  if (d_logits.span() != 0) {
    detail::check_matrix(fn, "d_logits", d_logits, x_.extent(0), weights_.num_experts());
    check_contiguous(fn, "d_logits", d_logits);
  }
  const bool padded = block_->options().padded;
  Kokkos::Profiling::pushRegion(padded ? "kmoe::moe::backward[cuda,padded]" : "kmoe::moe::backward[cuda,scattered]");
  block_->backward(bits(x_.data()), weights_, bits(dy.data()), out, expert_grads,
                   d_logits.span() != 0 ? d_logits.data() : nullptr, exchange, space_);
  Kokkos::Profiling::popRegion();
}

}  // namespace kmoe::moe
