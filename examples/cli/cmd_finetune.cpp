// kmoe finetune: fine-tune the MoE blocks of a checkpoint (the main job), one process or under mpirun with expert
// parallelism; sharded HDF5 checkpoints along the way, the last one converted back to Hugging Face at the end.
#include <kmoe/config.hpp>

#include "cli.hpp"

#if KMOE_ENABLE_MPI && KMOE_ENABLE_HDF5
#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/gradients.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/comm/router_losses.hpp>
#if KMOE_ENABLE_NCCL
#include <kmoe/comm/nccl_communicator.hpp>
#endif
#include <kmoe/core/progress.hpp>
#include <kmoe/core/router_losses.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/adamw.hpp>
#include <kmoe/moe/checkpoint.hpp>
#include <kmoe/moe/synthetic_task.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <type_traits>

namespace kmoe::cli {
namespace {

const char* const kHelp =
    "usage: kmoe finetune --checkpoint HF_DIR --steps N --out RUN_DIR [options]\n"
    "       mpirun -np P kmoe finetune ... (expert parallelism: each rank owns a contiguous range of experts)\n\n"
    "Fine-tunes every MoE block of a Hugging Face checkpoint (router, experts, shared expert) for N steps with AdamW\n"
    "(decoupled weight decay, clipping by the global gradient norm) on a layer-wise objective: the mean squared error\n"
    "between each block's output and a target, averaged over layers and tokens, plus optional router losses\n"
    "(--aux-loss-coef, --z-loss-coef).\n"
    "  - without --data, a synthetic task that runs on any checkpoint: each layer fits the outputs of a perturbed copy\n"
    "    of itself (weights times 1 + perturb * N(0,1)) on seeded random hidden states N(0,1): a fixed data set of\n"
    "    --batches batches of --tokens tokens, cycled; the inputs depend only on (seed, batch, layer), so losses are\n"
    "    the same for any rank count;\n"
    "  - with --data FILE, recorded hidden states: safetensors with layers.{i}.x (inputs) and layers.{i}.y (targets)\n"
    "    of shape [..., hidden] for every MoE layer i; all tokens every step.\n"
    "Prints the loss (and the router losses when on) and the wall time per step (and a progress bar on a terminal),\n"
    "saves sharded HDF5 checkpoints RUN_DIR/checkpoint-K\n"
    "(every --save-every K steps and at the end; docs/checkpoint-format.md), and converts the last one into RUN_DIR/hf,\n"
    "a Hugging Face directory: non-MoE tensors byte-identical to HF_DIR, MoE tensors trained (rounded to the\n"
    "checkpoint's dtype). With --steps 0 the loaded weights are saved unchanged (RUN_DIR/hf reproduces HF_DIR).\n\n"
    "options (numbers must be finite and in the ranges shown; counts are integers):\n"
    "  --checkpoint HF_DIR     the Hugging Face checkpoint to start from (required)\n"
    "  --steps N               optimizer steps in total, counting resumed ones (required, 0..10^12)\n"
    "  --out RUN_DIR           where checkpoints and the converted model go (required): a directory or a new path,\n"
    "                          not inside HF_DIR; RUN_DIR/checkpoint-K and RUN_DIR/hf are replaced when written\n"
    "  --resume                continue from the newest RUN_DIR/checkpoint-K (weights, AdamW state, step), saved by\n"
    "                          any rank count; starts from HF_DIR when RUN_DIR holds no checkpoint-K; a newest\n"
    "                          checkpoint-K without a readable manifest.h5 is an error (move it away to resume\n"
    "                          from the one before)\n"
    "  --save-every K          also save RUN_DIR/checkpoint-K every K steps (default 0: only at the end; 0..10^12)\n"
    "  --lr X                  AdamW learning rate (default 3e-4; >= 0)\n"
    "  --weight-decay X        AdamW decoupled weight decay (default 0; >= 0)\n"
    "  --beta1 X, --beta2 X    AdamW moment decays (default 0.9, 0.999; in [0, 1))\n"
    "  --eps X                 AdamW epsilon (default 1e-8; > 0, at least the smallest normal number of the\n"
    "                          precision: 1.2e-38 for f32); lr / (1 - beta1) and lr * weight_decay must also be\n"
    "                          finite in the precision\n"
    "  --clip X                clip gradients to global L2 norm X (default 1.0; 0 = no clipping; >= 0)\n"
    "  --aux-loss-coef X       add X times the load-balancing loss (Switch/Mixtral, transformers'\n"
    "                          load_balancing_loss_func over all MoE layers' tokens of the step, all ranks) to the\n"
    "                          objective (default 0: off; >= 0; Mixtral's router_aux_loss_coef is 0.02)\n"
    "  --z-loss-coef X         add X times the router z-loss (ST-MoE: mean over the same tokens of\n"
    "                          logsumexp(router logits)^2) to the objective (default 0: off; >= 0)\n"
    "  --ep E                  ranks per expert-parallel group (default: all ranks; the rest are replicas; >= 1)\n"
    "  --data FILE             recorded hidden states (see above) instead of the synthetic task\n"
    "  --tokens T              synthetic task: tokens per step over all ranks (default 256; >= 1, and a step's\n"
    "                          activations must fit in this machine's memory)\n"
    "  --batches B             synthetic task: batches in the data set (default 1: the same batch every step;\n"
    "                          1..10^12)\n"
    "  --perturb X             synthetic task: relative perturbation of the teacher (default 0.1; 0..1000)\n"
    "  --seed S                synthetic task: seed of inputs and teacher (default 0; >= 0)\n"
    "  --backend serial|openmp|cuda  Kokkos execution space (default: Kokkos' default)\n"
    "  --precision f32|f64|bf16  what the blocks compute in (default f32; bf16 on --backend cuda: the bf16 CUDA block\n"
    "                          on a bf16 copy of fp32 master weights, fp32 gradients and AdamW state; f32/f64 there\n"
    "                          run the portable layer); the master weights and AdamW state are f64 with f64, else f32\n"
    "  --engine auto|blas|kokkos|cutlass  the expert GEMMs' engine (default auto: measured per shape; cutlass: the\n"
    "                          bf16 CUDA block only)\n"
    "  --comm auto|nccl|mpi    --backend cuda under mpirun: NCCL (one GPU per rank) or MPI over device buffers (ranks\n"
    "                          may share a GPU); auto = NCCL when built and no two ranks share a GPU\n"
    "  --no-convert            skip the final conversion into RUN_DIR/hf\n"
    "A value that starts with -- is given as --name=VALUE.\n"
    "exit codes: 0 done, 1 bad input (checkpoint, data, resumed state, a path the system refuses), 2 bad usage\n";

#if KMOE_ENABLE_MPI && KMOE_ENABLE_HDF5

namespace fs = std::filesystem;

struct Settings {
  fs::path hf_dir, run_dir, data;
  std::int64_t steps = 0, save_every = 0, tokens = 256, batches = 1;
  std::uint64_t seed = 0;
  double clip = 1.0, perturb = 0.1;
  moe::AdamWOptions adamw;
  core::RouterLossCoefficients router_loss;  ///< --aux-loss-coef, --z-loss-coef
  int ep = 0;
  bool resume = false, convert = true;
  moe::MoeOptions options;  ///< the blocks' engine (top_k comes from the checkpoint)
};

std::string checkpoint_name(std::int64_t step) { return "checkpoint-" + std::to_string(step); }

// --out: a directory, or a path that does not exist yet (the first save creates it). Checked before any work, so that
// a run never trains for hours to fail at its first save.
void check_run_dir(const Settings& s) {
  std::error_code ec;
  const fs::file_status st = fs::status(s.run_dir, ec);
  if (st.type() == fs::file_type::not_found && (!ec || ec == std::errc::no_such_file_or_directory)) return;
  KMOE_CHECK_INPUT(!ec, "--out ", s.run_dir.string(), ": ", ec.message());
  KMOE_CHECK_USAGE(fs::is_directory(st), "--out ", s.run_dir.string(), ": exists and is not a directory");
}

// Saves replace RUN_DIR/checkpoint-K and the conversion replaces RUN_DIR/hf as a whole: neither may hold an input,
// and RUN_DIR may not lie inside HF_DIR (the run would write into the checkpoint it reads).
void check_run_dir_apart(const Settings& s) {
  const fs::path run = resolved_path({"--out", s.run_dir});
  for (const NamedPath& in : {NamedPath{"--checkpoint", s.hf_dir}, NamedPath{"--data", s.data}}) {
    if (in.path.empty()) continue;
    const fs::path i = resolved_path(in);
    KMOE_CHECK_USAGE(!path_within(run, i), "--out ", s.run_dir.string(), (run == i ? " is " : " lies inside "), in.name,
                     " ", in.path.string(), ": choose a run directory apart from the inputs");
    if (i == run || !path_within(i, run)) continue;
    const std::string first = i.lexically_relative(run).begin()->string();
    KMOE_CHECK_USAGE(!(s.convert && first == "hf") && first.rfind("checkpoint-", 0) != 0, in.name, " ",
                     in.path.string(), (i == run / first ? " is " : " lies inside "), (s.run_dir / first).string(),
                     ", which kmoe finetune replaces: move it out of --out ", s.run_dir.string());
  }
}

// The checkpoint --resume continues from: RUN_DIR/checkpoint-K with the largest K, which must be complete; empty when
// RUN_DIR holds none (a fresh start from HF_DIR). A newest checkpoint-K without a readable manifest is an InputError
// naming it, never a silent fresh start: that would drop the run's progress, and the next save of step K would
// replace the directory.
fs::path resume_point(const fs::path& run_dir) {
  std::error_code ec;
  if (fs::status(run_dir, ec).type() == fs::file_type::not_found) return {};
  fs::directory_iterator it(run_dir, ec);
  KMOE_CHECK_INPUT(!ec, "--resume: cannot list ", run_dir.string(), ": ", ec.message());
  fs::path newest;
  std::int64_t newest_step = -1;
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const std::string digits = name.rfind("checkpoint-", 0) == 0 ? name.substr(11) : std::string();
    // The names finetune writes: checkpoint_name(K), K without leading zeros.
    if (digits.empty() || digits.size() > 18 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::int64_t k = std::stoll(digits);
    if (checkpoint_name(k) == name && k > newest_step) {
      newest_step = k;
      newest = it->path();
    }
  }
  KMOE_CHECK_INPUT(!ec, "--resume: cannot list ", run_dir.string(), ": ", ec.message());
  KMOE_CHECK_INPUT(newest.empty() || io::is_hdf5_checkpoint(newest), "--resume: ", newest.string(),
                   ", the newest checkpoint of ", run_dir.string(),
                   ", has no readable manifest.h5 (damaged or not written by kmoe finetune); move it out of ",
                   run_dir.string(), " to resume from the one before");
  return newest;
}

// Every layer that has a MoE tensor is trained, so each must be complete: a layer with, say, its experts but not its
// router is an InputError naming the missing tensor (as kmoe block says), never a layer silently left out.
void check_moe_layers_complete(const io::HfCheckpoint& hf, const io::ModelSpec& spec, const std::vector<int>& layers) {
  for (const auto& name : hf.tensor_names()) {
    int layer = -1;
    if (!io::is_moe_tensor(spec, name, &layer) || std::find(layers.begin(), layers.end(), layer) != layers.end())
      continue;
    for (const auto& e : io::moe_layer_tensors(spec, hf.config(), layer))
      KMOE_CHECK_INPUT(hf.has(e.name), hf.dir().string(), ": MoE layer ", layer, " has tensor ", name, " but not ",
                       e.name, " (", spec.architecture, ")");
  }
}

// The synthetic task's activations for one step, before anything is allocated: each rank holds, for its share of
// --tokens, at least x, the target, y and dy of the layer in progress and dx of every layer until the update
// (a lower bound: the layers' own buffers come on top).
void check_tokens_fit(const Settings& s, const io::ModelConfig& c, std::size_t layers, int ranks, std::size_t bytes) {
  if (!s.data.empty()) return;  // --data: the file's rows, bounded by the file
  const double rows = std::ceil(static_cast<double>(s.tokens) / ranks);
  const double need = rows * static_cast<double>(c.hidden_size) * static_cast<double>(4 + layers) * bytes;
  check_fits_in_memory("tokens", std::to_string(s.tokens), need,
                       "the synthetic task (" + std::to_string(static_cast<long long>(rows)) + " tokens per rank x " +
                           "hidden_size " + std::to_string(c.hidden_size) + " x " + std::to_string(4 + layers) +
                           " activations of " + std::to_string(bytes) + " bytes)");
}

// A RankGroup (io's collective hook for saves) over a kmoe communicator.
io::RankGroup rank_group(comm::Communicator& world) {
  io::RankGroup g;
  g.rank = world.rank();
  g.size = world.size();
  g.all_ok = [&world](bool ok) {
    double bad = ok ? 0.0 : 1.0;
    world.allreduce_sum_host(&bad, 1);
    return bad == 0.0;
  };
  return g;
}

// ---- kmoe weights <-> io's host layout ------------------------------------------------------------------------

template <class T, class Space>
io::MoeLayerWeights<T> to_host(const moe::MoeWeights<T, Space>& w) {
  io::MoeLayerWeights<T> h;
  moe::for_each_weight_pair(h, w, [](auto& dst, const auto& src, const char* label) {
    using D = std::decay_t<decltype(dst)>;
    dst = D(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), src.layout());
    Kokkos::deep_copy(dst, src);
  });
  // The selection bias is not trained (not one of the pairs) but is written back with the layer.
  h.score_bias = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w.score_bias);
  return h;
}

