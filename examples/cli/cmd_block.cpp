// kmoe block: run one MoE block forward and backward on recorded inputs (the transformers oracle's layout).
#include "cli.hpp"

#include <kmoe/config.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/checkpoint.hpp>
#include <kmoe/moe/moe_layer.hpp>
#include <kmoe/core/bf16.hpp>
#if KMOE_ENABLE_MPI
#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/gather.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#endif

#include <algorithm>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe block --checkpoint DIR --layer I --inputs FILE --out FILE [--precision f64|f32|bf16]\n"
    "                  [--impl scatter|padded] [--backend serial|openmp|cuda] [--engine E] [--block B] [--ep M]\n"
    "                  [--comm C]\n\n"
    "Runs MoE layer I of the checkpoint forward and backward of L = sum(y * dy) on the float64 tensors\n"
    "layers.I.x and layers.I.dy ([..., hidden]) of the safetensors FILE, and writes (float64, int64 topk_idx)\n"
    "layers.I.{router_logits, topk_idx, topk_weight, y, dx, grad.gate, grad.w1, grad.w3, grad.w2} and, for a model\n"
    "with a shared expert, layers.I.grad.shared_{w1,w3,w2} to --out (atomically). The output includes the shared expert.\n"
    "Families with optional tensors add their gradients: grad.router_bias, grad.w{1,3,2}_bias (GPT-OSS),\n"
    "grad.shared_gate (Qwen2-MoE).\n"
    "--out may not be the --inputs file or lie inside --checkpoint.\n\n"
    "  --precision f64|f32      compute type (default f64; f64 computes the softmax in float64)\n"
    "  --impl scatter|padded    ScatterMoE-style or MegaBlocks-style expert path (default scatter)\n"
    "  --backend serial|openmp  Kokkos execution space (default: Kokkos' default)\n"
    "  --backend cuda           Kokkos::Cuda (builds with KMOE_ENABLE_CUDA): --precision bf16 runs kmoe's CUDA block\n"
    "                           (MoeLayer<bf16, Kokkos::Cuda>: bf16 storage, fp32 accumulation and gradients;\n"
    "                           --block must divide 128), f32/f64 the portable layer on the GPU\n"
    "  --engine auto|blas|kokkos|cutlass  the expert GEMMs' engine (default auto: measured per shape; blas = the\n"
    "                           vendor BLAS, kokkos = kmoe's own kernel, cutlass = the bf16 CUDA block only)\n"
    "  --block B                --impl padded: rows per expert rounded up to a multiple of B (default 32; >= 1,\n"
    "                           and B rows of hidden_size values must fit in this machine's memory)\n"
    "  --ep M                   expert parallelism under mpirun -np N: the tokens are split over the N ranks, the\n"
    "                           experts over groups of M ranks (M divides N and is at most the experts; default N);\n"
    "                           rank 0 writes the same outputs as one process\n"
    "  --comm auto|nccl|mpi     --backend cuda with --ep: NCCL (one GPU per rank) or MPI over device buffers (ranks\n"
    "                           may share a GPU); auto = NCCL when built and no two ranks share a GPU\n"
    "A value that starts with -- is given as --name=VALUE.\n"
    "exit codes: 0 ok, 1 bad input (checkpoint, inputs, shapes, layer out of range, a path the system refuses),\n"
    "2 bad usage\n";

struct BlockJob {
  io::HfCheckpoint checkpoint;
  int layer = 0;
  std::vector<std::int64_t> x_shape;  // as in the inputs file
  Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace> x, dy;
  moe::MoeOptions options;
  std::string out;
#if KMOE_ENABLE_MPI
  const comm::ExpertParallel* layout = nullptr;  // set under expert parallelism
#endif
};

/// A float64 input value as T (bf16: through float, rounding to nearest even).
template <class T>
T from_double(double v) {
  if constexpr (std::is_same<T, bf16>::value) return bf16::from_float(static_cast<float>(v));
  else return static_cast<T>(v);
}

/// Rows [row0, row0 + rows) of a float64 host matrix as a T matrix in Space's memory.
template <class T, class Space>
typename moe::MoeViews<T, Space>::matrix to_matrix(const Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>& src,
                                                   std::int64_t row0, std::int64_t rows) {
  using matrix = typename moe::MoeViews<T, Space>::matrix;
  const std::int64_t hidden = src.extent(1);
  matrix dst(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(src.label())), rows, hidden);
  auto h = Kokkos::create_mirror_view(dst);
  for (std::int64_t t = 0; t < rows; ++t)
    for (std::int64_t c = 0; c < hidden; ++c) h(t, c) = from_double<T>(src(row0 + t, c));
  Kokkos::deep_copy(dst, h);
  return dst;
}

