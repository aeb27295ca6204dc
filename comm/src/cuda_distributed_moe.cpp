// DistributedMoe<bf16, Kokkos::Cuda>: the bf16 CUDA block under expert parallelism. The block's composition lives in
// moe/ (MoeLayer<bf16, Kokkos::Cuda>); this file gives it an ExpertExchange over the ep group's Communicator.
#include <kmoe/comm/distributed_moe.hpp>

#include <kmoe/core/cuda/check.hpp>
#if KMOE_ENABLE_NCCL
#include <kmoe/comm/nccl_communicator.hpp>
#endif

#include <cuda_runtime_api.h>

#include <chrono>
#include <string>
#include <vector>

namespace kmoe::comm {

namespace detail {

/// moe::ExpertExchange over a Communicator that moves device memory. NCCL enqueues on its own stream: the exchange
/// orders it after the layer's stream and the layer's stream after it with two events (no host wait). MPI over device
/// buffers blocks: the layer's queued work is fenced first and the rows are in place when it returns.
class CommExchange final : public moe::ExpertExchange {
 public:
  CommExchange(Communicator& ep_group, const ExpertPlacement& placement) : comm_(ep_group), placement_(placement) {
#if KMOE_ENABLE_NCCL
    if (auto* nccl = dynamic_cast<NcclCommunicator*>(&comm_)) comm_stream_ = nccl->stream();
#endif
    if (comm_stream_) {
      KMOE_CUDA_CHECK(cudaEventCreateWithFlags(&before_, cudaEventDisableTiming));
      KMOE_CUDA_CHECK(cudaEventCreateWithFlags(&after_, cudaEventDisableTiming));
    }
  }
  ~CommExchange() override {
    if (before_) cudaEventDestroy(before_);
    if (after_) cudaEventDestroy(after_);
  }
  CommExchange(const CommExchange&) = delete;
  CommExchange& operator=(const CommExchange&) = delete;

  int size() const override { return comm_.size(); }
  int rank() const override { return comm_.rank(); }
  int owner_of(std::int64_t expert) const override { return placement_.owner_of(expert); }

  void exchange_counts(const std::int64_t* counts, std::int64_t experts, std::int64_t* all) override {
    // Every peer gets this rank's whole count vector (E int64 per peer, on the host): each rank then knows the rows
    // it receives per (source, local expert) and every source's layout.
    send_counts_.resize(std::size_t(comm_.size()) * experts);
    for (int p = 0; p < comm_.size(); ++p) std::copy(counts, counts + experts, send_counts_.begin() + p * experts);
    comm_.alltoall_counts(send_counts_.data(), all, static_cast<int>(experts));
  }

  void exchange_rows(const Kokkos::Cuda& space, const void* send, const std::vector<Block>& sends, void* recv,
                     const std::vector<Block>& recvs, std::int64_t row_elems) override {
    auto convert = [](const std::vector<Block>& in, std::vector<RowBlock>& out) {
      out.resize(in.size());
      for (std::size_t i = 0; i < in.size(); ++i) out[i] = RowBlock{in[i].peer, in[i].offset, in[i].rows};
    };
    convert(sends, sends_);
    convert(recvs, recvs_);
    cudaStream_t stream = space.cuda_stream();
    const bool ordered = comm_stream_ != nullptr && comm_stream_ != stream;
    std::chrono::steady_clock::time_point t0;
    if (timing_) {  // measured alone: everything before has finished, the clock stops when the rows are in place
      space.fence();
      t0 = std::chrono::steady_clock::now();
    }
    if (ordered) {
      KMOE_CUDA_CHECK(cudaEventRecord(before_, stream));
      KMOE_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, before_, 0));
    } else if (!comm_stream_) {
      space.fence();  // a blocking transport reads the buffers now
    }
    comm_.alltoallv_blocks(send, sends_.data(), sends_.size(), recv, recvs_.data(), recvs_.size(), row_elems,
                           DataType::bf16);
    if (ordered) {
      KMOE_CUDA_CHECK(cudaEventRecord(after_, comm_stream_));
      KMOE_CUDA_CHECK(cudaStreamWaitEvent(stream, after_, 0));
    }
    if (timing_) {
      if (comm_stream_) KMOE_CUDA_CHECK(cudaStreamSynchronize(comm_stream_));
      stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ++stats_.calls;
      for (const auto& b : sends) stats_.bytes += double(b.rows) * double(row_elems) * sizeof(bf16);
    }
  }

