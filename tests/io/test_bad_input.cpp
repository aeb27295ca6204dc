// Bad input: every malformation of the issue gives a one-line kmoe::InputError naming the file (and tensor), and
// `kmoe inspect` exits 1 with that line on stderr. Corrupt files are made here, from a valid one.
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/safetensors.hpp>

#include "io_test_util.hpp"

#include <fstream>

namespace {

using namespace kmoe::io;
using kmoe::test::expect_input_error;
using kmoe::test::make_safetensors;
using kmoe::test::ScratchDir;

struct Case {
  std::string name;
  std::string bytes;
  std::vector<std::string> message;  // parts the message must contain (besides the file name)
};

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

std::vector<Case> cases() {
  const std::string t = R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  const std::string ok = make_safetensors("{" + t + "}", std::string(16, 'x'));
  std::vector<Case> c = {
      {"empty", "", {"empty file"}},
      {"short", "abc", {"too short"}},
      {"size_past_eof", le64(1000) + "{}", {"header size 1000", "past the end"}},
      {"size_absurd", le64(std::uint64_t(1) << 62) + "{}      ", {"absurd"}},
      {"not_json", make_safetensors("{\"w\": {\"dtype\": \"F32\", ", ""), {"not valid JSON"}},
      {"not_utf8", make_safetensors("{\"w\xff\xfe\":{}}", ""), {"not UTF-8"}},
      {"not_object", make_safetensors("[1,2]", ""), {"does not start with '{'"}},
      {"unknown_dtype", make_safetensors(R"({"w":{"dtype":"F128","shape":[2],"data_offsets":[0,32]}})", std::string(32, 'x')),
       {"tensor 'w'", "unknown dtype 'F128'"}},
      {"negative_shape", make_safetensors(R"({"w":{"dtype":"F32","shape":[-2,2],"data_offsets":[0,16]}})", std::string(16, 'x')),
       {"tensor 'w'", "negative dimension -2"}},
      {"float_shape", make_safetensors(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,16]}})", std::string(16, 'x')),
       {"tensor 'w'", "non-negative integer"}},
      {"size_mismatch", make_safetensors(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}})", std::string(16, 'x')),
       {"tensor 'w'", "needs 24 bytes", "hold 16"}},
      {"offsets_past_data", make_safetensors(R"({"w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})", std::string(16, 'x')),
       {"tensor 'w'", "past the end of the data"}},
      {"offsets_reversed", make_safetensors(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", std::string(16, 'x')),
       {"tensor 'w'", "end before they begin"}},
      {"offsets_arity", make_safetensors(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0]}})", std::string(16, 'x')),
       {"tensor 'w'", "[begin, end]"}},
      {"missing_field", make_safetensors(R"({"w":{"dtype":"F32","shape":[4]}})", std::string(16, 'x')),
       {"tensor 'w'", "data_offsets"}},
      {"overlap", make_safetensors(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                   std::string(16, 'x')),
       {"overlap", "'a'", "'b'"}},
      {"hole", make_safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})",
                                std::string(16, 'x')),
       {"hole of 4 bytes", "'b'"}},
      {"trailing", ok + "zz", {"2 trailing bytes"}},
      {"truncated", ok.substr(0, ok.size() - 5), {"tensor 'w'", "past the end of the data", "cut short"}},
      {"truncated_header", ok.substr(0, 20), {"past the end of the file"}},
      {"metadata_not_strings", make_safetensors(R"({"__metadata__":{"format":3}})", ""), {"__metadata__", "'format'"}},
  };
  return c;
}

TEST(BadInput, EveryMalformedFileIsAOneLineInputErrorNamingTheFile) {
  ScratchDir tmp("bad");
  for (const auto& c : cases()) {
    SCOPED_TRACE(c.name);
    const auto path = tmp.path() / (c.name + ".safetensors");
    kmoe::test::write_bytes(path, c.bytes);
    auto parts = c.message;
    parts.push_back(path.string());
    expect_input_error([&] { SafetensorsFile::open(path); }, parts);
    // The same through the command: exit 1, the one line on stderr, nothing on stdout.
    const auto r = kmoe::test::run_kmoe("inspect " + path.string());
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(path.string()), std::string::npos) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
  expect_input_error([&] { SafetensorsFile::open(tmp.path() / "absent.safetensors"); }, {"absent.safetensors", "cannot open"});
  expect_input_error([&] { SafetensorsFile::open(tmp.path()); }, {"not a regular file"});
  EXPECT_EQ(kmoe::test::run_kmoe("inspect " + (tmp.path() / "absent").string()).exit_code, 1);
  EXPECT_EQ(kmoe::test::run_kmoe("inspect").exit_code, 2);
}