// Copies host weights into existing device weights of the same shapes (InputError naming the tensor otherwise).
template <class T, class Space>
void copy_into(const moe::MoeWeights<T, Space>& dst, const io::MoeLayerWeights<T>& src, const std::string& what) {
  moe::for_each_weight_pair(dst, src, [&](const auto& d, const auto& s, const char* part) {
    if (d.span() == 0 && s.span() == 0) return;  // no shared expert (extents differ between empty Views)
    bool same = d.span() == s.span();
    for (unsigned r = 0; r < 3 && same; ++r) same = d.extent(r) == s.extent(r);
    KMOE_CHECK_INPUT(same, what, ": ", part, " has ", s.span(), " elements [", s.extent(0), ",", s.extent(1),
                     "...], expected [", d.extent(0), ",", d.extent(1), "...]");
    Kokkos::deep_copy(d, s);
  });
}

// ---- the layer-wise objective -----------------------------------------------------------------------------------

/// dst = v in dst's type (bf16: rounded to nearest even).
template <class T, class A>
KOKKOS_INLINE_FUNCTION void store_as(T& dst, A v) {
  dst = static_cast<T>(v);
}
template <class A>
KOKKOS_INLINE_FUNCTION void store_as(bf16& dst, A v) {
  dst = bf16::from_float(static_cast<float>(v));
}

