// The CUTLASS engine of the expert GEMMs (<kmoe/core/cuda/cutlass_grouped.hpp>): CUTLASS 4.2's Hopper ptr-array
// grouped GEMM (TMA loads, wgmma, warp-specialised cooperative persistent kernel), one launch per GEMM operation.
// The per-group problem sizes, pointers and strides are written on the device by setup_groups from the dispatch
// plan's offsets, so the host never learns the split sizes (the cuBLAS engine syncs once per forward for them) and
// launches one kernel per operation instead of one per expert (the fine-grained shape is bound by ~580 cublasGemmEx
// enqueues per step: perf/NOTES.md).
//
// Built only with KMOE_ENABLE_CUTLASS, for -gencode=arch=compute_90a,code=sm_90a alone (wgmma needs the "a" target)
// and -DNDEBUG (src/cuda/CMakeLists.txt); without it this file compiles to stubs that say so.
//
// Row-major operands map onto CUTLASS's (M,N,K) as follows (CUTLASS "RowMajor A" = K-contiguous, "ColumnMajor B" =
// K-contiguous B stored [N,K], "RowMajor B" = N-contiguous B stored [K,N]):
//   x·Wᵀ (up, down)        A = rows [M=rows_e, K] RowMajor,  B = W_e [N,K] ColumnMajor   -> KernelTN
//   dY·W (d_act, dx rows)  A = rows RowMajor,                B = W_e [K,N] RowMajor      -> KernelNN (C for beta = 1)
//   Aᵀ·B (weight grads)    A = rows [K=rows_e, M] seen as ColumnMajor [M,K], B = rows [K,N] RowMajor -> KernelWgrad
#include <kmoe/config.hpp>
#include <kmoe/core/cuda/check.hpp>
#include <kmoe/core/cuda/cutlass_grouped.hpp>

#if KMOE_ENABLE_CUTLASS

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <algorithm>
#include <type_traits>

