// kmoe finetune: fine-tune the MoE blocks of a checkpoint (the main job), one process or under mpirun with expert
// parallelism; sharded HDF5 checkpoints along the way, the last one converted back to Hugging Face at the end.
#include <kmoe/config.hpp>

#include "cli.hpp"

#if KMOE_ENABLE_MPI && KMOE_ENABLE_HDF5
#include <kmoe/comm/distributed_moe.hpp>
#include <kmoe/comm/expert_parallel.hpp>
#include <kmoe/comm/gradients.hpp>
#include <kmoe/comm/mpi_communicator.hpp>
#if KMOE_ENABLE_NCCL
#include <kmoe/comm/nccl_communicator.hpp>
#endif
#include <kmoe/core/progress.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/moe/adamw.hpp>
#include <kmoe/moe/checkpoint.hpp>
#include <kmoe/moe/synthetic_task.hpp>
#endif

#include <cstdio>
#include <iostream>
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
    "between each block's output and a target, averaged over layers and tokens.\n"
    "  - without --data, a synthetic task that runs on any checkpoint: each layer fits the outputs of a perturbed copy\n"
    "    of itself (weights times 1 + perturb * N(0,1)) on seeded random hidden states N(0,1): a fixed data set of\n"
    "    --batches batches of --tokens tokens, cycled; the inputs depend only on (seed, batch, layer), so losses are\n"
    "    the same for any rank count;\n"
    "  - with --data FILE, recorded hidden states: safetensors with layers.{i}.x (inputs) and layers.{i}.y (targets)\n"
    "    of shape [..., hidden] for every MoE layer i; all tokens every step.\n"
    "Prints the loss per step (and a progress bar on a terminal), saves sharded HDF5 checkpoints RUN_DIR/checkpoint-K\n"
    "(every --save-every K steps and at the end; docs/checkpoint-format.md), and converts the last one into RUN_DIR/hf,\n"
    "a Hugging Face directory: non-MoE tensors byte-identical to HF_DIR, MoE tensors trained (rounded to the\n"
    "checkpoint's dtype). With --steps 0 the loaded weights are saved unchanged (RUN_DIR/hf reproduces HF_DIR).\n\n"
    "options:\n"
    "  --checkpoint HF_DIR     the Hugging Face checkpoint to start from (required)\n"
    "  --steps N               optimizer steps in total, counting resumed ones (required, >= 0)\n"
    "  --out RUN_DIR           where checkpoints and the converted model go (required)\n"
    "  --resume                continue from the latest RUN_DIR/checkpoint-K (weights, AdamW state, step), saved by\n"
    "                          any rank count; starts from HF_DIR when there is none\n"
    "  --save-every K          also save RUN_DIR/checkpoint-K every K steps (default 0: only at the end)\n"
    "  --lr X                  AdamW learning rate (default 3e-4)\n"
    "  --weight-decay X        AdamW decoupled weight decay (default 0)\n"
    "  --beta1 X, --beta2 X    AdamW moment decays (default 0.9, 0.999)\n"
    "  --eps X                 AdamW epsilon (default 1e-8)\n"
    "  --clip X                clip gradients to global L2 norm X (default 1.0; 0 = no clipping)\n"
    "  --ep E                  ranks per expert-parallel group (default: all ranks; the rest are replicas)\n"
    "  --data FILE             recorded hidden states (see above) instead of the synthetic task\n"
    "  --tokens T              synthetic task: tokens per step over all ranks (default 256)\n"
    "  --batches B             synthetic task: batches in the data set (default 1: the same batch every step)\n"
    "  --perturb X             synthetic task: relative perturbation of the teacher (default 0.1)\n"
    "  --seed S                synthetic task: seed of inputs and teacher (default 0)\n"
    "  --precision f32|f64     training precision of the MoE weights and optimizer (default f32)\n"
    "  --backend serial|openmp|cuda  Kokkos execution space (default: Kokkos' default)\n"
    "  --no-convert            skip the final conversion into RUN_DIR/hf\n"
    "exit codes: 0 done, 1 bad input (checkpoint, data, resumed state), 2 bad usage\n";

#if KMOE_ENABLE_MPI && KMOE_ENABLE_HDF5

namespace fs = std::filesystem;

struct Settings {
  fs::path hf_dir, run_dir, data;
  std::int64_t steps = 0, save_every = 0, tokens = 256, batches = 1;
  std::uint64_t seed = 0;
  double clip = 1.0, perturb = 0.1;
  moe::AdamWOptions adamw;
  int ep = 0;
  bool resume = false, convert = true;
};

std::string checkpoint_name(std::int64_t step) { return "checkpoint-" + std::to_string(step); }

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