// loss += scale * sum((y - target)^2); dy = 2 * scale * (y - target). Returns this rank's loss share.
template <class T, class Space>
double mse_and_gradient(const typename moe::MoeViews<T, Space>::matrix& y,
                        const typename moe::MoeViews<T, Space>::matrix& target,
                        const typename moe::MoeViews<T, Space>::matrix& dy, double scale) {
  // bf16 values are differenced in float (the bf16 type has no arithmetic); float/double in their own type.
  using A = std::conditional_t<std::is_same<T, bf16>::value, float, T>;
  const std::size_t n = y.span();
  const T* yp = y.data();
  const T* tp = target.data();
  T* dp = dy.data();
  const A two_scale = static_cast<A>(2 * scale);
  double sum = 0;
  Kokkos::parallel_reduce(
      "kmoe::finetune::mse", Kokkos::RangePolicy<Space>(0, n),
      KOKKOS_LAMBDA(const std::size_t i, double& acc) {
        const A d = static_cast<A>(yp[i]) - static_cast<A>(tp[i]);
        store_as(dp[i], two_scale * d);
        acc += static_cast<double>(d) * static_cast<double>(d);
      },
      sum);
  return sum * scale;
}

/// dst = src converted element by element (float -> bf16 rounds to nearest even); same shapes. Blocks.
template <class Space, class D, class S>
void convert_into(const D& dst, const S& src) {
  const std::size_t n = src.span();
  auto* d = dst.data();
  const auto* sp = src.data();
  Kokkos::parallel_for(
      "kmoe::finetune::convert", Kokkos::RangePolicy<Space>(0, n), KOKKOS_LAMBDA(const std::size_t i) {
        store_as(d[i], sp[i]);
      });
  Space().fence();
}