  void set_timing(bool on) { timing_ = on; }
  ExchangeStats take_stats() {
    const ExchangeStats s = stats_;
    stats_ = ExchangeStats{};
    return s;
  }

 private:
  Communicator& comm_;
  const ExpertPlacement& placement_;
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t before_ = nullptr, after_ = nullptr;
  std::vector<std::int64_t> send_counts_;
  std::vector<RowBlock> sends_, recvs_;
  bool timing_ = false;
  ExchangeStats stats_;
};

}  // namespace detail

DistributedMoe<bf16, Kokkos::Cuda>::DistributedMoe(const ExpertParallel& layout, moe::MoeWeights<bf16, Kokkos::Cuda> weights,
                                                   moe::MoeOptions options, Kokkos::Cuda space)
    : layout_(&layout), layer_(std::move(weights), options, space) {
  KMOE_CHECK_USAGE(layout.ep_group().uses_device_memory(), "kmoe::comm::DistributedMoe<bf16, Kokkos::Cuda>: the ",
                   layout.ep_group().backend(), " communicator moves host memory; the bf16 CUDA block needs one that "
                   "moves device memory (NCCL, or MPI over device buffers)");
  detail::check_expert_slice(layout, layer_.weights());
  exchange_ = std::make_unique<detail::CommExchange>(layout.ep_group(), layout.placement());
}

DistributedMoe<bf16, Kokkos::Cuda>::~DistributedMoe() = default;
DistributedMoe<bf16, Kokkos::Cuda>::DistributedMoe(DistributedMoe&&) noexcept = default;
DistributedMoe<bf16, Kokkos::Cuda>& DistributedMoe<bf16, Kokkos::Cuda>::operator=(DistributedMoe&&) noexcept = default;

DistributedMoe<bf16, Kokkos::Cuda>::matrix DistributedMoe<bf16, Kokkos::Cuda>::forward(const_matrix x) {
  matrix y(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::comm::y")), x.extent(0), x.extent(1));
  forward(x, y);
  return y;
}

void DistributedMoe<bf16, Kokkos::Cuda>::forward(const_matrix x, matrix y) {
  x_ = x;
  layer_.forward(x, y, *exchange_);
}

moe::MoeBackward<bf16, Kokkos::Cuda> DistributedMoe<bf16, Kokkos::Cuda>::backward(const_matrix dy,
                                                                              Layer::grad_const_matrix d_logits) {
  moe::MoeBackward<bf16, Kokkos::Cuda> out;
  out.dx = moe::MoeViews<float, Kokkos::Cuda>::matrix(
      Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::comm::dx")), x_.extent(0), x_.extent(1));
  out.grads = moe::uninitialized_like<float>(layer_.weights());  // the block overwrites every element
  backward(dy, out, d_logits);
  return out;
}

void DistributedMoe<bf16, Kokkos::Cuda>::backward(const_matrix dy, const moe::MoeBackward<bf16, Kokkos::Cuda>& out,
                                                  Layer::grad_const_matrix d_logits) {
  layer_.backward(dy, out, *exchange_, d_logits);
}

void DistributedMoe<bf16, Kokkos::Cuda>::time_exchanges(bool on) { exchange_->set_timing(on); }
ExchangeStats DistributedMoe<bf16, Kokkos::Cuda>::take_exchange_stats() { return exchange_->take_stats(); }

GradientSet DistributedMoe<bf16, Kokkos::Cuda>::gradient_set(const moe::MoeBackward<bf16, Kokkos::Cuda>& b) const {
  return expert_gradient_set(*layout_, b.grads);
}

}  // namespace kmoe::comm
