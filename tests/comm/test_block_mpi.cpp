// `kmoe block` under mpirun against the single-process run: every testdata layer on 2 or 3 ranks, 1 rank with --ep 1,
// 2 replicas x ep 2, ep 4 and 5 ranks (uneven tokens and experts), float64 outputs equal within 1e-12 relative
// (topk_idx exactly), same tensor names and shapes; an impossible layout fails on every rank with a clear message and
// no hang.
#include "kmoe_test.hpp"

#include <kmoe/io/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <set>
#include <string>

namespace {

using kmoe::test::run_command;
using kmoe::test::ScratchDir;

struct Case {
  const char* set;  // testdata set
  int layer, np, ep;  // ep 0: default (= np)
  const char* precision = "f64";
};

std::string ref_file(const std::string& set) { return (kmoe::test::testdata_dir() / set / (set + "-ref.safetensors")).string(); }
std::string ckpt_dir(const std::string& set) { return (kmoe::test::testdata_dir() / set / "hf_save_pretrained").string(); }

/// mpirun with a clean environment: this test process is itself an MPI singleton whose OMPI_/PMIX_ variables would
/// confuse a child mpirun. `timeout` turns a hang into a failure.
std::string mpirun(int np, const std::string& args) {
  const char* path = std::getenv("PATH");
  return "env -i PATH='" + std::string(path ? path : "/usr/bin:/bin") +
         "' HOME=/tmp OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 "
         "OMP_PROC_BIND=spread OMP_PLACES=threads timeout 120 mpirun -np " +
         std::to_string(np) + " --oversubscribe " + kmoe::test::kmoe_exe().string() + " block " + args;
}

std::string block_args(const Case& c, const std::string& out) {
  return "--checkpoint " + ckpt_dir(c.set) + " --layer " + std::to_string(c.layer) + " --inputs " + ref_file(c.set) +
         " --precision " + c.precision + " --out " + out;
}

/// max |a - b| / max |b| over every tensor; names and shapes must match; integer tensors exactly.
void expect_same_outputs(const std::string& got_path, const std::string& want_path, const std::string& where,
                         double tol) {
  const auto got = kmoe::io::SafetensorsFile::open(got_path);
  const auto want = kmoe::io::SafetensorsFile::open(want_path);
  const auto gn = got.names(), wn = want.names();
  EXPECT_EQ(std::set<std::string>(gn.begin(), gn.end()), std::set<std::string>(wn.begin(), wn.end())) << where;
  for (const auto& name : wn) {
    if (!got.has(name)) continue;
    const auto& w = want.tensor(name);
    const auto& g = got.tensor(name);
    ASSERT_EQ(g.shape, w.shape) << where << ": " << name;
    ASSERT_EQ(g.dtype, w.dtype) << where << ": " << name;
    const auto gv = kmoe::io::to_host_view<double>(g);
    const auto wv = kmoe::io::to_host_view<double>(w);
    double num = 0, den = 0;
    for (std::size_t i = 0; i < wv.extent(0); ++i) {
      num = std::max(num, std::abs(gv(i) - wv(i)));
      den = std::max(den, std::abs(wv(i)));
    }
    if (name.find("topk_idx") != std::string::npos) EXPECT_EQ(num, 0) << where << ": " << name;
    else EXPECT_LE(num, tol * den) << where << ": " << name << " max abs diff " << num << " (max |ref| " << den << ")";
  }
}

TEST(BlockMpi, EveryLayoutWritesTheSingleProcessOutputs) {
  const Case cases[] = {
      {"granitemoe-tiny", 0, 1, 1},       // one rank through the distributed path
      {"granitemoe-tiny", 0, 2, 0},       {"granitemoe-tiny", 1, 3, 0},   {"mixtral-tiny", 0, 2, 0},
      {"mixtral-tiny", 1, 3, 0},          {"granitemoeshared-tiny", 0, 2, 0}, {"granitemoeshared-tiny", 1, 3, 0},
      {"mixtral-tiny", 0, 4, 2},          // 2 replicas x ep 2
      {"granitemoeshared-tiny", 1, 4, 4}, // 6 experts over 4 ranks: 2+2+1+1
      {"mixtral-tiny", 1, 5, 0},          // 12 tokens over 5 ranks: 3+3+2+2+2; 8 experts: 2+2+2+1+1
      {"granitemoe-tiny", 1, 2, 0, "f32"},  // float32 compute: equal to one process within float rounding
      {"gpt_oss-tiny", 1, 3, 0},          // router and expert biases (gathered with their experts), clamped SwiGLU
      {"deepseek_v3-tiny", 2, 4, 0},      // sigmoid + selection bias + group-limited top-k, a shared expert
      {"qwen2_moe-tiny", 0, 2, 0},        // the sigmoid-gated shared expert
  };
  ScratchDir dir("block-mpi");
  for (const auto& c : cases) {
    const std::string where = std::string(c.set) + " layer " + std::to_string(c.layer) + " np " + std::to_string(c.np) +
                              " ep " + std::to_string(c.ep) + " " + c.precision;
    const std::string single = (dir.path() / (where + "-single.safetensors")).string();
    const std::string multi = (dir.path() / (where + "-mpi.safetensors")).string();
    const auto one = kmoe::test::run_kmoe("block " + block_args(c, "'" + single + "'"));
    ASSERT_EQ(one.exit_code, 0) << where << ": " << one.err;
    const auto many = run_command(mpirun(c.np, block_args(c, "'" + multi + "'") +
                                                   (c.ep ? " --ep " + std::to_string(c.ep) : std::string())));
    ASSERT_EQ(many.exit_code, 0) << where << ": " << many.err;
    expect_same_outputs(multi, single, where, std::string(c.precision) == "f64" ? 1e-12 : 1e-5);
  }
}

TEST(BlockMpi, ImpossibleLayoutFailsOnEveryRankWithoutHanging) {
  ScratchDir dir("block-mpi-bad");
  const Case c{"granitemoe-tiny", 0, 3, 2};
  const auto out = (dir.path() / "out.safetensors").string();
  auto r = run_command(mpirun(3, block_args(c, out) + " --ep 2"));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  for (int rank = 0; rank < 3; ++rank)
    EXPECT_NE(r.err.find("rank " + std::to_string(rank) + "/3: expert placement: the world of 3 ranks is not a multiple of --ep 2"),
              std::string::npos)
        << r.err;
  EXPECT_FALSE(std::filesystem::exists(out));
  // ep > E: granitemoe has 6 experts.
  r = run_command(mpirun(1, block_args(c, out) + " --ep 7"));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--ep 7 exceeds the 6 experts"), std::string::npos) << r.err;
}

TEST(BlockMpi, BadInputOnEveryRankEndsTheJob) {
  ScratchDir dir("block-mpi-input");
  const Case c{"granitemoe-tiny", 0, 2, 0};
  const auto r = run_command(mpirun(2, "--checkpoint " + ckpt_dir(c.set) + " --layer 0 --inputs /nonexistent.safetensors --out " +
                                           (dir.path() / "o.safetensors").string()));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("/nonexistent.safetensors"), std::string::npos) << r.err;
}

}  // namespace