/// A copy of `w` in value type C (the compute copy of fp32 master weights), or `w` itself when C is T.
template <class C, class T, class Space>
moe::MoeWeights<C, Space> compute_copy(const moe::MoeWeights<T, Space>& w) {
  if constexpr (std::is_same<C, T>::value) {
    return w;
  } else {
    moe::MoeWeights<C, Space> out;
    moe::for_each_weight_pair(out, w, [](auto& dst, const auto& src, const char* name) {
      using V = std::decay_t<decltype(dst)>;
      dst = V(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("kmoe::compute::") + name), src.layout());
      convert_into<Space>(dst, src);
    });
    out.first_expert = w.first_expert;
    if constexpr (std::is_same<typename moe::MoeWeights<C, Space>::wide_vector,
                               typename moe::MoeWeights<T, Space>::wide_vector>::value) {
      out.score_bias = w.score_bias;  // the same wide type (float for both fp32 masters and bf16 compute)
    } else {
      using WV = typename moe::MoeWeights<C, Space>::wide_vector;
      out.score_bias = WV("kmoe::compute::score_bias", w.score_bias.extent(0));
      convert_into<Space>(out.score_bias, w.score_bias);
    }
    out.routing = w.routing;
    out.expert = w.expert;
    out.family = w.family;
    return out;
  }
}

// ---- the trainer ------------------------------------------------------------------------------------------------

/// T: the master weights and AdamW state; C: the type the blocks compute in (T itself, or bf16 on the GPU: the bf16
/// CUDA block runs on a bf16 copy of the fp32 masters, refreshed after every optimizer step, and returns fp32
/// gradients that the optimizer applies to the masters — mixed precision as PyTorch AMP trains).
template <class T, class Space, class C = T>
class Trainer {
 public:
  using Weights = moe::MoeWeights<T, Space>;
  using matrix = typename moe::MoeViews<T, Space>::matrix;
  using cmatrix = typename moe::MoeViews<C, Space>::matrix;
  using Block = comm::DistributedMoe<C, Space>;

  Trainer(const Settings& s, comm::Communicator& world)
      : s_(s), world_(world), hf_(io::HfCheckpoint::open(s.hf_dir)), spec_(io::spec_for(hf_.config().architecture)) {
    layers_ = io::find_moe_layers(hf_, spec_);
    KMOE_CHECK_INPUT(!layers_.empty(), s.hf_dir.string(), ": no MoE layer found (architecture ", spec_.architecture,
                     ")");
    check_moe_layers_complete(hf_, spec_, layers_);
    check_tokens_fit(s, hf_.config(), layers_.size(), world_.size(), sizeof(T));
    layout_ = std::make_unique<comm::ExpertParallel>(world_, hf_.config().num_experts, s.ep);
    moe::MoeOptions options = s.options;
    options.top_k = hf_.config().top_k;
    top_k_ = options.top_k;

    fs::path resume_from;
    if (s.resume) resume_from = resume_point(s.run_dir);
    std::unique_ptr<io::Hdf5Checkpoint> ck;
    if (!resume_from.empty()) {
      ck = std::make_unique<io::Hdf5Checkpoint>(io::Hdf5Checkpoint::open(resume_from));
      io::check_same_model(*ck, hf_);
      KMOE_CHECK_INPUT(io::moe_layers(*ck) == layers_, resume_from.string(), ": its MoE layers differ from ",
                       s.hf_dir.string(), "'s");
      start_step_ = ck->step();
      resumed_from_ = resume_from;
    }
    if (world_.rank() == 0) {
      if (ck)
        std::cout << "kmoe finetune: resuming from " << resume_from.string() << " (step " << start_step_
                  << ", saved by " << ck->saved_world_size() << " ranks)\n";
      else if (s.resume)
        std::cout << "kmoe finetune: no checkpoint in " << s.run_dir.string() << ", starting from "
                  << s.hf_dir.string() << "\n";
    }
    const auto mine = layout_->local_experts();
    for (int layer : layers_) {
      // The teacher is always the perturbation of the original weights, so a resumed run chases the same target.
      Weights original = comm::local_slice(moe::load_weights<T, Space>(hf_, layer), *layout_);
      Weights student = ck ? from_checkpoint(*ck, layer, "", original) : deep_copy_of(original);
      if (s_.data.empty())
        teachers_.push_back(std::make_unique<Block>(
            *layout_, compute_copy<C>(moe::synthetic::perturbed_copy(original, s_.seed, layer, s_.perturb)), options));
      masters_.push_back(student);
      students_.push_back(std::make_unique<Block>(*layout_, compute_copy<C>(student), options));
      optimizers_.emplace_back(student, s_.adamw);
      if (ck && ck->has(io::moe_tensor_name(layer, "router", "optim.exp_avg."))) {
        copy_into(optimizers_.back().exp_avg(),
                  io::load_moe_layer<T>(*ck, layer, mine.begin, mine.end(), "optim.exp_avg."), "optimizer state");
        copy_into(optimizers_.back().exp_avg_sq(),
                  io::load_moe_layer<T>(*ck, layer, mine.begin, mine.end(), "optim.exp_avg_sq."), "optimizer state");
        optimizers_.back().set_step_count(start_step_);
      }
    }
    if (!s_.data.empty()) load_data();
  }

