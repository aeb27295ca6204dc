/// \file cutlass_grouped.hpp
/// \brief The CUTLASS engine of the expert GEMMs: Hopper (sm_90a: wgmma + TMA, warp-specialised, persistent)
/// ptr-array grouped GEMMs from CUTLASS 4.2, one kernel launch per GEMM operation of the MoE block, with each group's
/// problem size and A/B/C pointers written on the device by a small setup kernel from the dispatch plan's offsets —
/// so, unlike the cuBLAS engine, nothing waits for the host (the block stays capturable in a CUDA graph).
///
/// Same semantics as grouped_gemm / grouped_gemm_tn (kernels.hpp) for *unindexed* rows (a_index, b_index, c_index
/// nullptr: the scattered layout gathers x into expert order first), bf16 in, fp32 accumulate. Raw pointers + a
/// stream; every function only enqueues work. Built only with KMOE_ENABLE_CUTLASS (CUTLASS headers
/// from cmake/deps/fetch_cutlass.sh); otherwise cutlass_grouped_available() is false and the GEMM calls throw
/// kmoe::UsageError.
///
/// Alignment (TMA): every pointer 16-byte aligned; lda/ldb/ldc, n, k, b_split, m, c_split multiples of 8 (bf16 rows of
/// 16 bytes); the row counts (offsets) are arbitrary. Violations throw kmoe::InputError.
#pragma once

#include <kmoe/core/cuda/kernels.hpp>

#include <cstddef>

namespace kmoe::core::cuda {

/// True when kmoe was built with the CUTLASS engine and the current device is a Hopper GPU (compute capability 9.0,
/// which runs the sm_90a code). Never throws; false without a device.
bool cutlass_grouped_available() noexcept;

/// Bytes of device workspace one grouped_gemm_cutlass / grouped_gemm_tn_cutlass call needs for `groups` groups
/// (experts): the per-group problem sizes, pointers and strides the setup kernel writes, and CUTLASS's per-SM TMA
/// descriptors. Host arithmetic only (no device query). One workspace serves any sequence of calls on one stream
/// (each call's setup kernel runs after the previous GEMM has finished reading it); concurrent streams need one each.
std::size_t cutlass_grouped_workspace_bytes(int groups);

/// Row-grouped GEMM with the semantics of grouped_gemm (kernels.hpp): for each group g and row r in
/// [offsets[g], offsets[g+1]) (offsets nullptr: one group of args.rows rows), C[r,:] = A[r,:]·op(B_g), B_g stacked
/// from b0/b1 along its stored rows. Restrictions: a_index and c_index nullptr, output c_bf16 (c_f32 and accumulate
/// are not supported). b_trans (x·Wᵀ) runs one launch with 2 groups per expert when b1 is set (the two column halves
/// of C); !b_trans (dY·W) with b1 runs two launches, the second accumulating its half of the reduction into C.
/// \param workspace [scratch] cutlass_grouped_workspace_bytes(args.groups) bytes of device memory, 256-byte aligned
void grouped_gemm_cutlass(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream);

/// Weight-gradient GEMM with the semantics of grouped_gemm_tn: C_g = A_gᵀ·B_g over each group's rows, fp32 (c0/c1)
/// or bf16 (c0_bf16/c1_bf16) out, fp32 accumulation, overwritten; a group without rows gets zeros (written by the
/// setup kernel; CUTLASS skips the group). a_index and b_index must be nullptr. One launch, 2 groups per expert when
/// c1 / c1_bf16 is set (d[W1;W3] into dW1 and dW3).
void grouped_gemm_tn_cutlass(const GroupedGemmTNArgs& args, void* workspace, cudaStream_t stream);

}  // namespace kmoe::core::cuda
