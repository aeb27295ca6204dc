/// \file expert_exchange.hpp
/// \brief kmoe::moe::ExpertExchange: the seam through which expert parallelism moves a block's expert rows between
/// the ranks of an ep group. MoeLayer<bf16, Kokkos::Cuda> composes its block once —
///   route -> dispatch plan -> gather -> [exchange] -> expert MLP -> [exchange back] -> combine (+ shared expert)
/// — and a single process simply passes no exchange. comm/ implements it over a Communicator (NCCL, or MPI on device
/// buffers) for kmoe::comm::DistributedMoe<bf16, Kokkos::Cuda>; moe/ never sees a communicator.
#pragma once

#include <Kokkos_Core.hpp>
#include <cstdint>
#include <vector>

namespace kmoe::moe {

/// Moves bf16 rows between the ranks of one ep group. Every call is collective over the group.
class ExpertExchange {
 public:
  /// Rows [offset, offset + rows) of a buffer, exchanged with `peer` (see Communicator::alltoallv_blocks: between two
  /// ranks, the n-th non-empty block one lists for the other lands in the n-th non-empty block the other lists).
  struct Block {
    int peer = 0;
    std::int64_t offset = 0;
    std::int64_t rows = 0;
  };

  virtual ~ExpertExchange() = default;
  /// Ranks of the ep group, and this rank's index in it.
  virtual int size() const = 0;
  virtual int rank() const = 0;
  /// The ep rank that owns global expert e (owners hold contiguous, increasing expert ranges).
  virtual int owner_of(std::int64_t expert) const = 0;
  /// counts [E] (host): this rank's rows per global expert; all [size * E] (host, out): all[q * E + e] = rank q's rows
  /// for expert e. Blocks.
  virtual void exchange_counts(const std::int64_t* counts, std::int64_t experts, std::int64_t* all) = 0;
  /// Sends rows of `send` and receives rows into `recv` (device memory, rows of `row_elems` bf16 values) by blocks.
  /// Ordered after the work enqueued on `space` so far; the work enqueued on `space` afterwards sees the rows.
  virtual void exchange_rows(const Kokkos::Cuda& space, const void* send, const std::vector<Block>& sends, void* recv,
                             const std::vector<Block>& recvs, std::int64_t row_elems) = 0;
};

}  // namespace kmoe::moe