  void run() {
    const bool root = world_.rank() == 0;
    KMOE_CHECK_USAGE(s_.steps >= start_step_, "--steps ", s_.steps, " is below the resumed step ",
                     start_step_);
    if (root)
      std::cout << "kmoe finetune: " << spec_.architecture << ", " << layers_.size() << " MoE layers, "
                << hf_.config().num_experts << " experts over " << layout_->placement().ep() << " rank(s) (x"
                << layout_->placement().replicas() << " replicas), steps " << start_step_ << " -> " << s_.steps
                << ", " << (s_.data.empty() ? "synthetic task" : "data " + s_.data.string()) << "\n"
                << std::flush;
    ProgressBar bar("finetune", s_.steps - start_step_, ProgressBar::Unit::Items, root);
    fs::path last;
    // Nothing to train: --steps 0 saves the loaded weights; a resumed run already at --steps keeps its checkpoint.
    if (s_.steps == start_step_) last = resumed_from_.empty() ? save(start_step_) : resumed_from_;
    for (std::int64_t step = start_step_ + 1; step <= s_.steps; ++step) {
      const auto t0 = std::chrono::steady_clock::now();
      const StepResult r = train_step(step);  // ends with the optimizer's fence: the step's work is done
      const double loss = r.loss, norm = r.norm;
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      // loss and norm are global (the same on every rank): a non-finite one means the weights or the inputs are no
      // longer numbers, and every later step and save would carry that silently.
      KMOE_CHECK_INPUT(std::isfinite(loss) && std::isfinite(norm), "step ", step, ": loss ", loss, ", gradient norm ",
                       norm, " are not finite (training diverged: a smaller --lr? or non-finite values in the ",
                       s_.data.empty() ? "checkpoint" : "checkpoint or --data", "); nothing of this step is saved");
      if (root) {
        char line[300];
        int n = std::snprintf(line, sizeof line, "step %lld/%lld loss %.9e grad_norm %.6e time_ms %.3f",
                              static_cast<long long>(step), static_cast<long long>(s_.steps), loss, norm, ms);
        // With router losses: the block objective and the two losses unscaled (transformers' aux_loss).
        if (s_.router_loss.any())
          std::snprintf(line + n, sizeof line - n, " mse %.9e aux_loss %.9e z_loss %.9e", r.mse, r.load_balancing,
                        r.z_loss);
        std::cout << line << "\n" << std::flush;
      }
      bar.update(step - start_step_);
      if ((s_.save_every > 0 && step % s_.save_every == 0) || step == s_.steps) last = save(step);
    }
    bar.finish();
    if (s_.convert) {
      if (root) {
        io::convert_to_hf(io::Hdf5Checkpoint::open(last), s_.run_dir / "hf", s_.hf_dir, /*replace_existing=*/true);
        std::cout << "kmoe finetune: converted " << last.string() << " into " << (s_.run_dir / "hf").string() << "\n";
      }
      world_.barrier();
    }
  }

 private:
  static Weights deep_copy_of(const Weights& w) {
    Weights out = w;
    auto dup = [](auto& v) {
      using V = std::decay_t<decltype(v)>;
      V c(std::string(v.label()), v.layout());
      Kokkos::deep_copy(c, v);
      v = c;
    };
    moe::for_each_weight_pair(out, out, [&](auto& v, const auto&, const char*) { dup(v); });
    return out;
  }

  Weights from_checkpoint(const io::Hdf5Checkpoint& ck, int layer, const std::string& prefix, const Weights& like) {
    const auto mine = layout_->local_experts();
    Weights w = deep_copy_of(like);
    copy_into(w, io::load_moe_layer<T>(ck, layer, mine.begin, mine.end(), prefix),
              ck.dir().string() + ": MoE layer " + std::to_string(layer));
    return w;
  }