// loss += scale * sum((y - target)^2); dy = 2 * scale * (y - target). Returns this rank's loss share.
template <class T, class Space>
double mse_and_gradient(const typename moe::MoeViews<T, Space>::matrix& y,
                        const typename moe::MoeViews<T, Space>::matrix& target,
                        const typename moe::MoeViews<T, Space>::matrix& dy, double scale) {
  const std::size_t n = y.span();
  const T* yp = y.data();
  const T* tp = target.data();
  T* dp = dy.data();
  const T two_scale = static_cast<T>(2 * scale);
  double sum = 0;
  Kokkos::parallel_reduce(
      "kmoe::finetune::mse", Kokkos::RangePolicy<Space>(0, n),
      KOKKOS_LAMBDA(const std::size_t i, double& acc) {
        const T d = yp[i] - tp[i];
        dp[i] = two_scale * d;
        acc += static_cast<double>(d) * static_cast<double>(d);
      },
      sum);
  return sum * scale;
}

// ---- the trainer ------------------------------------------------------------------------------------------------

template <class T, class Space>
class Trainer {
 public:
  using Weights = moe::MoeWeights<T, Space>;
  using matrix = typename moe::MoeViews<T, Space>::matrix;

  Trainer(const Settings& s, comm::Communicator& world)
      : s_(s), world_(world), hf_(io::HfCheckpoint::open(s.hf_dir)), spec_(io::spec_for(hf_.config().architecture)) {
    layers_ = io::find_moe_layers(hf_, spec_);
    KMOE_CHECK_INPUT(!layers_.empty(), s.hf_dir.string(), ": no MoE layer found (architecture ", spec_.architecture,
                     ")");
    layout_ = std::make_unique<comm::ExpertParallel>(world_, hf_.config().num_experts, s.ep);
    moe::MoeOptions options;
    options.top_k = hf_.config().top_k;

    fs::path resume_from;
    if (s.resume) resume_from = io::latest_checkpoint(s.run_dir);
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
        teachers_.push_back(std::make_unique<comm::DistributedMoe<T, Space>>(
            *layout_, moe::synthetic::perturbed_copy(original, s_.seed, layer, s_.perturb), options));
      students_.push_back(std::make_unique<comm::DistributedMoe<T, Space>>(*layout_, student, options));
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
      const auto [loss, norm] = train_step(step);
      if (root) {
        char line[160];
        std::snprintf(line, sizeof line, "step %lld/%lld loss %.9e grad_norm %.6e\n", static_cast<long long>(step),
                      static_cast<long long>(s_.steps), loss, norm);
        std::cout << line << std::flush;
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
    dup(out.router), dup(out.w1), dup(out.w3), dup(out.w2), dup(out.shared_w1), dup(out.shared_w3), dup(out.shared_w2);
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

  // One optimizer step over all layers: returns the loss (before the update) and the gradient norm (before clipping).
  std::pair<double, double> train_step(std::int64_t step) {
    const std::int64_t H = hf_.config().hidden_size;
    const std::int64_t rows = s_.data.empty() ? s_.tokens : data_rows_;
    const auto part = comm::contiguous_split(rows, world_.size(), world_.rank());
    const double scale = 1.0 / (static_cast<double>(layers_.size()) * static_cast<double>(rows) * static_cast<double>(H));
    comm::GradientSet grads(*layout_);
    std::vector<moe::MoeBackward<T, Space>> backs;
    double loss = 0;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      matrix x, target;
      if (s_.data.empty()) {
        x = matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("x")), part.count, H);
        // Batch (step - 1) mod --batches of a fixed synthetic data set: a pure function of (seed, batch, layer).
        moe::synthetic::fill_normal(x, s_.seed, moe::synthetic::input_stream((step - 1) % s_.batches, layers_[l]),
                                    part.begin, 1.0);
        target = teachers_[l]->forward(x);
      } else {
        x = data_x_[l];
        target = data_y_[l];
      }
      const matrix y = students_[l]->forward(x);
      matrix dy(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("dy")), part.count, H);
      loss += mse_and_gradient<T, Space>(y, target, dy, scale);
      backs.push_back(students_[l]->backward(dy));
      const auto& g = backs.back().grads;
      const std::string p = "layer" + std::to_string(layers_[l]) + ".";
      grads.add(p + "router", g.router, comm::GradKind::replicated);
      grads.add(p + "w1", g.w1, comm::GradKind::expert);
      grads.add(p + "w3", g.w3, comm::GradKind::expert);
      grads.add(p + "w2", g.w2, comm::GradKind::expert);
      if (g.has_shared()) {
        grads.add(p + "shared_w1", g.shared_w1, comm::GradKind::replicated);
        grads.add(p + "shared_w3", g.shared_w3, comm::GradKind::replicated);
        grads.add(p + "shared_w2", g.shared_w2, comm::GradKind::replicated);
      }
    }
    grads.reduce();
    const double norm = s_.clip > 0 ? grads.clip(s_.clip) : grads.global_norm();
    for (std::size_t l = 0; l < layers_.size(); ++l)
      optimizers_[l].step(students_[l]->layer().weights(), backs[l].grads);
    world_.allreduce_sum_host(&loss, 1);  // each rank's tokens are its own: the sum is the mean over all tokens
    return {loss, norm};
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
      add(students_[l]->layer().weights(), "");
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
  std::vector<std::unique_ptr<comm::DistributedMoe<T, Space>>> students_, teachers_;
  std::vector<moe::AdamW<T, Space>> optimizers_;
  std::vector<matrix> data_x_, data_y_;
  std::int64_t data_rows_ = 0;
  std::int64_t start_step_ = 0;
  fs::path resumed_from_;
};

