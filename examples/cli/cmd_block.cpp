// kmoe block: run one MoE block forward and backward on recorded inputs (the transformers oracle's layout).
#include "cli.hpp"

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/checkpoint.hpp>
#include <kmoe/moe/moe_layer.hpp>

#include <algorithm>
#include <iostream>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe block --checkpoint DIR --layer I --inputs FILE --out FILE [--precision f64|f32]\n"
    "                  [--impl scatter|padded] [--backend serial|openmp]\n\n"
    "Runs MoE layer I of the checkpoint forward and backward of L = sum(y * dy) on the float64 tensors\n"
    "layers.I.x and layers.I.dy ([..., hidden]) of the safetensors FILE, and writes (float64, int64 topk_idx)\n"
    "layers.I.{router_logits, topk_idx, topk_weight, y, dx, grad.gate, grad.w1, grad.w3, grad.w2} and, for a model\n"
    "with a shared expert, layers.I.grad.shared_{w1,w3,w2} to --out (atomically). The output includes the shared expert.\n\n"
    "  --precision f64|f32      compute type (default f64; f64 computes the softmax in float64)\n"
    "  --impl scatter|padded    ScatterMoE-style or MegaBlocks-style expert path (default scatter)\n"
    "  --backend serial|openmp  Kokkos execution space (default: Kokkos' default)\n"
    "exit codes: 0 ok, 1 bad input (checkpoint, inputs, shapes, layer out of range), 2 bad usage\n";

struct BlockJob {
  io::HfCheckpoint checkpoint;
  int layer = 0;
  std::vector<std::int64_t> x_shape;  // as in the inputs file
  Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace> x, dy;
  moe::MoeOptions options;
  std::string out;
};

template <class T, class Space>
std::vector<io::TensorToWrite> run_block(const BlockJob& job) {
  auto layer = moe::layer_from_checkpoint<T, Space>(job.checkpoint, job.layer, job.options);
  using matrix = typename moe::MoeViews<T, Space>::matrix;
  const std::int64_t tokens = job.x.extent(0), hidden = job.x.extent(1);
  matrix x(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("x")), tokens, hidden);
  matrix dy(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("dy")), tokens, hidden);
  auto to_t = [&](const auto& src, const matrix& dst) {
    auto h = Kokkos::create_mirror_view(dst);
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t c = 0; c < hidden; ++c) h(t, c) = T(src(t, c));
    Kokkos::deep_copy(dst, h);
  };
  to_t(job.x, x);
  to_t(job.dy, dy);
  auto y = layer.forward(x);
  auto g = layer.backward(dy);
  const std::string p = "layers." + std::to_string(job.layer) + ".";
  std::vector<io::TensorToWrite> out;
  auto add = [&](const std::string& name, const auto& view) {
    out.push_back(io::tensor_from_host_view(p + name, view, io::DType::F64));
  };
  auto add_like_x = [&](const std::string& name, const matrix& view) {
    add(name, view);
    out.back().shape = job.x_shape;  // same elements, row-major: only the leading dims differ
  };
  add("router_logits", layer.router_logits());
  out.push_back(io::tensor_from_host_view(p + "topk_idx", layer.routing().topk_idx, io::DType::I64));
  add("topk_weight", layer.routing().topk_weight);
  add_like_x("y", y);
  add_like_x("dx", g.dx);
  add("grad.gate", g.grads.router);
  add("grad.w1", g.grads.w1);
  add("grad.w3", g.grads.w3);
  add("grad.w2", g.grads.w2);
  if (layer.weights().has_shared()) {
    add("grad.shared_w1", g.grads.shared_w1);
    add("grad.shared_w3", g.grads.shared_w3);
    add("grad.shared_w2", g.grads.shared_w2);
  }
  return out;
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
  // --ep M (expert parallelism over MPI ranks) is added by comm/ beside these.
  Args args("kmoe block", argv_rest,
            {"checkpoint", "layer", "inputs", "out", "precision", "impl", "backend", "block"});
  args.expect_positionals(0, 0, "no positional arguments");
  moe::MoeOptions options;
  const std::string ckpt_dir = args.required("checkpoint");
  const long long layer = args.get_int("layer", -1);
  KMOE_CHECK_USAGE(args.has("layer"), "missing --layer");
  KMOE_CHECK_USAGE(layer >= 0, "--layer ", layer, " must be >= 0");
  const std::string inputs = args.required("inputs");
  const std::string out = args.required("out");
  const std::string precision = args.get_choice("precision", "f64", {"f64", "f32"});
  options.impl = moe::parse_expert_impl(args.get_choice("impl", "scatter", {"scatter", "padded"}));
  const std::string backend = args.get_choice("backend", "default", {"default", "serial", "openmp"});
  options.block = args.get_int("block", options.block);
  KMOE_CHECK_USAGE(options.block >= 1, "--block ", options.block, " must be >= 1");
  options.top_k = 0;  // from the config

  Runtime runtime(argc, argv);
  BlockJob job;  // after the runtime: its Views must die before Kokkos::finalize
  job.options = options;
  job.out = out;
  job.checkpoint = io::HfCheckpoint::open(ckpt_dir);
  const auto& config = job.checkpoint.config();
  KMOE_CHECK_INPUT(layer < config.num_layers, ckpt_dir, ": --layer ", layer, " is out of range (the model has ",
                   config.num_layers, " layers: 0..", config.num_layers - 1, ")");
  job.layer = static_cast<int>(layer);

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
  using HostMatrix = Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  auto load = [&](const io::TensorView& t, HostMatrix& dst) {
    const auto v = io::to_host_view<double>(t);  // flat, row-major: [..., H] is [tokens, H]
    dst = HostMatrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, t.name), tokens, hidden);
    std::copy(v.data(), v.data() + v.extent(0), dst.data());
  };
  load(xt, job.x);
  load(dyt, job.dy);

  const auto tensors = precision == "f64" ? run_on_backend<double>(job, backend) : run_on_backend<float>(job, backend);
  io::write_safetensors(job.out, tensors);
  return 0;
}

}  // namespace

const Subcommand& block_command() {
  static const Subcommand cmd{"block", "run one MoE block forward and backward on recorded inputs", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