  void load_data() {
    const auto file = io::SafetensorsFile::open(s_.data);
    const std::int64_t H = hf_.config().hidden_size;
    for (int layer : layers_) {
      const std::string p = "layers." + std::to_string(layer) + ".";
      const io::TensorView& x = file.tensor(p + "x");
      const io::TensorView& y = file.tensor(p + "y");
      KMOE_CHECK_INPUT(!x.shape.empty() && x.shape.back() == H, x.where(), ": shape ", x.shape_string(),
                       ", expected [..., ", H, "]");
      KMOE_CHECK_INPUT(y.shape == x.shape, y.where(), ": shape ", y.shape_string(), ", expected ", x.shape_string());
      const std::int64_t rows = x.numel() / H;
      const auto part = comm::contiguous_split(rows, world_.size(), world_.rank());
      auto load = [&](const io::TensorView& t) {
        const auto all = io::to_host_view<T>(t);
        matrix m(Kokkos::view_alloc(Kokkos::WithoutInitializing, t.name), part.count, H);
        auto h = Kokkos::create_mirror_view(m);
        for (std::int64_t i = 0; i < part.count * H; ++i) h.data()[i] = all(part.begin * H + i);
        Kokkos::deep_copy(m, h);
        return m;
      };
      data_x_.push_back(load(x));
      data_y_.push_back(load(y));
      data_rows_ = rows;
    }
  }

  /// What a step reports (all global: the same on every rank).
  struct StepResult {
    double loss = 0;            ///< the objective: mse + coef_lb * load_balancing + coef_z * z_loss
    double norm = 0;            ///< the gradient norm before clipping
    double mse = 0;             ///< the blocks' mean squared error
    double load_balancing = 0;  ///< over every layer's tokens of the step (transformers' concatenation), all ranks
    double z_loss = 0;
  };

  /// The router logits of a student's last forward ([T,E], grad_value_t<C>): the bf16 block's without asking for
  /// its plan on the host.
  auto router_logits(const Block& b) const {
    if constexpr (std::is_same<C, bf16>::value)
      return b.layer().router_logits();
    else
      return b.routing().logits;
  }