/// The output tensors of a block run, named as in the reference file (y and dx take the shape of x). Views in any
/// memory space (copied to the host); y may be bf16 and dx fp32 (the bf16 CUDA layer), all written as float64.
template <class LogitsView, class IdxView, class WeightView, class YView, class DxView, class Grads>
std::vector<io::TensorToWrite> block_outputs(const BlockJob& job, const LogitsView& logits, const IdxView& topk_idx,
                                             const WeightView& topk_weight, const YView& y, const DxView& dx,
                                             const Grads& grads) {
  const std::string p = "layers." + std::to_string(job.layer) + ".";
  std::vector<io::TensorToWrite> out;
  auto add = [&](const std::string& name, const auto& view) {
    out.push_back(io::tensor_from_host_view(p + name, view, io::DType::F64));
  };
  auto add_like_x = [&](const std::string& name, const auto& view) {
    add(name, view);
    out.back().shape = job.x_shape;  // same elements, row-major: only the leading dims differ
  };
  add("router_logits", logits);
  out.push_back(io::tensor_from_host_view(p + "topk_idx", topk_idx, io::DType::I64));
  add("topk_weight", topk_weight);
  add_like_x("y", y);
  add_like_x("dx", dx);
  add("grad.gate", grads.router);
  add("grad.w1", grads.w1);
  add("grad.w3", grads.w3);
  add("grad.w2", grads.w2);
  if (grads.has_shared()) {
    add("grad.shared_w1", grads.shared_w1);
    add("grad.shared_w3", grads.shared_w3);
    add("grad.shared_w2", grads.shared_w2);
  }
  if (grads.router_bias.span()) add("grad.router_bias", grads.router_bias);
  if (grads.w1_bias.span()) add("grad.w1_bias", grads.w1_bias);
  if (grads.w3_bias.span()) add("grad.w3_bias", grads.w3_bias);
  if (grads.w2_bias.span()) add("grad.w2_bias", grads.w2_bias);
  if (grads.shared_gate.span()) add("grad.shared_gate", grads.shared_gate);
  return out;
}

#if KMOE_ENABLE_MPI
/// Expert parallelism (comm::DistributedMoe): this rank's contiguous share of the tokens, its slice of the experts.
/// Gradients are reduced over the ranks; rank 0 gathers the per-token outputs and replica 0's expert-gradient slices
/// and returns the single-process outputs; the other ranks return nothing.
template <class T, class Space>
std::vector<io::TensorToWrite> run_block_ep(const BlockJob& job) {
  const comm::ExpertParallel& layout = *job.layout;
  comm::Communicator& world = layout.world();
  moe::MoeOptions options = job.options;
  if (options.top_k == 0) options.top_k = job.checkpoint.config().top_k;
  const auto full = moe::load_weights<T, Space>(job.checkpoint, job.layer);
  comm::DistributedMoe<T, Space> block(layout, comm::local_slice(full, layout), options);
  const auto mine = comm::contiguous_split(job.x.extent(0), world.size(), world.rank());
  const auto x = to_matrix<T, Space>(job.x, mine.begin, mine.count);
  const auto dy = to_matrix<T, Space>(job.dy, mine.begin, mine.count);
  const auto y = block.forward(x);
  auto back = block.backward(dy);
  block.gradient_set(back).reduce();

  // Per-token outputs: concatenated in rank order, which is token order.
  const auto logits = comm::gather_rows(world, block.routing().logits);
  const auto topk_idx = comm::gather_rows(world, block.routing().topk_idx);
  const auto topk_weight = comm::gather_rows(world, block.routing().topk_weight);
  const auto y_all = comm::gather_rows(world, y);
  const auto dx_all = comm::gather_rows(world, back.dx);
  // Expert gradients: replica 0's ep group holds every expert once (world rank 0 is its ep rank 0).
  auto grads = back.grads;  // gradient type: T, or fp32 for the bf16 CUDA block
  if (layout.replica() == 0) {
    auto gather_experts = [&](const auto& g) {
      using V = std::decay_t<decltype(g)>;
      using Flat = Kokkos::View<typename V::non_const_value_type**, Kokkos::LayoutRight, typename V::memory_space,
                                Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
      const std::size_t inner = g.extent(0) == 0 ? 0 : g.span() / g.extent(0);
      const auto all = comm::gather_rows(layout.ep_group(), Flat(g.data(), g.extent(0), inner));
      auto layout_all = g.layout();
      layout_all.dimension[0] = all.extent(0);
      V out(std::string(g.label()), layout_all);
      Kokkos::deep_copy(Flat(out.data(), all.extent(0), all.extent(1)), all);
      return out;
    };
    grads.w1 = gather_experts(back.grads.w1);
    grads.w3 = gather_experts(back.grads.w3);
    grads.w2 = gather_experts(back.grads.w2);
    if (back.grads.has_expert_biases()) {  // [E_local, F] and [E_local, H] slices, gathered the same way
      grads.w1_bias = gather_experts(back.grads.w1_bias);
      grads.w3_bias = gather_experts(back.grads.w3_bias);
      grads.w2_bias = gather_experts(back.grads.w2_bias);
    }
  }
  if (world.rank() != 0) return {};
  return block_outputs(job, logits, topk_idx, topk_weight, y_all, dx_all, grads);
}
#endif

