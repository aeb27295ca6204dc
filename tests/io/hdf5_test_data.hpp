// Test data shared by the HDF5 checkpoint tests: a deterministic small "model state" and what each rank saves of it.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <kmoe/core/bf16.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>

namespace kmoe::test::hdf5 {

namespace fs = std::filesystem;
using kmoe::io::CheckpointContents;
using kmoe::io::DType;
using kmoe::io::Hdf5Checkpoint;

// Deterministic test tensors: a "weights" stack [E, 3, 5] of F32 and a bf16 matrix, plus an int64 vector.
constexpr std::int64_t kE = 7, kR = 3, kC = 5;
inline float stack_value(std::int64_t e, std::int64_t r, std::int64_t c, std::int64_t step) {
  return static_cast<float>(1000 * e + 10 * r + c) * 0.5f + static_cast<float>(step);
}

struct Saved {
  std::vector<float> stack;            // the whole [E,R,C]
  std::vector<std::uint16_t> embed;    // bf16 bits [4, 6]
  std::vector<std::int64_t> counters;  // [3]
};

inline Saved make_data(std::int64_t step) {
  Saved s;
  for (std::int64_t e = 0; e < kE; ++e)
    for (std::int64_t r = 0; r < kR; ++r)
      for (std::int64_t c = 0; c < kC; ++c) s.stack.push_back(stack_value(e, r, c, step));
  for (int i = 0; i < 24; ++i) s.embed.push_back(kmoe::bf16::float_to_bits(0.25f * float(i) - 3.0f + float(step)));
  s.counters = {step, -5, std::int64_t(1) << 40};
  return s;
}

inline kmoe::io::SourcePlan make_plan() {
  kmoe::io::SourcePlan p;
  p.tensors = {{"model.embed.weight", "model-00001-of-00002.safetensors", "BF16", {4, 6}},
               {"model.layers.0.experts.w", "model-00002-of-00002.safetensors", "BF16", {kE, kR, kC}}};
  p.files = {{"model-00001-of-00002.safetensors", {"model.embed.weight"}, {{"format", "pt"}}, true},
             {"model-00002-of-00002.safetensors", {"model.layers.0.experts.w"}, {}, false}};
  p.text_files = {{"config.json", "{\n  \"a\": 1\n}\n"}, {"empty.json", ""}};
  return p;
}

// What rank `rank` of `size` saves: its expert rows of the stack, and (rank 0) the replicated tensors.
inline CheckpointContents contents_for(const Saved& s, std::int64_t step, int rank, int size) {
  CheckpointContents c;
  c.step = step;
  c.architecture = "TestForCausalLM";
  c.expert_ranges = kmoe::io::contiguous_expert_ranges(kE, size);
  c.attributes = {{"optimizer", "adamw"}, {"lr", "0.001"}};
  c.source = make_plan();
  const auto [b, e] = c.expert_ranges[static_cast<std::size_t>(rank)];
  c.tensors.push_back({"moe.0.w1", DType::F32, {kE, kR, kC}, b, e, s.stack.data() + b * kR * kC});
  if (rank == 0) {
    c.tensors.push_back({"model.embed.weight", DType::BF16, {4, 6}, 0, 4, s.embed.data()});
    c.tensors.push_back({"counters", DType::I64, {3}, 0, 3, s.counters.data()});
  }
  return c;
}

inline void save_one_process(const fs::path& dir, std::int64_t step, const kmoe::io::SaveOptions& options = {}) {
  const Saved s = make_data(step);
  kmoe::io::save_hdf5_checkpoint(dir, contents_for(s, step, 0, 1), kmoe::io::RankGroup{}, options);
}

// Checks every tensor of a checkpoint saved at `step`, re-sliced over `ranks` readers.
inline void expect_contents(const Hdf5Checkpoint& ck, std::int64_t step, int ranks) {
  const Saved s = make_data(step);
  EXPECT_EQ(ck.step(), step);
  EXPECT_EQ(ck.architecture(), "TestForCausalLM");
  ASSERT_TRUE(ck.has("moe.0.w1"));
  EXPECT_EQ(ck.info("moe.0.w1").dtype, DType::F32);
  EXPECT_EQ(ck.info("moe.0.w1").shape, (std::vector<std::int64_t>{kE, kR, kC}));
  for (const auto& [b, e] : kmoe::io::contiguous_expert_ranges(kE, ranks)) {
    std::vector<float> got(static_cast<std::size_t>((e - b) * kR * kC));
    ck.read_rows("moe.0.w1", b, e, got.data(), got.size() * sizeof(float));
    for (std::size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], s.stack[b * kR * kC + i]) << "row range " << b;
    const auto as_f64 = ck.read_rows_f64("moe.0.w1", b, e);
    for (std::size_t i = 0; i < got.size(); ++i) ASSERT_EQ(as_f64[i], double(got[i]));
  }
  const auto embed = ck.read("model.embed.weight");
  ASSERT_EQ(embed.size(), s.embed.size() * 2);
  EXPECT_EQ(std::memcmp(embed.data(), s.embed.data(), embed.size()), 0);
  EXPECT_EQ(ck.info("model.embed.weight").dtype, DType::BF16);
  const auto embed_f32 = ck.read_rows_f32("model.embed.weight", 1, 2);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(embed_f32[i], kmoe::bf16::bits_to_float(s.embed[6 + i]));
  const auto counters = ck.read("counters");
  ASSERT_EQ(counters.size(), 24u);
  EXPECT_EQ(std::memcmp(counters.data(), s.counters.data(), 24), 0);
}

}  // namespace kmoe::test::hdf5