  // One optimizer step over all layers: the loss (before the update) and the gradient norm (before clipping).
  // Without router losses each layer's backward follows its forward. With them, the losses' statistics cover every
  // layer and every rank, so all forwards (and one allreduce of the statistics) come before the backwards.
  StepResult train_step(std::int64_t step) {
    const std::int64_t H = hf_.config().hidden_size;
    const std::int64_t rows = s_.data.empty() ? s_.tokens : data_rows_;
    const auto part = comm::contiguous_split(rows, world_.size(), world_.rank());
    const double scale = 1.0 / (static_cast<double>(layers_.size()) * static_cast<double>(rows) * static_cast<double>(H));
    const bool router_losses = s_.router_loss.any();
    comm::GradientSet grads(*layout_);
    std::vector<moe::MoeBackward<C, Space>> backs;
    std::vector<cmatrix> dys;  // with router losses: each layer's dy until its backward
    core::RouterLossStats stats;
    using logits_matrix = typename moe::MoeViews<moe::grad_value_t<C>, Space>::matrix;
    auto add_gradients = [&](std::size_t l) {
      // Named per layer: one set over every layer, so the norm and the clipping are global.
      const auto& g = backs.back().grads;
      const std::string p = "layer" + std::to_string(layers_[l]) + ".";
      moe::for_each_weight_pair(g, g, [&](const auto& v, const auto&, const char* name) {
        const std::string n = name;
        if (v.span() == 0) return;  // a tensor the architecture lacks (shared expert, biases, gate)
        grads.add(p + n, v, moe::is_expert_tensor(n) ? comm::GradKind::expert : comm::GradKind::replicated);
      });
    };
    StepResult r;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      cmatrix x, target;
      if (s_.data.empty()) {
        matrix xt(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("x")), part.count, H);
        // Batch (step - 1) mod --batches of a fixed synthetic data set: a pure function of (seed, batch, layer).
        moe::synthetic::fill_normal(xt, s_.seed, moe::synthetic::input_stream((step - 1) % s_.batches, layers_[l]),
                                    part.begin, 1.0);
        x = as_compute(xt);
        target = teachers_[l]->forward(x);
      } else {
        x = as_compute(data_x_[l]);
        target = as_compute(data_y_[l]);
      }
      const cmatrix y = students_[l]->forward(x);
      cmatrix dy(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("dy")), part.count, H);
      r.mse += mse_and_gradient<C, Space>(y, target, dy, scale);
      if (router_losses) {
        core::router_loss_statistics(Space(), router_logits(*students_[l]), top_k_, stats);
        dys.push_back(dy);
      } else {
        backs.push_back(students_[l]->backward(dy));
        add_gradients(l);
      }
    }
    if (router_losses) {
      comm::allreduce_router_loss_stats(world_, stats);  // the statistics of the step's global batch
      r.load_balancing = stats.load_balancing_loss();
      r.z_loss = stats.z_loss();
      for (std::size_t l = 0; l < layers_.size(); ++l) {
        const logits_matrix logits = router_logits(*students_[l]);
        logits_matrix d_logits(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("d_logits")),
                               logits.extent(0), logits.extent(1));
        core::router_loss_backward(Space(), logits, stats, s_.router_loss, d_logits);
        backs.push_back(students_[l]->backward(dys[l], d_logits));
        add_gradients(l);
      }
    }
    grads.reduce();
    r.norm = s_.clip > 0 ? grads.clip(s_.clip) : grads.global_norm();
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      optimizers_[l].step(masters_[l], backs[l].grads);
      if constexpr (!std::is_same<C, T>::value) {  // the compute copy follows the masters
        moe::for_each_weight_pair(students_[l]->layer().weights(), masters_[l], [](const auto& d, const auto& m, const char*) {
          if (m.span() > 0) convert_into<Space>(d, m);
        });
      }
    }
    world_.allreduce_sum_host(&r.mse, 1);  // each rank's tokens are its own: the sum is the mean over all tokens
    r.loss = r.mse + core::router_loss(stats, s_.router_loss);
    return r;
  }

  /// A batch in the compute type: the same View when C is T, a converted copy otherwise.
  cmatrix as_compute(const matrix& m) const {
    if constexpr (std::is_same<C, T>::value) {
      return m;
    } else {
      cmatrix c(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(m.label())), m.extent(0), m.extent(1));
      convert_into<Space>(c, m);
      return c;
    }
  }

  // Saves RUN_DIR/checkpoint-STEP: non-MoE tensors (world rank 0, original bytes), MoE weights and AdamW state in
  // kmoe's layout (experts by the ranks of replica 0, router and shared expert by world rank 0).
  fs::path save(std::int64_t step) {
    const bool root = world_.rank() == 0;
    const bool writes_experts = layout_->replica() == 0;
    io::CheckpointContents c;
    c.step = step;
    c.architecture = spec_.architecture;
    c.source = io::source_plan_of(hf_);
    for (int r = 0; r < world_.size(); ++r) {
      const auto e = layout_->placement().experts_of(layout_->placement().ep_rank_of(r));
      c.expert_ranges.emplace_back(e.begin, layout_->placement().replica_of(r) == 0 ? e.end() : e.begin);
    }
    const auto& a = s_.adamw;
    c.attributes = {{"optimizer", "adamw"},
                    {"optim.step", std::to_string(step)},
                    {"optim.lr", std::to_string(a.lr)},
                    {"optim.beta1", std::to_string(a.beta1)},
                    {"optim.beta2", std::to_string(a.beta2)},
                    {"optim.eps", std::to_string(a.eps)},
                    {"optim.weight_decay", std::to_string(a.weight_decay)},
                    {"clip", std::to_string(s_.clip)},
                    {"aux_loss_coef", std::to_string(s_.router_loss.load_balancing)},
                    {"z_loss_coef", std::to_string(s_.router_loss.z_loss)},
                    {"task", s_.data.empty() ? "synthetic" : "data:" + s_.data.string()},
                    {"seed", std::to_string(s_.seed)},
                    {"tokens", std::to_string(s_.tokens)},
                    {"batches", std::to_string(s_.batches)},
                    {"perturb", std::to_string(s_.perturb)},
                    {"source", fs::absolute(s_.hf_dir).string()}};
    if (root) io::add_non_moe_tensors(c, hf_, spec_);
    const auto first = layout_->local_experts().begin;
    // Ranks of other replicas hold copies of replica 0's experts: they write nothing of the MoE layers.
    for (std::size_t l = 0; l < layers_.size() && writes_experts; ++l) {
      auto add = [&](const Weights& w, const std::string& prefix) {
        io::add_moe_layer(c, layers_[l], to_host(w), first, root, prefix);
      };
      add(masters_[l], "");
      if (step > 0) {
        add(optimizers_[l].exp_avg(), "optim.exp_avg.");
        add(optimizers_[l].exp_avg_sq(), "optim.exp_avg_sq.");
      }
    }
    const fs::path dir = s_.run_dir / checkpoint_name(step);
    io::save_hdf5_checkpoint(dir, c, rank_group(world_));
    if (root) std::cout << "kmoe finetune: saved " << dir.string() << "\n" << std::flush;
    return dir;
  }

  Settings s_;
  comm::Communicator& world_;
  io::HfCheckpoint hf_;
  const io::ModelSpec& spec_;
  std::vector<int> layers_;
  std::unique_ptr<comm::ExpertParallel> layout_;
  std::vector<Weights> masters_;  // the trained weights (the students compute on them, or on a C copy of them)
  std::vector<std::unique_ptr<Block>> students_, teachers_;
  std::vector<moe::AdamW<T, Space>> optimizers_;
  std::vector<matrix> data_x_, data_y_;
  std::int64_t data_rows_ = 0;
  std::int64_t start_step_ = 0;
  std::int64_t top_k_ = 0;  // the checkpoint's experts per token (the load-balancing loss's mask)
  fs::path resumed_from_;
};

template <class T, class Space, class C = T>
void train(const Settings& s, comm::Communicator& world) {
  Trainer<T, Space, C> trainer(s, world);
  trainer.run();
}

template <class T>
void train_on_backend(const Settings& s, comm::Communicator& world, const std::string& backend) {
  if (backend.empty()) return train<T, Kokkos::DefaultExecutionSpace>(s, world);
#ifdef KOKKOS_ENABLE_SERIAL
  if (backend == "serial") return train<T, Kokkos::Serial>(s, world);
#endif
#ifdef KOKKOS_ENABLE_OPENMP
  if (backend == "openmp") return train<T, Kokkos::OpenMP>(s, world);
#endif
  throw UsageError("--backend " + backend + " is not enabled in this build's Kokkos");
}