TEST(BadInput, AbsentTensorNamesFileAndTensor) {
  const auto f = SafetensorsFile::open(kmoe::test::hf_dir("mixtral-tiny") / "model-00006-of-00006.safetensors");
  expect_input_error([&] { f.tensor("model.nope.weight"); }, {"model-00006-of-00006.safetensors", "'model.nope.weight'"});
}

class BadCheckpoint : public ::testing::Test {
 protected:
  ScratchDir tmp{"bad-ckpt"};
  std::filesystem::path dir = tmp.path() / "ck";
  void SetUp() override { kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir); }
  std::string index() { return kmoe::test::file_bytes(dir / "model.safetensors.index.json"); }
  void set_index(const std::string& s) { kmoe::test::write_bytes(dir / "model.safetensors.index.json", s); }
  static std::string replace(std::string s, const std::string& from, const std::string& to) {
    const auto p = s.find(from);
    EXPECT_NE(p, std::string::npos) << from;
    return s.replace(p, from.size(), to);
  }
};

TEST_F(BadCheckpoint, MissingShard) {
  std::filesystem::remove(dir / "model-00004-of-00006.safetensors");
  expect_input_error([&] { HfCheckpoint::open(dir); },
                     {"model-00004-of-00006.safetensors", "missing shard", "model.layers.1.block_sparse_moe.input_linear.weight"});
  const auto r = kmoe::test::run_kmoe("inspect " + dir.string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("model-00004-of-00006.safetensors"), std::string::npos) << r.err;
}

TEST_F(BadCheckpoint, TensorInIndexAbsentFromItsShard) {
  set_index(replace(index(), R"("model.norm.weight": "model-00006-of-00006.safetensors")",
                    R"("model.norm.weight": "model-00001-of-00006.safetensors")"));
  expect_input_error([&] { HfCheckpoint::open(dir); },
                     {"model-00001-of-00006.safetensors", "no tensor 'model.norm.weight'", "index"});
}

TEST_F(BadCheckpoint, TensorOfAShardMissingFromTheIndex) {
  set_index(replace(index(), "    \"model.norm.weight\": \"model-00006-of-00006.safetensors\"\n",
                    "    \"zz\": \"model-00006-of-00006.safetensors\"\n"));
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"model-00006-of-00006.safetensors"});
}

TEST_F(BadCheckpoint, CorruptShardNamesTheShard) {
  const auto shard = dir / "model-00003-of-00006.safetensors";
  const std::string b = kmoe::test::file_bytes(shard);
  kmoe::test::write_bytes(shard, b.substr(0, b.size() - 100));
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"model-00003-of-00006.safetensors", "cut short"});
}

TEST_F(BadCheckpoint, IndexAndConfigProblems) {
  set_index(replace(index(), R"("model.norm.weight": "model-00006-of-00006.safetensors")",
                    R"("model.norm.weight": "../model-00006-of-00006.safetensors")"));
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"index.json", "not a file inside"});
  set_index("{\"weight_map\": [");
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"model.safetensors.index.json", "not valid JSON"});
  std::filesystem::remove(dir / "model.safetensors.index.json");
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"neither model.safetensors nor model.safetensors.index.json"});
  std::filesystem::remove(dir / "config.json");
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"config.json", "cannot open"});
  kmoe::test::write_bytes(dir / "config.json", R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 64})");
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"config.json", "missing \"num_hidden_layers\""});
  kmoe::test::write_bytes(dir / "config.json", R"({"architectures": ["MixtralForCausalLM"], "hidden_size": "64"})");
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"config.json", "\"hidden_size\"", "\"64\""});
  expect_input_error([&] { HfCheckpoint::open(dir / "nowhere"); }, {"nowhere", "not a checkpoint directory"});
}

}  // namespace