template <class T, class Space>
void train(const Settings& s, comm::Communicator& world) {
  Trainer<T, Space> trainer(s, world);
  trainer.run();
}

template <class T>
void train_on_backend(const Settings& s, comm::Communicator& world, const std::string& backend) {
#ifdef KOKKOS_ENABLE_CUDA
  // GPU ranks exchange device buffers: NCCL for the expert-parallel collectives (not exercised by the CPU tests).
  if (backend == "cuda" || (backend.empty() && std::is_same_v<Kokkos::DefaultExecutionSpace, Kokkos::Cuda>)) {
#if KMOE_ENABLE_NCCL
    auto nccl = comm::NcclCommunicator::world();
    return train<T, Kokkos::Cuda>(s, *nccl);
#else
    throw UsageError("--backend cuda needs kmoe built with KMOE_ENABLE_NCCL=ON");
#endif
  }
#endif
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
             "data", "tokens", "batches", "perturb", "seed", "precision", "backend"},
            {"resume", "no-convert"});
  args.expect_positionals(0, 0, "no positional arguments");
  Settings s;
  s.hf_dir = args.required("checkpoint");
  s.run_dir = args.required("out");
  s.steps = args.get_int("steps", -1);
  KMOE_CHECK_USAGE(args.has("steps") && s.steps >= 0, "--steps N (N >= 0) is required");
  s.save_every = args.get_int("save-every", 0);
  KMOE_CHECK_USAGE(s.save_every >= 0, "--save-every must be >= 0, got ", s.save_every);
  s.adamw.lr = args.get_double("lr", 3e-4);
  s.adamw.weight_decay = args.get_double("weight-decay", 0.0);
  s.adamw.beta1 = args.get_double("beta1", 0.9);
  s.adamw.beta2 = args.get_double("beta2", 0.999);
  s.adamw.eps = args.get_double("eps", 1e-8);
  KMOE_CHECK_USAGE(s.adamw.lr >= 0 && s.adamw.beta1 >= 0 && s.adamw.beta1 < 1 && s.adamw.beta2 >= 0 &&
                       s.adamw.beta2 < 1 && s.adamw.eps > 0 && s.adamw.weight_decay >= 0,
                   "AdamW needs lr >= 0, 0 <= beta < 1, eps > 0, weight decay >= 0");
  s.clip = args.get_double("clip", 1.0);
  KMOE_CHECK_USAGE(s.clip >= 0, "--clip must be >= 0, got ", s.clip);
  s.ep = static_cast<int>(args.get_int("ep", 0));
  KMOE_CHECK_USAGE(s.ep >= 0, "--ep must be >= 1, got ", s.ep);
  s.data = args.get("data", "");
  s.tokens = args.get_int("tokens", 256);
  KMOE_CHECK_USAGE(s.tokens >= 1, "--tokens must be >= 1, got ", s.tokens);
  s.batches = args.get_int("batches", 1);
  KMOE_CHECK_USAGE(s.batches >= 1, "--batches must be >= 1, got ", s.batches);
  s.perturb = args.get_double("perturb", 0.1);
  s.seed = static_cast<std::uint64_t>(args.get_int("seed", 0));
  s.resume = args.flag("resume");
  s.convert = !args.flag("no-convert");
  const std::string precision = args.get_choice("precision", "f32", {"f32", "f64"});
  const std::string backend = args.get_choice("backend", "", {"", "serial", "openmp", "cuda"});

  Runtime runtime(argc, argv);
  auto world = comm::MpiCommunicator::world();
  return comm::run_or_abort(*world, "kmoe finetune", [&] {
    if (precision == "f64")
      train_on_backend<double>(s, *world, backend);
    else
      train_on_backend<float>(s, *world, backend);
    return 0;
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
