// Sharded HDF5 checkpoints under mpirun: every rank saves its expert range (7 experts over N ranks: uneven, and
// empty ranges when N > 7), rank 0 the replicated tensors; the result loads re-sliced into 1..5 ranks. A failure on
// one rank makes every rank fail and commits nothing.
#include <gtest/gtest.h>
#include <mpi.h>

#include <kmoe/core/error.hpp>

#include "hdf5_test_data.hpp"
#include "kmoe_test.hpp"

namespace {

using namespace kmoe::test::hdf5;

// One scratch directory for all ranks: rank 0 creates it, the others learn its path.
fs::path shared_dir(const std::string& tag, std::unique_ptr<kmoe::test::ScratchDir>& owner) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::string path;
  if (rank == 0) {
    owner = std::make_unique<kmoe::test::ScratchDir>(tag);
    path = owner->path().string();
  }
  int n = static_cast<int>(path.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  path.resize(static_cast<std::size_t>(n));
  MPI_Bcast(path.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

TEST(Hdf5CheckpointMpi, SaveByAllRanksLoadIntoAnyCount) {
  std::unique_ptr<kmoe::test::ScratchDir> owner;
  const fs::path run = shared_dir("hdf5-mpi", owner);
  const auto group = kmoe::io::world_rank_group();
  const Saved s = make_data(4);
  kmoe::io::save_hdf5_checkpoint(run / "checkpoint-4", contents_for(s, 4, group.rank, group.size), group);
  const auto ck = Hdf5Checkpoint::open(run / "checkpoint-4");
  EXPECT_EQ(ck.saved_world_size(), group.size);
  EXPECT_EQ(ck.expert_ranges(), kmoe::io::contiguous_expert_ranges(kE, group.size));
  for (int readers = 1; readers <= 5; ++readers) expect_contents(ck, 4, readers);
  MPI_Barrier(MPI_COMM_WORLD);  // nobody removes the directory while others read
}

TEST(Hdf5CheckpointMpi, FailureOnOneRankCommitsNothing) {
  std::unique_ptr<kmoe::test::ScratchDir> owner;
  const fs::path run = shared_dir("hdf5-mpi-fail", owner);
  const auto group = kmoe::io::world_rank_group();
  const Saved s = make_data(5);
  auto c = contents_for(s, 5, group.rank, group.size);
  if (group.rank == group.size - 1) c.tensors[0].name = std::string("bad\0name", 8);  // the last rank cannot save it
  EXPECT_THROW(kmoe::io::save_hdf5_checkpoint(run / "checkpoint-5", c, group), kmoe::InputError);
  EXPECT_FALSE(fs::exists(run / "checkpoint-5"));
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