template <class T, class Space>
std::vector<io::TensorToWrite> run_block(const BlockJob& job) {
#if KMOE_ENABLE_MPI
  if (job.layout) return run_block_ep<T, Space>(job);  // expert parallelism, every layer and space
#endif
  auto layer = moe::layer_from_checkpoint<T, Space>(job.checkpoint, job.layer, job.options);
  const std::int64_t tokens = job.x.extent(0);
  const auto x = to_matrix<T, Space>(job.x, 0, tokens);
  const auto dy = to_matrix<T, Space>(job.dy, 0, tokens);
  auto y = layer.forward(x);
  auto g = layer.backward(dy);
  return block_outputs(job, layer.router_logits(), layer.routing().topk_idx, layer.routing().topk_weight, y, g.dx,
                       g.grads);
}

template <class T>
std::vector<io::TensorToWrite> run_on_backend(const BlockJob& job, const std::string& backend) {
#ifdef KOKKOS_ENABLE_SERIAL
  if (backend == "serial") return run_block<T, Kokkos::Serial>(job);
#endif
#ifdef KOKKOS_ENABLE_OPENMP
  if (backend == "openmp") return run_block<T, Kokkos::OpenMP>(job);
#endif
  if (backend == "default") {
#if defined(KOKKOS_ENABLE_OPENMP)
    return run_block<T, Kokkos::OpenMP>(job);
#else
    return run_block<T, Kokkos::Serial>(job);
#endif
  }
  throw UsageError("--backend " + backend + " is not built into this kmoe");
}

