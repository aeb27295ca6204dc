// Sharded HDF5 checkpoints (io/hdf5_checkpoint.hpp): round trip, re-slicing on load, atomic saves under SIGKILL,
// and clear errors for a missing, corrupt or truncated shard.
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <kmoe/core/bf16.hpp>
#include <kmoe/core/error.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>
#include <numeric>

#include "hdf5_test_data.hpp"
#include "kmoe_test.hpp"

namespace {

using namespace kmoe::test::hdf5;
using kmoe::InputError;

TEST(Hdf5Checkpoint, RoundTripOneRank) {
  kmoe::test::ScratchDir tmp("hdf5-roundtrip");
  const fs::path dir = tmp.path() / "checkpoint-3";
  save_one_process(dir, 3);
  EXPECT_TRUE(kmoe::io::is_hdf5_checkpoint(dir));
  EXPECT_TRUE(fs::exists(dir / "rank-00000-of-00001.h5"));
  const auto ck = Hdf5Checkpoint::open(dir);
  EXPECT_EQ(ck.saved_world_size(), 1);
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"counters", "model.embed.weight", "moe.0.w1"}));
  EXPECT_EQ(ck.attributes().at("optimizer"), "adamw");
  EXPECT_EQ(ck.attributes().at("lr"), "0.001");
  ASSERT_EQ(ck.expert_ranges().size(), 1u);
  EXPECT_EQ(ck.expert_ranges()[0], (std::pair<std::int64_t, std::int64_t>{0, kE}));
  const auto& src = ck.source();
  const auto plan = make_plan();
  ASSERT_EQ(src.tensors.size(), plan.tensors.size());
  for (std::size_t i = 0; i < plan.tensors.size(); ++i) {
    EXPECT_EQ(src.tensors[i].name, plan.tensors[i].name);
    EXPECT_EQ(src.tensors[i].file, plan.tensors[i].file);
    EXPECT_EQ(src.tensors[i].dtype, plan.tensors[i].dtype);
    EXPECT_EQ(src.tensors[i].shape, plan.tensors[i].shape);
  }
  ASSERT_EQ(src.files.size(), 2u);
  EXPECT_EQ(src.files[0].metadata, plan.files[0].metadata);
  EXPECT_TRUE(src.files[0].has_metadata);
  EXPECT_FALSE(src.files[1].has_metadata);
  EXPECT_EQ(src.files[1].tensors, plan.files[1].tensors);
  EXPECT_EQ(src.text_files, plan.text_files);
  for (int ranks : {1, 2, 3, 7, 9}) expect_contents(ck, 3, ranks);
  EXPECT_EQ(kmoe::io::latest_checkpoint(tmp.path()), dir);
}

TEST(Hdf5Checkpoint, ReplacesAnExistingCheckpoint) {
  kmoe::test::ScratchDir tmp("hdf5-replace");
  const fs::path dir = tmp.path() / "checkpoint-5";
  save_one_process(dir, 5);
  save_one_process(dir, 6);  // same directory, new contents
  expect_contents(Hdf5Checkpoint::open(dir), 6, 2);
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().filename().string().rfind(".", 0), std::string::npos) << "leftover " << e.path();
}

TEST(Hdf5Checkpoint, BadPiecesAreRejectedAtSave) {
  kmoe::test::ScratchDir tmp("hdf5-badpieces");
  const Saved s = make_data(0);
  auto c = contents_for(s, 0, 0, 1);
  c.tensors.push_back(c.tensors[0]);
  EXPECT_THROW(kmoe::io::save_hdf5_checkpoint(tmp.path() / "a", c), InputError);
  c = contents_for(s, 0, 0, 1);
  c.tensors[0].row_end = kE + 1;
  EXPECT_THROW(kmoe::io::save_hdf5_checkpoint(tmp.path() / "b", c), InputError);
  c = contents_for(s, 0, 0, 1);
  c.tensors[0].name = std::string("a\0b", 3);  // any other name is stored (AnyTensorNameIsStored)
  EXPECT_THROW(kmoe::io::save_hdf5_checkpoint(tmp.path() / "c", c), InputError);
  EXPECT_FALSE(fs::exists(tmp.path() / "a"));
  EXPECT_EQ(kmoe::io::latest_checkpoint(tmp.path()), fs::path());
}

