/// \file hdf5_checkpoint.hpp
/// \brief Sharded HDF5 checkpoints: every rank saves its part of the model state (and optimizer state), any rank
///        count loads it back, and the whole is convertible to the original Hugging Face checkpoint.
///
/// Format (docs/checkpoint-format.md has the full description):
///   CHECKPOINT_DIR/manifest.h5                 step, world size, architecture, per-rank expert ranges, file sizes,
///                                              free-form attributes, and the source checkpoint's plan (tensor names,
///                                              dtypes, shapes, shard files, safetensors metadata, config.json, ...)
///   CHECKPOINT_DIR/rank-RRRRR-of-NNNNN.h5      /tensors/NAME: the rows [row_begin, row_end) of NAME's leading
///                                              dimension that rank R held (whole tensors are written by one rank)
/// A tensor is the union of its pieces over the rank files; the pieces must tile its leading dimension exactly.
/// Loading reads any row range of any tensor from whichever files hold it, so a checkpoint saved by N ranks loads
/// into any M ranks. BF16/F16 are stored as 16-bit unsigned integers (their bit patterns) with a `dtype` attribute.
///
/// Saves are atomic: all ranks write into CHECKPOINT_DIR's sibling `.NAME.kmoe-tmp`, rank 0 writes the manifest
/// last, fsyncs, and renames the directory to CHECKPOINT_DIR. A directory without a complete manifest is never
/// taken for a checkpoint. Every HDF5 call is checked; HDF5's own error printing is silenced and its failures become
/// kmoe::InputError (bad or damaged files) naming the file and dataset.
#pragma once

#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/dtype.hpp>
#include <kmoe/io/model_spec.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace kmoe::io {

/// The collective operations a multi-rank save needs. One process: the default (rank 0 of 1, all_ok = identity).
/// Under MPI, all_ok is an MPI_Allreduce(LAND) on the ranks that save together (see mpi_rank_group()).
struct RankGroup {
  int rank = 0;
  int size = 1;
  /// Collective: true on every rank iff `ok` was true on every rank. Also acts as a barrier.
  std::function<bool(bool ok)> all_ok = [](bool ok) { return ok; };
};

/// RankGroup over MPI_COMM_WORLD when kmoe is built with MPI and MPI is initialised; the one-process group otherwise.
RankGroup world_rank_group();

/// One tensor of the Hugging Face checkpoint a kmoe checkpoint came from: where it lived and what it was.
struct SourceTensor {
  std::string name;                  ///< e.g. "model.layers.0.block_sparse_moe.experts.3.w1.weight"
  std::string file;                  ///< shard file name, e.g. "model-00002-of-00006.safetensors"
  std::string dtype;                 ///< safetensors dtype name ("BF16", "F32", ...)
  std::vector<std::int64_t> shape;  ///< its shape in the source file
};

/// One shard file of the source checkpoint.
struct SourceFile {
  std::string name;                                ///< "model-00001-of-00006.safetensors"
  std::vector<std::string> tensors;                ///< names in the order of the file's header
  std::map<std::string, std::string> metadata;     ///< the header's __metadata__ (e.g. format=pt)
  bool has_metadata = true;                        ///< false when the header had no __metadata__ entry
};

/// Everything needed to rebuild the source Hugging Face directory byte for byte (given unchanged weights).
struct SourcePlan {
  std::vector<SourceTensor> tensors;                 ///< every tensor of the source checkpoint
  std::vector<SourceFile> files;                     ///< its shard files, in index order
  std::map<std::string, std::string> text_files;     ///< verbatim small files: config.json, generation_config.json,
                                                     ///< model.safetensors.index.json (those that existed)
};

/// One tensor (or the rows of it this rank holds) handed to the writer: host memory, row-major, of `dtype`.
struct TensorPiece {
  std::string name;                         ///< checkpoint name; no '/' (e.g. "model.norm.weight", "moe.0.w1")
  DType dtype = DType::F32;                 ///< stored as is (BF16/F16 as their 16-bit patterns); not F4/F6/C64
  std::vector<std::int64_t> global_shape;   ///< the whole tensor's shape (rank >= 1; scalars as shape {1})
  std::int64_t row_begin = 0;               ///< first row of global_shape[0] held here
  std::int64_t row_end = 0;                 ///< one past the last row held here
  const void* data = nullptr;               ///< (row_end - row_begin) * prod(global_shape[1:]) elements
};