int run(int argc, char** argv, const std::vector<std::string>& argv_rest) {
  Args args("kmoe block", argv_rest,
            {"checkpoint", "layer", "inputs", "out", "precision", "impl", "backend", "block", "ep", "engine", "comm"});
  args.expect_positionals(0, 0, "no positional arguments");
  moe::MoeOptions options;
  const std::string ckpt_dir = args.required("checkpoint");
  constexpr long long kMaxInt = std::numeric_limits<int>::max();
  KMOE_CHECK_USAGE(args.has("layer"), "missing --layer");
  const long long layer = args.get_int("layer", 0, 0, kMaxInt);
  const std::string inputs = args.required("inputs");
  const std::string out = args.required("out");
  // --out is replaced as a whole (written beside itself, renamed into place): it may not be an input.
  const auto out_path = resolved_path({"--out", out});
  KMOE_CHECK_USAGE(out_path != resolved_path({"--inputs", inputs}), "--out ", out, " is the --inputs file");
  KMOE_CHECK_USAGE(!path_within(out_path, resolved_path({"--checkpoint", ckpt_dir})), "--out ", out,
                   " lies inside --checkpoint ", ckpt_dir, ": choose an output file apart from the inputs");
  const std::string precision = args.get_choice("precision", "f64", {"f64", "f32", "bf16"});
  options.impl = moe::parse_expert_impl(args.get_choice("impl", "scatter", {"scatter", "padded"}));
  const std::string backend = args.get_choice("backend", "default", {"default", "serial", "openmp", "cuda"});
  KMOE_CHECK_USAGE(precision != "bf16" || backend == "cuda", "--precision bf16 runs on --backend cuda only");
  options.gemm = parse_engine(args.get_choice("engine", "auto", {"auto", "blas", "kokkos", "cutlass"}));
  const std::string comm_choice = args.get_choice("comm", "auto", {"auto", "nccl", "mpi"});
#if !KMOE_ENABLE_CUDA
  KMOE_CHECK_USAGE(backend != "cuda", "--backend cuda needs a kmoe built with KMOE_ENABLE_CUDA=ON");
#endif
  options.block = args.get_int("block", options.block, 1, kMaxInt);
  options.top_k = 0;  // from the config
  const long long ep = args.get_int("ep", 0, 1, kMaxInt);

  Runtime runtime(argc, argv);
#if KMOE_ENABLE_MPI
  // Under mpirun (or with --ep) every rank runs the body; a rank that fails ends the job with its message instead of
  // leaving the others waiting in a collective.
  const bool distributed = runtime.size() > 1 || args.has("ep");
  std::unique_ptr<comm::Communicator> world;
  if (distributed) {
#if KMOE_ENABLE_CUDA
    if (backend == "cuda") world = device_world(comm_choice);  // the GPU layers exchange device buffers
#endif
    if (!world) world = comm::MpiCommunicator::world();
  }
  std::optional<comm::ExpertParallel> layout;
#else
  KMOE_CHECK_USAGE(!args.has("ep"), "--ep needs a kmoe built with MPI (KMOE_ENABLE_MPI=ON)");
  const bool distributed = false;
#endif
  auto body = [&]() -> int {
    BlockJob job;  // after the runtime: its Views must die before Kokkos::finalize
    job.options = options;
    job.out = out;
    job.checkpoint = io::HfCheckpoint::open(ckpt_dir);
    const auto& config = job.checkpoint.config();
    KMOE_CHECK_INPUT(layer < config.num_layers, ckpt_dir, ": --layer ", layer, " is out of range (the model has ",
                     config.num_layers, " layers: 0..", config.num_layers - 1, ")");
    job.layer = static_cast<int>(layer);
#if KMOE_ENABLE_MPI
    if (distributed) {
      // Checks the layout (ep <= experts, N a multiple of ep) identically on every rank before any communication.
      layout.emplace(*world, config.num_experts, static_cast<int>(ep));
      job.layout = &*layout;
    }
#endif

    const auto file = io::SafetensorsFile::open(inputs);
    const std::string p = "layers." + std::to_string(layer) + ".";
    const auto& xt = file.tensor(p + "x");
    const auto& dyt = file.tensor(p + "dy");
    KMOE_CHECK_INPUT(!xt.shape.empty() && xt.shape.back() == config.hidden_size, inputs, ": tensor '", xt.name,
                     "' has shape ", xt.shape_string(), ", expected [..., ", config.hidden_size, "] (hidden_size)");
    KMOE_CHECK_INPUT(dyt.shape == xt.shape, inputs, ": tensor '", dyt.name, "' has shape ", dyt.shape_string(),
                     ", expected the shape of '", xt.name, "' ", xt.shape_string());
    job.x_shape = xt.shape;
    const std::int64_t hidden = config.hidden_size, tokens = xt.numel() / hidden;
    KMOE_CHECK_INPUT(tokens >= 1, inputs, ": tensor '", xt.name, "' has no tokens (shape ", xt.shape_string(), ")");
    if (options.impl == moe::ExpertImpl::Padded) {
      // Every expert that receives a token gets a group of at least --block rows of hidden_size values.
      const double element = precision == "f64" ? 8 : precision == "f32" ? 4 : 2;
      check_fits_in_memory("block", std::to_string(options.block),
                           static_cast<double>(options.block) * static_cast<double>(hidden) * element,
                           "the padded path (--block rows x hidden_size " + std::to_string(hidden) + ")");
    }
    using HostMatrix = Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>;
    auto load = [&](const io::TensorView& t, HostMatrix& dst) {
      const auto v = io::to_host_view<double>(t);  // flat, row-major: [..., H] is [tokens, H]
      dst = HostMatrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, t.name), tokens, hidden);
      std::copy(v.data(), v.data() + v.extent(0), dst.data());
    };
    load(xt, job.x);
    load(dyt, job.dy);

    std::vector<io::TensorToWrite> tensors;
#if KMOE_ENABLE_CUDA
    if (backend == "cuda") {
      // bf16: MoeLayer<bf16, Kokkos::Cuda>, kmoe's CUDA block; f32/f64: the portable layer on the GPU.
      if (precision == "bf16") tensors = run_block<bf16, Kokkos::Cuda>(job);
      else if (precision == "f64") tensors = run_block<double, Kokkos::Cuda>(job);
      else tensors = run_block<float, Kokkos::Cuda>(job);
    }
#endif
    if (backend != "cuda")
      tensors = precision == "f64" ? run_on_backend<double>(job, backend) : run_on_backend<float>(job, backend);
    if (!distributed || runtime.rank() == 0) io::write_safetensors(job.out, tensors);
    return 0;
  };
#if KMOE_ENABLE_MPI
  if (distributed)
    return comm::run_or_abort(*world, "kmoe block", [&] { return translating_filesystem_errors(body); });
#endif
  return body();
}

}  // namespace

const Subcommand& block_command() {
  static const Subcommand cmd{"block", "run one MoE block forward and backward on recorded inputs", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