// Gaps in a tensor's rows (a rank's piece missing) are an error at open, naming the tensor and the rows.
TEST(Hdf5Checkpoint, MissingRowsAreReported) {
  kmoe::test::ScratchDir tmp("hdf5-gap");
  const Saved s = make_data(0);
  auto c = contents_for(s, 0, 0, 1);
  c.tensors[0].row_begin = 2;
  c.tensors[0].data = s.stack.data() + 2 * kR * kC;
  kmoe::io::save_hdf5_checkpoint(tmp.path() / "checkpoint-0", c);
  try {
    Hdf5Checkpoint::open(tmp.path() / "checkpoint-0");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("moe.0.w1 rows [0,2) are missing"), std::string::npos) << e.what();
  }
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Hdf5Checkpoint, MissingShardIsReported) {
  kmoe::test::ScratchDir tmp("hdf5-missing");
  const fs::path dir = tmp.path() / "checkpoint-1";
  save_one_process(dir, 1);
  fs::remove(dir / "rank-00000-of-00001.h5");
  const std::string msg = error_of([&] { Hdf5Checkpoint::open(dir); });
  EXPECT_NE(msg.find("missing shard rank-00000-of-00001.h5"), std::string::npos) << msg;
  fs::remove(dir / "manifest.h5");
  EXPECT_NE(error_of([&] { Hdf5Checkpoint::open(dir); }).find("no manifest.h5"), std::string::npos);
  EXPECT_FALSE(kmoe::io::is_hdf5_checkpoint(dir));
}

void truncate_file(const fs::path& p, std::uintmax_t size) { fs::resize_file(p, size); }