/// What one rank saves. Fields other than `tensors` must agree on all ranks; rank 0 writes them to the manifest.
struct CheckpointContents {
  std::int64_t step = 0;                                   ///< training step the state belongs to
  std::string architecture;                                ///< model spec name (e.g. "mixtral", "granitemoe")
  std::vector<std::pair<std::int64_t, std::int64_t>> expert_ranges;  ///< [begin, end) of experts owned per rank
  std::map<std::string, std::string> attributes;          ///< free-form (optimizer hyperparameters, seeds, ...)
  SourcePlan source;                                       ///< the source checkpoint's plan (rank 0's is recorded)
  std::vector<TensorPiece> tensors;                        ///< this rank's pieces
  std::vector<std::shared_ptr<const void>> keep_alive;     ///< owners of pieces' data (buffers, file mappings)
};

/// Hooks for tests: on_stage(name) is called at every step of a save (e.g. "rank-file-written", "renamed").
struct SaveOptions {
  std::function<void(const std::string& stage)> on_stage;
};

/// Collective over `group`: saves `contents` as the checkpoint directory `dir` (atomic; replaces an existing one).
/// Any rank's failure makes every rank throw and leaves `dir` as it was.
/// \param dir      [in] the checkpoint directory to create, e.g. RUN_DIR/checkpoint-100
/// \param contents [in] this rank's part (see CheckpointContents)
/// \param group    [in] the ranks saving together
void save_hdf5_checkpoint(const std::filesystem::path& dir, const CheckpointContents& contents,
                          const RankGroup& group = RankGroup{}, const SaveOptions& options = SaveOptions{});

/// A tensor's description in a checkpoint.
struct StoredTensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;  ///< global shape
};