namespace kmoe::core::cuda {

namespace {

using ElementAB = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using Problem = ProblemShape::UnderlyingProblemShape;

/// Most SMs the workspace has TMA descriptor space for (the H100 has 132; more are left idle).
constexpr int kMaxSms = 256;
/// Blocks per group that zero an empty expert's weight gradient.
constexpr int kZeroBlocks = 32;

/// The schedule and tile of every kernel: cooperative (both consumer warpgroups share one 128×256 tile, 64×256
/// each; the epilogue follows the mainloop). Measured on the H100 against the pingpong schedule with 128×128×64 tiles
/// (each consumer warpgroup its own tile, epilogue overlapped with the other's mainloop): pingpong ran at 0.47–0.95×
/// the cooperative speed on 17 of the 18 (shape, op) pairs of the peer table and 1.08× on one (fine-grained dW13); pingpong
/// with 64×256 tiles for the fp32 weight gradients alone: 0.84× on Mixtral dW13 (perf/NOTES.md, step 7). Not compiled.
struct Cooperative {
  using Mainloop = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
};

/// One CUTLASS grouped GEMM: bf16 A/B with the given layouts, fp32 accumulate, D row-major (bf16 or fp32), C = void
/// (never read) or the type of D (read when beta != 0). One tile configuration per schedule, to keep compile time
/// sane; no cluster (no multicast: groups are small and uneven).
template <class LayoutA, class LayoutB, class ElementC_, class ElementD_, class Schedule>
struct GroupedKernel {
  using ElementC = ElementC_;
  using ElementD = ElementD_;
  using TileShape = typename Schedule::TileShape;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, cutlass::layout::RowMajor*, kAlignD,
      ElementD, cutlass::layout::RowMajor*, kAlignD, typename Schedule::Epilogue>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA*, kAlignAB, ElementAB, LayoutB*,
      kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Mainloop>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
  static constexpr bool kHasC = !std::is_void_v<ElementC>;
};

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
using KernelTN = GroupedKernel<RowMajor, ColumnMajor, void, cutlass::bfloat16_t, Cooperative>;
using KernelNN = GroupedKernel<RowMajor, RowMajor, cutlass::bfloat16_t, cutlass::bfloat16_t, Cooperative>;
using KernelWgrad = GroupedKernel<ColumnMajor, RowMajor, void, float, Cooperative>;
using KernelWgradBf16 = GroupedKernel<ColumnMajor, RowMajor, void, cutlass::bfloat16_t, Cooperative>;  // bf16 grads


/// Sets the one dynamic (int64) mode of a ptr-array stride — the leading dimension; the other modes are static.
template <class Stride>
__device__ __forceinline__ Stride stride_with_ld(std::int64_t ld) {
  Stride s{};
  if constexpr (std::is_same_v<std::decay_t<decltype(cute::get<0>(s))>, std::int64_t>) cute::get<0>(s) = ld;
  if constexpr (std::is_same_v<std::decay_t<decltype(cute::get<1>(s))>, std::int64_t>) cute::get<1>(s) = ld;
  return s;
}

/// One of the (at most two) stacked halves of a call: groups h·E + e use half h.
struct Half {
  const bf16_t* b = nullptr;     ///< group e's B starts at b + e·b_group (+ r0·b_rows_ld, see Setup)
  std::int64_t b_group = 0;
  void* d = nullptr;             ///< group e's D starts at d + e·d_group (+ r0·d_rows_ld) elements
  std::int64_t d_group = 0;
  std::int64_t a_col = 0;        ///< column offset in A's rows
  int m = 0, n = 0, k = 0;       ///< fixed dimensions; the group's rows supply M (row mode) or K (wgrad)
};

/// What setup_groups needs to describe one call's groups on the device.
struct Setup {
  int experts = 1, halves = 1;
  bool wgrad = false;                     ///< rows are the reduction (K); else rows are M
  const std::int64_t* offsets = nullptr;  ///< [experts+1] device; nullptr: one group of `rows`
  std::int64_t rows = 0;
  const bf16_t* a = nullptr;
  std::int64_t lda = 0, ldb = 0, ldd = 0;
  std::int64_t b_rows_ld = 0, d_rows_ld = 0;  ///< how far a group's first row moves B and D (per row)
  int d_bytes = 2;
  Half half[2];
};

/// The per-group arrays CUTLASS reads on the device, carved from the caller's workspace.
template <class K>
struct Arrays {
  Problem* shapes;
  const ElementAB** a;
  const ElementAB** b;
  const void** c;
  void** d;
  typename K::StrideA* sa;
  typename K::StrideB* sb;
  typename K::StrideC* sc;
  typename K::StrideD* sd;
  void* cutlass_workspace;
};

std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }

/// Layout of the workspace for up to `groups` groups: the arrays (stride slots of 32 bytes hold every stride type),
/// then CUTLASS's own workspace.
struct WorkspaceLayout {
  std::size_t shapes, ptrs, strides, cutlass, total;
};
std::size_t cutlass_own_bytes(int groups);
WorkspaceLayout workspace_layout(int groups) {
  WorkspaceLayout w{};
  w.shapes = 0;
  w.ptrs = align256(sizeof(Problem) * groups);
  w.strides = w.ptrs + align256(4 * sizeof(void*) * groups);
  w.cutlass = w.strides + align256(4 * 32 * std::size_t(groups));
  w.total = w.cutlass + align256(cutlass_own_bytes(groups));
  return w;
}

template <class K>
Arrays<K> carve(void* workspace, int groups) {
  static_assert(sizeof(typename K::StrideA) <= 32 && sizeof(typename K::StrideB) <= 32 &&
                sizeof(typename K::StrideC) <= 32 && sizeof(typename K::StrideD) <= 32);
  const WorkspaceLayout w = workspace_layout(groups);
  auto* base = static_cast<unsigned char*>(workspace);
  Arrays<K> a;
  a.shapes = reinterpret_cast<Problem*>(base + w.shapes);
  unsigned char* p = base + w.ptrs;
  const std::size_t slot = sizeof(void*) * std::size_t(groups);
  a.a = reinterpret_cast<const ElementAB**>(p);
  a.b = reinterpret_cast<const ElementAB**>(p + slot);
  a.c = reinterpret_cast<const void**>(p + 2 * slot);
  a.d = reinterpret_cast<void**>(p + 3 * slot);
  unsigned char* s = base + w.strides;
  a.sa = reinterpret_cast<typename K::StrideA*>(s);
  a.sb = reinterpret_cast<typename K::StrideB*>(s + 32 * std::size_t(groups));
  a.sc = reinterpret_cast<typename K::StrideC*>(s + 64 * std::size_t(groups));
  a.sd = reinterpret_cast<typename K::StrideD*>(s + 96 * std::size_t(groups));
  a.cutlass_workspace = base + w.cutlass;
  return a;
}

/// Block (g, y) of the grid: y = 0, thread 0 writes group g's problem size, pointers and strides; in wgrad mode the
/// blocks of a group without rows zero its D (CUTLASS skips a group with M = 0, and an empty reduction must give 0).
template <class K>
__global__ void setup_groups(Setup s, Arrays<K> arr) {
  const int g = blockIdx.x;
  const int h = g / s.experts, e = g % s.experts;
  const Half& hf = s.half[h];
  const std::int64_t r0 = s.offsets ? s.offsets[e] : 0;
  const std::int64_t rows = s.offsets ? s.offsets[e + 1] - r0 : s.rows;
  auto* d = static_cast<unsigned char*>(hf.d) + (e * hf.d_group + r0 * s.d_rows_ld) * s.d_bytes;
  if (s.wgrad && rows == 0) {
    const std::int64_t n16 = std::int64_t(hf.m) * hf.n * s.d_bytes / 16;
    auto* d16 = reinterpret_cast<uint4*>(d);
    for (std::int64_t i = blockIdx.y * std::int64_t(blockDim.x) + threadIdx.x; i < n16;
         i += std::int64_t(gridDim.y) * blockDim.x)
      d16[i] = make_uint4(0, 0, 0, 0);
  }
  if (blockIdx.y != 0 || threadIdx.x != 0) return;
  const int r = static_cast<int>(rows);
  arr.shapes[g] = s.wgrad ? Problem{r == 0 ? 0 : hf.m, hf.n, r} : Problem{r, hf.n, hf.k};
  arr.a[g] = reinterpret_cast<const ElementAB*>(s.a + r0 * s.lda + hf.a_col);
  arr.b[g] = reinterpret_cast<const ElementAB*>(hf.b + e * hf.b_group + r0 * s.b_rows_ld);
  arr.c[g] = d;
  arr.d[g] = d;
  arr.sa[g] = stride_with_ld<typename K::StrideA>(s.lda);
  arr.sb[g] = stride_with_ld<typename K::StrideB>(s.ldb);
  arr.sc[g] = stride_with_ld<typename K::StrideC>(s.ldd);
  arr.sd[g] = stride_with_ld<typename K::StrideD>(s.ldd);
}

/// The device's SM count (capped at kMaxSms), cached per device.
cutlass::KernelHardwareInfo hw_info() {
  static int sms[16] = {};
  int dev = 0;
  KMOE_CUDA_CHECK(cudaGetDevice(&dev));
  KMOE_CHECK_INPUT(dev >= 0 && dev < 16, "kmoe::core::cuda: device ", dev, " beyond the 16 the CUTLASS engine caches");
  if (sms[dev] == 0) {
    int n = 0;
    KMOE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    sms[dev] = std::min(n, kMaxSms);
  }
  cutlass::KernelHardwareInfo hw;
  hw.device_id = dev;
  hw.sm_count = sms[dev];
  return hw;
}

template <class K>
typename K::Gemm::Arguments arguments(const Arrays<K>& arr, int groups, float beta, int sm_count) {
  typename K::Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {groups, arr.shapes, nullptr};  // sizes only on the device
  args.mainloop = {arr.a, arr.sa, arr.b, arr.sb};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = beta;
  if constexpr (K::kHasC)
    args.epilogue.ptr_C = reinterpret_cast<const typename K::ElementC**>(arr.c);
  else
    args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = arr.sc;
  args.epilogue.ptr_D = reinterpret_cast<typename K::ElementD**>(arr.d);
  args.epilogue.dD = arr.sd;
  args.hw_info.device_id = 0;
  args.hw_info.sm_count = sm_count;
  return args;
}

template <class K>
std::size_t own_bytes(int groups) {
  Arrays<K> none{};
  return K::Gemm::get_workspace_size(arguments<K>(none, groups, 0.f, kMaxSms));
}

std::size_t cutlass_own_bytes(int groups) {
  return std::max({own_bytes<KernelTN>(groups), own_bytes<KernelNN>(groups), own_bytes<KernelWgrad>(groups),
                   own_bytes<KernelWgradBf16>(groups)});
}

void check_cutlass(cutlass::Status st, const char* what) {
  if (st != cutlass::Status::kSuccess)
    throw InternalError(::kmoe::detail::concat("kmoe::core::cuda: CUTLASS ", what, " failed: ",
                                                cutlassGetStatusString(st)));
}

/// Writes the groups' arrays on the device, then runs the CUTLASS grouped GEMM over them.
template <class K>
void launch(const Setup& s, float beta, void* workspace, cudaStream_t stream) {
  const int groups = s.experts * s.halves;
  const Arrays<K> arr = carve<K>(workspace, groups);
  setup_groups<K><<<dim3(groups, s.wgrad ? kZeroBlocks : 1), 256, 0, stream>>>(s, arr);
  KMOE_CUDA_CHECK_LAUNCH("kmoe::core::cuda::setup_groups");
  const cutlass::KernelHardwareInfo hw = hw_info();
  typename K::Gemm::Arguments args = arguments<K>(arr, groups, beta, hw.sm_count);
  args.hw_info = hw;
  typename K::Gemm gemm;
  check_cutlass(gemm.can_implement(args), "can_implement");
  check_cutlass(gemm.initialize(args, arr.cutlass_workspace, stream), "initialize");
  check_cutlass(gemm.run(stream), "run");
  KMOE_CUDA_CHECK_LAUNCH("CUTLASS grouped GEMM");
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

void check_groups(int groups, const void* workspace) {
  KMOE_CHECK_INPUT(groups >= 1 && groups <= (1 << 20), "kmoe::core::cuda: CUTLASS engine: ", groups, " groups");
  KMOE_CHECK_INPUT(workspace && aligned16(workspace), "kmoe::core::cuda: CUTLASS engine: workspace missing or "
                                                      "not 16-byte aligned");
}

}  // namespace

bool cutlass_grouped_available() noexcept {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;
}

std::size_t cutlass_grouped_workspace_bytes(int groups) { return workspace_layout(2 * std::max(groups, 1)).total; }

void grouped_gemm_cutlass(const GroupedGemmArgs& a, void* workspace, cudaStream_t stream) {
  constexpr const char* fn = "kmoe::core::cuda::grouped_gemm_cutlass";
  check_groups(a.groups, workspace);
  KMOE_CHECK_INPUT(a.a_index == nullptr && a.c_index == nullptr, fn, ": rows must be unindexed (gather them first)");
  KMOE_CHECK_INPUT(a.c_bf16 && !a.c_f32 && !a.accumulate, fn, ": only a bf16 C that is overwritten is supported");
  const std::int64_t N = a.n, K = a.k;
  const std::int64_t stored_rows = a.b_trans ? N : K, row_len = a.b_trans ? K : N;
  const std::int64_t split = a.b1 ? a.b_split : stored_rows;
  KMOE_CHECK_INPUT(N > 0 && K > 0 && N < (1ll << 31) && K < (1ll << 31) && a.rows < (1ll << 31), fn, ": sizes N=", N,
                   " K=", K, " rows=", a.rows);
  KMOE_CHECK_INPUT(N % 8 == 0 && K % 8 == 0 && split % 8 == 0 && a.lda % 8 == 0 && a.ldc % 8 == 0 && split > 0 &&
                       split <= stored_rows && aligned16(a.a) && aligned16(a.b0) && aligned16(a.c_bf16) &&
                       (!a.b1 || aligned16(a.b1)),
                   fn, ": N=", N, " K=", K, " split=", split, " lda=", a.lda, " ldc=", a.ldc,
                   " must be multiples of 8 and the pointers 16-byte aligned (TMA)");
  Setup s;
  s.experts = a.offsets ? a.groups : 1;
  s.offsets = a.offsets;
  s.rows = a.rows;
  s.a = a.a;
  s.lda = a.lda;
  s.ldb = row_len;
  s.ldd = a.ldc;
  s.d_rows_ld = a.ldc;
  s.d_bytes = sizeof(bf16_t);
  const std::int64_t rest = stored_rows - split;
  if (a.b_trans) {  // stored rows of B are output columns: half h writes C[:, h ? split : 0 ...]
    s.halves = a.b1 ? 2 : 1;
    s.half[0] = Half{a.b0, split * K, a.c_bf16, 0, 0, 0, int(split), int(K)};
    if (a.b1) s.half[1] = Half{a.b1, rest * K, a.c_bf16 + split, 0, 0, 0, int(rest), int(K)};
    return launch<KernelTN>(s, 0.f, workspace, stream);
  }
  // Stored rows of B are the reduction: C = A[:, :split]·b0 (+ A[:, split:]·b1 accumulated by a second launch).
  s.half[0] = Half{a.b0, split * N, a.c_bf16, 0, 0, 0, int(N), int(split)};
  launch<KernelNN>(s, 0.f, workspace, stream);
  if (!a.b1) return;
  s.half[0] = Half{a.b1, rest * N, a.c_bf16, 0, split, 0, int(N), int(rest)};
  launch<KernelNN>(s, 1.f, workspace, stream);
}

void grouped_gemm_tn_cutlass(const GroupedGemmTNArgs& a, void* workspace, cudaStream_t stream) {
  constexpr const char* fn = "kmoe::core::cuda::grouped_gemm_tn_cutlass";
  check_groups(a.groups, workspace);
  KMOE_CHECK_INPUT(a.a_index == nullptr && a.b_index == nullptr, fn, ": rows must be unindexed (gather them first)");
  const bool bf16 = a.c0_bf16 != nullptr;  // bf16 weight gradients (MoeGrads::dw*_bf16), else fp32
  KMOE_CHECK_INPUT(bf16 != (a.c0 != nullptr) && (a.c1 == nullptr || !bf16) && (a.c1_bf16 == nullptr || bf16), fn,
                   ": set c0 (and c1) or c0_bf16 (and c1_bf16), not both or neither");
  void* c0 = bf16 ? static_cast<void*>(a.c0_bf16) : static_cast<void*>(a.c0);
  void* c1 = bf16 ? static_cast<void*>(a.c1_bf16) : static_cast<void*>(a.c1);
  const std::int64_t M = a.m, N = a.n;
  const std::int64_t split = c1 ? a.c_split : M;
  KMOE_CHECK_INPUT(M > 0 && N > 0 && M < (1ll << 31) && N < (1ll << 31) && a.rows < (1ll << 31), fn, ": sizes M=", M,
                   " N=", N, " rows=", a.rows);
  KMOE_CHECK_INPUT(M % 8 == 0 && N % 8 == 0 && split % 8 == 0 && split > 0 && split <= M && a.lda % 8 == 0 &&
                       a.ldb % 8 == 0 && aligned16(a.a) && aligned16(a.b) && aligned16(c0) && (!c1 || aligned16(c1)),
                   fn, ": M=", M, " N=", N, " split=", split, " lda=", a.lda, " ldb=", a.ldb,
                   " must be multiples of 8 and the pointers 16-byte aligned (TMA)");
  Setup s;
  s.experts = a.offsets ? a.groups : 1;
  s.offsets = a.offsets;
  s.rows = a.rows;
  s.wgrad = true;
  s.a = a.a;
  s.lda = a.lda;
  s.ldb = a.ldb;
  s.ldd = N;
  s.b_rows_ld = a.ldb;
  s.d_bytes = bf16 ? sizeof(bf16_t) : sizeof(float);
  s.halves = c1 ? 2 : 1;
  s.half[0] = Half{a.b, 0, c0, split * N, 0, int(split), int(N), 0};
  if (c1) s.half[1] = Half{a.b, 0, c1, (M - split) * N, split, int(M - split), int(N), 0};
  if (bf16) launch<KernelWgradBf16>(s, 0.f, workspace, stream);
  else launch<KernelWgrad>(s, 0.f, workspace, stream);
}

}  // namespace kmoe::core::cuda

#else  // !KMOE_ENABLE_CUTLASS

namespace kmoe::core::cuda {

bool cutlass_grouped_available() noexcept { return false; }
std::size_t cutlass_grouped_workspace_bytes(int) { return 0; }
void grouped_gemm_cutlass(const GroupedGemmArgs&, void*, cudaStream_t) {
  KMOE_CHECK_USAGE(false, "kmoe was built without CUTLASS (KMOE_ENABLE_CUTLASS=OFF): no CUTLASS GEMM engine");
}
void grouped_gemm_tn_cutlass(const GroupedGemmTNArgs&, void*, cudaStream_t) {
  KMOE_CHECK_USAGE(false, "kmoe was built without CUTLASS (KMOE_ENABLE_CUTLASS=OFF): no CUTLASS GEMM engine");
}

}  // namespace kmoe::core::cuda

#endif