TEST(Hdf5Checkpoint, TruncatedShardIsReported) {
  kmoe::test::ScratchDir tmp("hdf5-truncated");
  const fs::path dir = tmp.path() / "checkpoint-1";
  save_one_process(dir, 1);
  const fs::path shard = dir / "rank-00000-of-00001.h5";
  truncate_file(shard, fs::file_size(shard) / 2);
  std::string msg = error_of([&] { Hdf5Checkpoint::open(dir); });
  EXPECT_NE(msg.find("rank-00000-of-00001.h5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  // A truncated manifest: HDF5 itself detects it; the error names the file.
  save_one_process(dir, 2);
  truncate_file(dir / "manifest.h5", fs::file_size(dir / "manifest.h5") - 100);
  msg = error_of([&] { Hdf5Checkpoint::open(dir); });
  EXPECT_NE(msg.find("manifest.h5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("HDF5"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
}

// Flips one byte inside the stored data of moe.0.w1: the chunk checksum turns it into an error naming the dataset.
TEST(Hdf5Checkpoint, CorruptDataIsReported) {
  kmoe::test::ScratchDir tmp("hdf5-corrupt");
  const fs::path dir = tmp.path() / "checkpoint-1";
  save_one_process(dir, 1);
  const fs::path shard = dir / "rank-00000-of-00001.h5";
  std::string bytes;
  {
    std::ifstream f(shard, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), {});
  }
  const Saved s = make_data(1);
  const std::string needle(reinterpret_cast<const char*>(s.stack.data() + 20), 4 * sizeof(float));
  const auto at = bytes.find(needle);
  ASSERT_NE(at, std::string::npos);
  bytes[at + 1] = static_cast<char>(bytes[at + 1] ^ 0x5a);
  {
    std::ofstream f(shard, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const auto ck = Hdf5Checkpoint::open(dir);  // metadata intact
  const std::string msg = error_of([&] { ck.read("moe.0.w1"); });
  EXPECT_NE(msg.find("rank-00000-of-00001.h5 dataset /tensors/moe.0.w1"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
  // Other tensors still read.
  EXPECT_EQ(ck.read("counters").size(), 24u);
}

// A damaged superblock (same size, so the manifest's size check passes): HDF5's own error, naming the file.
TEST(Hdf5Checkpoint, CorruptShardHeaderIsReported) {
  kmoe::test::ScratchDir tmp("hdf5-corrupt-header");
  const fs::path dir = tmp.path() / "checkpoint-1";
  save_one_process(dir, 1);
  const fs::path shard = dir / "rank-00000-of-00001.h5";
  {
    std::fstream f(shard, std::ios::binary | std::ios::in | std::ios::out);
    const std::string zeros(48, '\0');
    f.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
  }
  const std::string msg = error_of([&] { Hdf5Checkpoint::open(dir); });
  EXPECT_NE(msg.find("rank-00000-of-00001.h5: HDF5 call H5Fopen"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
}

TEST(Hdf5Checkpoint, NotACheckpointIsReported) {
  kmoe::test::ScratchDir tmp("hdf5-garbage");
  const fs::path dir = tmp.path() / "checkpoint-1";
  fs::create_directories(dir);
  std::ofstream(dir / "manifest.h5") << "this is not HDF5";
  const std::string msg = error_of([&] { Hdf5Checkpoint::open(dir); });
  EXPECT_NE(msg.find("manifest.h5"), std::string::npos) << msg;
  EXPECT_FALSE(kmoe::io::is_hdf5_checkpoint(dir));
}

// A save killed (SIGKILL) at any stage leaves the previous checkpoint loadable and no partial one taken as valid.
// The child process kills itself at the n-th stage of the save, for every n until a save completes.
TEST(Hdf5Checkpoint, KilledSaveLeavesPreviousCheckpoint) {
  kmoe::test::ScratchDir tmp("hdf5-kill");
  const fs::path run = tmp.path();
  save_one_process(run / "checkpoint-1", 1);
  for (const bool replace : {false, true}) {
    const fs::path target = replace ? run / "checkpoint-1" : run / "checkpoint-2";
    int killed_at = 0;
    for (int n = 0;; ++n) {
      const pid_t pid = ::fork();
      ASSERT_GE(pid, 0);
      if (pid == 0) {
        int calls = 0;
        kmoe::io::SaveOptions opt;
        opt.on_stage = [&](const std::string&) {
          if (calls++ == n) ::raise(SIGKILL);
        };
        try {
          save_one_process(target, replace ? 7 : 2, opt);
        } catch (...) {
          ::_exit(3);
        }
        ::_exit(0);
      }
      int status = 0;
      ASSERT_EQ(::waitpid(pid, &status, 0), pid);
      if (WIFEXITED(status)) {
        ASSERT_EQ(WEXITSTATUS(status), 0) << "save failed at n=" << n;
        break;
      }
      ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
      ++killed_at;
      if (replace) {
        // checkpoint-1 holds either the old or the new state, complete.
        const auto ck = Hdf5Checkpoint::open(target);
        expect_contents(ck, ck.step(), 2);
        EXPECT_TRUE(ck.step() == 1 || ck.step() == 7) << ck.step();
      } else {
        const fs::path latest = kmoe::io::latest_checkpoint(run);
        ASSERT_FALSE(latest.empty());
        const auto ck = Hdf5Checkpoint::open(latest);
        expect_contents(ck, ck.step(), 3);
        if (latest == run / "checkpoint-1") {
          EXPECT_FALSE(kmoe::io::is_hdf5_checkpoint(target)) << "killed at stage " << n;
          EXPECT_THROW(Hdf5Checkpoint::open(target), InputError);
        }
      }
    }
    EXPECT_GE(killed_at, 4) << "the save has at least prepare, tensor, rank file, manifest, rename stages";
    expect_contents(Hdf5Checkpoint::open(target), replace ? 7 : 2, 1);
  }
  // Leftover temporary directories of killed saves are cleaned by the next save of the same name.
  save_one_process(run / "checkpoint-2", 2);
  for (const auto& e : fs::directory_iterator(run))
    EXPECT_EQ(e.path().filename().string().rfind(".", 0), std::string::npos) << "leftover " << e.path();
}

// A kill at an arbitrary moment (not only at a stage boundary), with a save big enough to take a while.
TEST(Hdf5Checkpoint, KilledAtRandomMomentsLeavesPreviousCheckpoint) {
  kmoe::test::ScratchDir tmp("hdf5-kill-timed");
  const fs::path run = tmp.path();
  save_one_process(run / "checkpoint-1", 1);
  std::vector<float> big(std::size_t(8) << 20, 1.5f);  // 32 MiB
  for (int delay_us : {0, 2000, 8000, 20000, 50000}) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      const Saved s = make_data(2);
      auto c = contents_for(s, 2, 0, 1);
      c.tensors.push_back({"big", DType::F32, {std::int64_t(big.size())}, 0, std::int64_t(big.size()), big.data()});
      try {
        kmoe::io::save_hdf5_checkpoint(run / "checkpoint-2", c);
      } catch (...) {
        ::_exit(3);
      }
      ::_exit(0);
    }
    ::usleep(static_cast<useconds_t>(delay_us));
    ::kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    const fs::path latest = kmoe::io::latest_checkpoint(run);
    ASSERT_FALSE(latest.empty());
    const auto ck = Hdf5Checkpoint::open(latest);
    expect_contents(ck, ck.step(), 2);
    if (latest == run / "checkpoint-2") EXPECT_EQ(ck.read("big").size(), big.size() * 4);
    fs::remove_all(run / "checkpoint-2");
  }
}

// ---- damaged, mixed and hostile checkpoints ------------------------------------------------------------------

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_all(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Every byte of what the manifest stores as data (file names, dtypes, metadata, the verbatim config text, attribute
// values) is covered: flipping one never opens as a valid checkpoint.
TEST(Hdf5Checkpoint, AnyFlippedByteOfTheManifestIsCaught) {
  kmoe::test::ScratchDir tmp("hdf5-manifest-flip");
  const fs::path dir = tmp.path() / "checkpoint-1";
  save_one_process(dir, 1);
  const fs::path manifest = dir / "manifest.h5";
  const std::string good = read_all(manifest);
  int flips = 0;
  for (const std::string needle : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                   "model.layers.0.experts.w", "\"a\": 1", "BF16", "format", "adamw", "0.001",
                                   "TestForCausalLM", "rank-00000-of-00001.h5"}) {
    const auto at = good.find(needle);
    ASSERT_NE(at, std::string::npos) << needle;
    for (std::size_t i = 0; i < needle.size(); ++i) {
      std::string bad = good;
      bad[at + i] = static_cast<char>(bad[at + i] ^ 0x01);
      write_all(manifest, bad);
      ++flips;
      const std::string msg = error_of([&] { Hdf5Checkpoint::open(dir); });
      EXPECT_NE(msg, "(no error)") << "flip of byte " << i << " of '" << needle << "' went unnoticed";
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
  EXPECT_GT(flips, 100);
  write_all(manifest, good);
  expect_contents(Hdf5Checkpoint::open(dir), 1, 1);
}

// A rank file of another run with the same step and world size (same size, same tensor names): refused.
TEST(Hdf5Checkpoint, RankFileOfAnotherSaveIsRefused) {
  kmoe::test::ScratchDir tmp("hdf5-mixed");
  save_one_process(tmp.path() / "a" / "checkpoint-1", 1);
  const Saved other = make_data(5);
  kmoe::io::save_hdf5_checkpoint(tmp.path() / "b" / "checkpoint-1", contents_for(other, 1, 0, 1));
  const fs::path mine = tmp.path() / "a" / "checkpoint-1" / "rank-00000-of-00001.h5";
  const fs::path theirs = tmp.path() / "b" / "checkpoint-1" / "rank-00000-of-00001.h5";
  ASSERT_EQ(fs::file_size(mine), fs::file_size(theirs));
  fs::copy_file(theirs, mine, fs::copy_options::overwrite_existing);
  const std::string msg = error_of([&] { Hdf5Checkpoint::open(tmp.path() / "a" / "checkpoint-1"); });
  EXPECT_NE(msg.find("rank-00000-of-00001.h5: saved by another save than the manifest's"), std::string::npos) << msg;
}

// A manifest whose dataset declares 2^34 elements (18 KB of file): refused before anything is allocated.
TEST(Hdf5Checkpoint, HugeDeclaredDatasetIsRefusedBeforeAllocating) {
  kmoe::test::ScratchDir tmp("hdf5-huge");
  const fs::path dir = tmp.path() / "checkpoint-1";
  save_one_process(dir, 1);
  {
    const hid_t f = H5Fopen((dir / "manifest.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    ASSERT_GE(H5Ldelete(f, "rank_file_sizes", H5P_DEFAULT), 0);
    const hsize_t n = hsize_t(1) << 34;
    const hid_t space = H5Screate_simple(1, &n, nullptr);
    const hid_t d = H5Dcreate2(f, "rank_file_sizes", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    H5Dclose(d);
    H5Sclose(space);
    H5Fclose(f);
  }
  ASSERT_LT(fs::file_size(dir / "manifest.h5"), std::uintmax_t(1) << 20);
  const std::string msg = error_of([&] { Hdf5Checkpoint::open(dir); });
  EXPECT_NE(msg.find("rank_file_sizes: declares 17179869184 elements"), std::string::npos) << msg;
}

// Tensor names HDF5 cannot hold as they are ('/', '%', ".") are stored and read back unchanged.
TEST(Hdf5Checkpoint, AnyTensorNameIsStored) {
  kmoe::test::ScratchDir tmp("hdf5-names");
  const fs::path dir = tmp.path() / "checkpoint-1";
  const Saved s = make_data(1);
  auto c = contents_for(s, 1, 0, 1);
  const std::vector<std::string> names = {"params/dense/kernel", "100%", "%2F", ".", "a\nb"};
  for (const auto& n : names) c.tensors.push_back({n, DType::I64, {3}, 0, 3, s.counters.data()});
  kmoe::io::save_hdf5_checkpoint(dir, c);
  const auto ck = Hdf5Checkpoint::open(dir);
  for (const auto& n : names) {
    ASSERT_TRUE(ck.has(n)) << n;
    const auto bytes = ck.read(n);
    ASSERT_EQ(bytes.size(), 24u);
    EXPECT_EQ(std::memcmp(bytes.data(), s.counters.data(), 24), 0) << n;
  }
  expect_contents(ck, 1, 1);
}

// The disk filling up during a save (a file size limit here): every rank file and manifest stage fails with a
// one-line InputError, the previous checkpoint stays, no HDF5 id is left open, and the process exits normally
// (HDF5 1.10 crashes in its exit handler, or at MPI_Finalize, once a write has failed inside H5Fclose).
TEST(Hdf5Checkpoint, FullDiskSaveFailsCleanly) {
  kmoe::test::ScratchDir tmp("hdf5-full");
  const fs::path run = tmp.path();
  save_one_process(run / "checkpoint-1", 1);
  const auto rank_size = fs::file_size(run / "checkpoint-1" / "rank-00000-of-00001.h5");
  const auto manifest_size = fs::file_size(run / "checkpoint-1" / "manifest.h5");
  std::vector<std::uintmax_t> limits;
  for (std::uintmax_t limit = 512; limit < 2 * std::max(rank_size, manifest_size); limit += 1024) limits.push_back(limit);
  for (std::uintmax_t limit = 64 << 10; limit <= 4 << 20; limit *= 2) limits.push_back(limit);
  for (const std::uintmax_t limit : limits) {
    SCOPED_TRACE("file size limit " + std::to_string(limit));
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::signal(SIGXFSZ, SIG_IGN);  // a write past the limit fails with EFBIG, as ENOSPC would
      const rlimit rl{limit, limit};
      ::setrlimit(RLIMIT_FSIZE, &rl);
      int code = 0;
      try {
        save_one_process(run / "checkpoint-1", 7);
        code = 2;  // fit under the limit: nothing to check
      } catch (const InputError& e) {
        code = std::strchr(e.what(), '\n') ? 3 : 0;
      } catch (...) {
        code = 4;
      }
      if (code == 0 && H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) != 0) code = 5;
      std::exit(code);  // runs HDF5's exit handler
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    EXPECT_TRUE(WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 2)
        << "exit " << WEXITSTATUS(status) << " (3: not one line, 4: not an InputError, 5: HDF5 ids left open)";
    expect_contents(Hdf5Checkpoint::open(run / "checkpoint-1"), WEXITSTATUS(status) == 2 ? 7 : 1, 1);
    if (WEXITSTATUS(status) == 2) save_one_process(run / "checkpoint-1", 1);
    if (limit == limits.back()) EXPECT_EQ(WEXITSTATUS(status), 2) << "a 4 MiB limit should fit this small save";
  }
}

}  // namespace