/// A loaded checkpoint directory: the manifest and the index of every rank file's pieces (data is read on demand).
class Hdf5Checkpoint {
 public:
  /// Opens and validates a checkpoint directory: manifest present and complete, every rank file present with the
  /// recorded size, readable, of this checkpoint (step, rank, world size), pieces tiling each tensor.
  /// \throws InputError naming the file (and dataset) at fault
  static Hdf5Checkpoint open(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const;
  std::int64_t step() const;
  /// The rank count that saved it.
  int saved_world_size() const;
  const std::string& architecture() const;
  const std::vector<std::pair<std::int64_t, std::int64_t>>& expert_ranges() const;
  const std::map<std::string, std::string>& attributes() const;
  const SourcePlan& source() const;

  bool has(const std::string& name) const;
  /// Names of all stored tensors, sorted.
  std::vector<std::string> names() const;
  /// \throws InputError when the tensor is absent
  const StoredTensorInfo& info(const std::string& name) const;

  /// Reads rows [row_begin, row_end) of the leading dimension of `name` as stored (row-major bytes of its dtype)
  /// into `out`, which must hold exactly that many bytes. Reads from every rank file that holds part of the range.
  /// \throws InputError on a bad range, a size mismatch or a damaged file (checksum failure) naming file and dataset
  void read_rows(const std::string& name, std::int64_t row_begin, std::int64_t row_end, void* out,
                 std::size_t nbytes) const;
  /// The whole tensor's bytes.
  std::vector<unsigned char> read(const std::string& name) const;
  /// Rows [row_begin, row_end) converted to double / float (from BF16, F16, F32, F64, integer types).
  std::vector<double> read_rows_f64(const std::string& name, std::int64_t row_begin, std::int64_t row_end) const;
  std::vector<float> read_rows_f32(const std::string& name, std::int64_t row_begin, std::int64_t row_end) const;

  Hdf5Checkpoint(Hdf5Checkpoint&&) noexcept;
  Hdf5Checkpoint& operator=(Hdf5Checkpoint&&) noexcept;
  ~Hdf5Checkpoint();

 private:
  struct Impl;
  explicit Hdf5Checkpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// True when `dir` holds a complete manifest (a committed checkpoint); does not validate the rank files.
bool is_hdf5_checkpoint(const std::filesystem::path& dir);

/// The committed checkpoint-K directory of RUN_DIR with the largest step K; empty path when there is none.
std::filesystem::path latest_checkpoint(const std::filesystem::path& run_dir);

/// Contiguous expert ranges: `num_experts` split over `ranks` as evenly as possible, the first ranks taking one more
/// when it does not divide (the same placement as kmoe's communicator).
std::vector<std::pair<std::int64_t, std::int64_t>> contiguous_expert_ranges(std::int64_t num_experts, int ranks);

// ---- Model level: a Hugging Face checkpoint's state <-> a kmoe HDF5 checkpoint <-> a Hugging Face directory ----
//
// Naming inside a checkpoint: tensors of the source checkpoint that are not MoE tensors keep their names, dtypes and
// bytes ("model.embed_tokens.weight"); MoE layer L is stored in kmoe's layout as "moe.L.router" [E,H],
// "moe.L.w1"/"moe.L.w3" [E,F,H], "moe.L.w2" [E,H,F] (sharded over ranks by expert) and "moe.L.shared_w1"/
// "moe.L.shared_w3" [S,H], "moe.L.shared_w2" [H,S], in the precision the trainer holds them (F32 or F64);
// optimizer state is "optim.NAME" (see the trainer). Attributes record the rest (docs/checkpoint-format.md).

/// The parts of a MoE layer in kmoe's layout: router, router_bias, score_bias, w1, w1_bias, w3, w3_bias, w2, w2_bias,
/// shared_w1, shared_w3, shared_w2, shared_gate (the biases and the shared gate only where the architecture has them).
const std::vector<std::string>& moe_parts();

/// "{prefix}moe.{layer}.{part}" — the checkpoint name of one kmoe-layout tensor (prefix "" for the weights,
/// e.g. "optim.exp_avg." for optimizer state of the same shapes).
std::string moe_tensor_name(int layer, const std::string& part, const std::string& prefix = "");

/// The plan of a Hugging Face checkpoint directory: tensors (index order) with file, dtype and shape; shard files
/// with their tensor order and __metadata__; and the verbatim config.json, generation_config.json and
/// model.safetensors.index.json (those present).
SourcePlan source_plan_of(const HfCheckpoint& hf);

/// Adds MoE layer `layer` to `contents`: the experts `weights` holds (global experts
/// [first_expert, first_expert + weights.w1.extent(0)) of weights.router.extent(0)) as rows of the global stacks,
/// and, when `with_replicated`, the router and shared expert. Stored as dtype_of<T>() under moe_tensor_name(layer,
/// part, prefix); `weights` is kept alive by `contents`.
template <class T>
void add_moe_layer(CheckpointContents& contents, int layer, const MoeLayerWeights<T>& weights,
                   std::int64_t first_expert, bool with_replicated, const std::string& prefix = "");

/// Adds every tensor of `hf` that is not a MoE tensor of `spec` (embeddings, attention, norms, lm_head) with its
/// original name, dtype and bytes (borrowed from the file mapping, kept alive by `contents`).
void add_non_moe_tensors(CheckpointContents& contents, const HfCheckpoint& hf, const ModelSpec& spec);

/// Adds the non-MoE tensors stored in `checkpoint` (those named in its source plan), copied (for a resumed run).
void add_non_moe_tensors(CheckpointContents& contents, const Hdf5Checkpoint& checkpoint);

/// The MoE layers stored in `checkpoint` (those with a "moe.L.router"), ascending.
std::vector<int> moe_layers(const Hdf5Checkpoint& checkpoint);

/// Loads MoE layer `layer` from `checkpoint` with experts [expert_begin, expert_end) (any range: a checkpoint saved
/// by N ranks loads into any rank count), converted to T (float, double). Router and shared expert are whole.
/// 	hrows InputError for a missing layer or tensor, inconsistent shapes, or a range outside [0, E]
template <class T>
MoeLayerWeights<T> load_moe_layer(const Hdf5Checkpoint& checkpoint, int layer, std::int64_t expert_begin,
                                  std::int64_t expert_end, const std::string& prefix = "");

/// Checks that `checkpoint` was saved from a model like `hf`: same architecture, same source tensor names, dtypes and
/// shapes. \throws InputError naming the first difference (a spec mismatch)
void check_same_model(const Hdf5Checkpoint& checkpoint, const HfCheckpoint& hf);

/// Writes the Hugging Face checkpoint of `checkpoint` into `out_dir`: the source's tensor names, dtypes, shard plan
/// and file names (MoE tensors re-assembled from kmoe's layout through the spec: per-expert for Mixtral, fused for
/// Granite, the shared expert), model.safetensors.index.json, config.json and generation_config.json. With unchanged
/// weights every file is byte-identical to the source. `out_dir` is built beside itself and renamed into place
/// (atomic). Nothing is written outside `out_dir` and its temporary sibling: every file name taken from the
/// checkpoint must be a plain file name. Progress shows on a terminal.
/// \param original_dir     [in] the source Hugging Face directory: checked with check_same_model, its config.json and
///                              generation_config.json are copied; empty = use the copies recorded in the checkpoint.
///                              The config.json written must agree with the tensors (architecture, expert count,
///                              sizes, layer count, a supported hidden_act).
/// \param replace_existing [in] whether an existing `out_dir` may be replaced; it must then hold only what a
///                              conversion writes (config/index json, *.safetensors). Without it an existing
///                              `out_dir` is an error.
/// \throws InputError when `out_dir` is, holds or lies inside the checkpoint or `original_dir`, exists and is not a
///         directory (or a symbolic link), or exists without `replace_existing`; UsageError for an empty `out_dir`
void convert_to_hf(const Hdf5Checkpoint& checkpoint, const std::filesystem::path& out_dir,
                   const std::filesystem::path& original_dir = {}, bool replace_existing = false);

}  // namespace kmoe::io