int run(int argc, char** argv, const std::vector<std::string>& argv_rest) {
  Args args("kmoe finetune", argv_rest,
            {"checkpoint", "steps", "out", "save-every", "lr", "weight-decay", "beta1", "beta2", "eps", "clip", "ep",
             "data", "tokens", "batches", "perturb", "seed", "precision", "backend", "engine", "comm", "aux-loss-coef",
             "z-loss-coef"},
            {"resume", "no-convert"});
  args.expect_positionals(0, 0, "no positional arguments");
  constexpr long long kMaxCount = 1000000000000;  // steps, batches: 10^12, beyond any run and far from overflow
  constexpr long long kMaxInt = std::numeric_limits<int>::max();
  Settings s;
  s.hf_dir = args.required("checkpoint");
  s.run_dir = args.required("out");
  KMOE_CHECK_USAGE(args.has("steps"), "--steps N (N >= 0) is required");
  s.steps = args.get_int("steps", 0, 0, kMaxCount);
  s.save_every = args.get_int("save-every", 0, 0, kMaxCount);
  const std::string backend = args.get_choice("backend", "", {"", "serial", "openmp", "cuda"});
  const std::string precision =
      args.get_choice("precision", backend == "cuda" ? "bf16" : "f32", {"f32", "f64", "bf16"});
  KMOE_CHECK_USAGE(precision != "bf16" || backend == "cuda", "--precision bf16 runs on --backend cuda only");
  s.adamw.lr = args.get_double("lr", 3e-4, {0});
  s.adamw.weight_decay = args.get_double("weight-decay", 0.0, {0});
  s.adamw.beta1 = args.get_double("beta1", 0.9, {0, 1, false, true});
  s.adamw.beta2 = args.get_double("beta2", 0.999, {0, 1, false, true});
  s.adamw.eps = args.get_double("eps", 1e-8, {0, std::numeric_limits<double>::infinity(), true});
  // AdamW's update runs in the training precision: its constants must be finite there, and eps must not round to 0
  // (0 / 0 for a parameter whose gradient and moments are 0).
  const bool f32 = precision != "f64";  // bf16 blocks train fp32 master weights
  const double largest = f32 ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max();
  const double smallest = f32 ? std::numeric_limits<float>::min() : std::numeric_limits<double>::min();
  const char* master = f32 ? "f32" : "f64";
  KMOE_CHECK_USAGE(s.adamw.eps >= smallest, "--eps ", args.get("eps", ""), " is below the smallest normal number of ",
                   master, " (", smallest, ")");
  KMOE_CHECK_USAGE(s.adamw.lr / (1 - s.adamw.beta1) <= largest && s.adamw.lr * s.adamw.weight_decay <= largest,
                   "--lr ", args.get("lr", "3e-4"), " with --beta1 ", args.get("beta1", "0.9"), " and --weight-decay ",
                   args.get("weight-decay", "0"),
                   " overflows ", master, " in the AdamW update (lr / (1 - beta1) and lr * weight_decay must be ",
                   "finite)");
  s.clip = args.get_double("clip", 1.0, {0});
  s.router_loss.load_balancing = args.get_double("aux-loss-coef", 0.0, {0});
  s.router_loss.z_loss = args.get_double("z-loss-coef", 0.0, {0});
  s.ep = static_cast<int>(args.get_int("ep", 0, 1, kMaxInt));
  s.data = args.get("data", "");
  s.tokens = args.get_int("tokens", 256, 1, std::numeric_limits<long long>::max());
  s.batches = args.get_int("batches", 1, 1, kMaxCount);
  s.perturb = args.get_double("perturb", 0.1, {0, 1000});
  s.seed = static_cast<std::uint64_t>(args.get_int("seed", 0, 0, std::numeric_limits<long long>::max()));
  s.resume = args.flag("resume");
  s.convert = !args.flag("no-convert");
  s.options.gemm = parse_engine(args.get_choice("engine", "auto", {"auto", "blas", "kokkos", "cutlass"}));
  const std::string comm_choice = args.get_choice("comm", "auto", {"auto", "nccl", "mpi"});
#if !KMOE_ENABLE_CUDA
  KMOE_CHECK_USAGE(backend != "cuda", "--backend cuda needs a kmoe built with KMOE_ENABLE_CUDA=ON");
#endif
  check_run_dir(s);
  check_run_dir_apart(s);

  Runtime runtime(argc, argv);
  auto world = comm::MpiCommunicator::world();
  return comm::run_or_abort(*world, "kmoe finetune", [&] {
    return translating_filesystem_errors([&] {
#if KMOE_ENABLE_CUDA
      if (backend == "cuda") {
        // GPU ranks exchange device buffers: NCCL (a GPU per rank) or MPI over device buffers (ranks sharing a GPU).
        auto devices = device_world(comm_choice);
        if (precision == "bf16") train<float, Kokkos::Cuda, bf16>(s, *devices);  // fp32 masters, bf16 block
        else if (precision == "f64") train<double, Kokkos::Cuda>(s, *devices);
        else train<float, Kokkos::Cuda>(s, *devices);
        return 0;
      }
#endif
      if (precision == "f64")
        train_on_backend<double>(s, *world, backend);
      else
        train_on_backend<float>(s, *world, backend);
      return 0;
    });
  });
}

#else

int run(int, char**, const std::vector<std::string>&) {
  throw UsageError("this kmoe was built without MPI or HDF5 (KMOE_ENABLE_MPI, KMOE_ENABLE_HDF5)");
}

#endif

}  // namespace

const Subcommand& finetune_command() {
  static const Subcommand cmd{"finetune", "fine-tune the MoE blocks of a checkpoint (the main job)", kHelp, &run};
  return cmd;
}

}  // namespace kmoe::cli
