// MoeLayer<bf16, Kokkos::Cuda>: the MoeLayer API over kmoe's hand-written CUDA block (core/cuda/kernels.hpp).
// The Kokkos side checks shapes, owns the workspace and passes view.data() and the space's stream (STYLE habit 4).
#include <kmoe/moe/cuda/moe_layer.hpp>

#include <kmoe/core/cuda/kernels.hpp>

#include <algorithm>
#include <string>

namespace kmoe::moe {

namespace {

namespace kc = core::cuda;
static_assert(detail::kCudaPaddedTileRows == kc::kGemmTileRows, "the options check and the CUDA block disagree");
static_assert(sizeof(bf16) == sizeof(kc::bf16_t), "kmoe::bf16 is the bf16 bit pattern");

const kc::bf16_t* bits(const bf16* p) { return reinterpret_cast<const kc::bf16_t*>(p); }

kc::GemmEngine engine_of(detail::CudaEngine e) {
  switch (e) {
    case detail::CudaEngine::Kernel: return kc::GemmEngine::Kernel;
    case detail::CudaEngine::Cublas: return kc::GemmEngine::Cublas;
    case detail::CudaEngine::Auto: break;
  }
  return kc::GemmEngine::Auto;
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

}  // namespace

MoeLayer<bf16, Kokkos::Cuda>::MoeLayer(MoeWeights<bf16, Kokkos::Cuda> weights, MoeOptions options, Kokkos::Cuda space)
    : weights_(std::move(weights)), options_(options), space_(space) {
  constexpr const char* fn = "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>";
  detail::check_layer_arguments(weights_, options_);
  block_ = detail::cuda_block_options(options_);
  for_each_weight_pair(weights_, weights_, [&](const auto& v, const auto&, const char* name) {
    check_contiguous(fn, name, v);
  });
  const auto& w = weights_;
  shape_.hidden = static_cast<int>(w.hidden());
  shape_.ffn = static_cast<int>(w.ffn());
  shape_.experts = static_cast<int>(w.num_experts());
  shape_.k = static_cast<int>(options_.top_k);
  shape_.shared_ffn = static_cast<int>(w.shared_ffn());
  KMOE_CHECK_INPUT(w.num_experts() <= 256, fn, ": ", w.num_experts(),
                   " experts (the fused CUDA routing kernel takes at most 256)");
  // The block's own limits (multiples of 8, top_k <= 32), checked now rather than at the first forward.
  shape_.tokens = 0;
  (void)kc::moe_workspace_bytes(shape_, block_.padded ? kc::MoePath::Padded : kc::MoePath::Scattered);
}

const char* MoeLayer<bf16, Kokkos::Cuda>::forward_region() const {
  return block_.padded ? "kmoe::moe::forward[cuda,padded]" : "kmoe::moe::forward[cuda,scattered]";
}

bool MoeLayer<bf16, Kokkos::Cuda>::used_cublas() const { return have_forward_ && saved_.cublas; }

MoeLayer<bf16, Kokkos::Cuda>::matrix MoeLayer<bf16, Kokkos::Cuda>::forward(const_matrix x) {
  matrix y(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::moe::y")), x.extent(0), x.extent(1));
  forward(x, y);
  return y;
}

void MoeLayer<bf16, Kokkos::Cuda>::forward(const_matrix x, matrix y) {
  constexpr const char* fn = "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::forward";
  detail::check_all_experts_local(weights_);
  KMOE_CHECK_INPUT(std::int64_t(x.extent(1)) == weights_.hidden(), fn, ": x is [", x.extent(0), ",", x.extent(1),
                   "], expected [tokens, ", weights_.hidden(), "]");
  detail::check_matrix(fn, "y", y, x.extent(0), x.extent(1));
  check_contiguous(fn, "x", x);
  check_contiguous(fn, "y", y);
  Kokkos::Profiling::pushRegion(forward_region());
  have_forward_ = false;
  saved_consumed_ = false;
  plan_on_host_ = false;
  const auto path = block_.padded ? kc::MoePath::Padded : kc::MoePath::Scattered;
  shape_.tokens = x.extent(0);
  // One device allocation, reused while the shape fits (no allocation per step in a training loop).
  const std::size_t bytes = kc::moe_workspace_bytes(shape_, path);
  if (workspace_.extent(0) < bytes)
    workspace_ = decltype(workspace_)(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::moe::cuda_workspace")),
                                      bytes);
  saved_ = kc::moe_carve(workspace_.data(), shape_, path);
  saved_.engine = engine_of(block_.engine);
  if (shape_.tokens > 0)  // zero tokens: nothing to route (the kernels would launch empty grids)
    kc::moe_forward(bits(x.data()), detail::raw_weights(weights_), saved_, reinterpret_cast<kc::bf16_t*>(y.data()),
                    space_.cuda_stream());
  x_ = x;
  expose_routing();
  have_forward_ = true;
  Kokkos::Profiling::popRegion();
}

void MoeLayer<bf16, Kokkos::Cuda>::expose_routing() {
  using value_matrix = Routing<bf16, Kokkos::Cuda>::value_matrix;
  using index_matrix = views::index_matrix;
  using index_view = core::DispatchPlan<Kokkos::CudaSpace>::index_view;
  const std::int64_t t = shape_.tokens, e = shape_.experts, k = shape_.k, pairs = t * k;
  Routing<bf16, Kokkos::Cuda> r;
  r.logits = over<value_matrix>(saved_.logits, t, e);
  r.probs = over<value_matrix>(saved_.probs, t, e);
  r.topk_idx = over<index_matrix>(saved_.topk_idx, t, k);
  r.topk_weight = over<value_matrix>(saved_.topk_weight, t, k);
  auto& plan = r.plan;
  const auto& raw = saved_.plan;
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

MoeBackward<bf16, Kokkos::Cuda> MoeLayer<bf16, Kokkos::Cuda>::backward(const_matrix dy) {
  KMOE_CHECK_INPUT(have_forward_, "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::backward: no forward() to differentiate");
  MoeBackward<bf16, Kokkos::Cuda> out;
  out.dx = grad_matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::moe::dx")), x_.extent(0),
                       x_.extent(1));
  out.grads = uninitialized_like<float>(weights_);  // the block overwrites every element
  backward(dy, out);
  return out;
}

void MoeLayer<bf16, Kokkos::Cuda>::backward(const_matrix dy, const MoeBackward<bf16, Kokkos::Cuda>& out) {
  constexpr const char* fn = "kmoe::moe::MoeLayer<bf16, Kokkos::Cuda>::backward";
  KMOE_CHECK_INPUT(have_forward_, fn, ": no forward() to differentiate");
  KMOE_CHECK_INPUT(!saved_consumed_, fn,
                   ": the last forward()'s saved activations were consumed by a backward() already (the block's "
                   "backward reuses them as scratch); run forward() again");
  detail::check_matrix(fn, "dy", dy, x_.extent(0), x_.extent(1));
  detail::check_gradient_shapes<float>(fn, out.dx, out.grads, weights_, x_.extent(0));
  check_contiguous(fn, "dy", dy);
  check_contiguous(fn, "dx", out.dx);
  for_each_weight_pair(out.grads, out.grads, [&](const auto& v, const auto&, const char* name) {
    check_contiguous(fn, name, v);
  });
  Kokkos::Profiling::pushRegion(block_.padded ? "kmoe::moe::backward[cuda,padded]"
                                              : "kmoe::moe::backward[cuda,scattered]");
  const kc::MoeGrads g = detail::raw_grads(out);
  saved_consumed_ = true;
  if (shape_.tokens > 0) {
    kc::moe_backward(bits(x_.data()), detail::raw_weights(weights_), saved_, bits(dy.data()), g, space_.cuda_stream());
  } else {  // no tokens: every weight gradient is zero (dx is empty)
    for_each_weight_pair(out.grads, out.grads, [&](const auto& v, const auto&, const char*) {
      Kokkos::deep_copy(space_, v, 0.f);
    });
  }
  Kokkos::Profiling::popRegion();
}

}  // namespace kmoe::moe
