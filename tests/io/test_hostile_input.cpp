// Hostile input to the safetensors parser and the Hugging Face directory reader: deep nesting, duplicate fields,
// control characters and NULs in names, sizes that overflow, FIFOs where files should be, headers with many tensors,
// config values the tensors contradict. Every case is a one-line kmoe::InputError, promptly, in bounded memory.
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/io/model_spec.hpp>
#include <kmoe/io/safetensors.hpp>

#include "io_test_util.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <regex>

namespace {

using namespace kmoe::io;
using kmoe::test::expect_input_error;
using kmoe::test::make_safetensors;
using kmoe::test::ScratchDir;

/// The message of the InputError `fn` throws ("" and a test failure when it throws none).
std::string input_error(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const kmoe::InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no InputError";
  return "";
}

SafetensorsFile parse(const std::string& header, const std::string& data = "") {
  auto bytes = std::make_shared<std::vector<std::byte>>();
  const std::string f = make_safetensors(header, data);
  for (char c : f) bytes->push_back(static_cast<std::byte>(c));
  return SafetensorsFile::from_bytes(bytes, "h.safetensors");
}

std::string nest(const std::string& open, const std::string& close, std::size_t depth, const std::string& inner) {
  std::string s;
  s.reserve(depth * (open.size() + close.size()) + inner.size());
  for (std::size_t i = 0; i < depth; ++i) s += open;
  s += inner;
  for (std::size_t i = 0; i < depth; ++i) s += close;
  return s;
}

TEST(HostileHeader, DeepNestingIsRefusedWhereverItIs) {
  const std::size_t deep = 100'000;
  const std::vector<std::string> headers = {
      R"({"w":{"dtype":"F32","shape":)" + nest("[", "]", deep, "1") + R"(,"data_offsets":[0,4]}})",
      R"({"w":{"dtype":)" + nest("[", "]", deep, "") + R"(,"shape":[1],"data_offsets":[0,4]}})",
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":)" + nest("[", "]", deep, "0") + "}}",
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":)" + nest(R"({"a":)", "}", deep, "1") + "}}",
      R"({"__metadata__":)" + nest("[", "]", deep, "") + "}",
  };
  // Where a field wants a scalar or a flat array, the first nested level is already the wrong type; an unknown
  // field, which the parser skips, reaches the depth bound.
  const std::vector<std::string> expected = {"dimension must be a non-negative integer, got an array",
                                             "dtype must be a string, got an array",
                                             "data offset must be a non-negative integer, got an array",
                                             "nests deeper than 64 levels",
                                             "__metadata__ must be an object of strings, got an array"};
  for (std::size_t i = 0; i < headers.size(); ++i) {
    const std::string msg = input_error([&] { parse(headers[i], std::string(4, 'x')); });
    EXPECT_NE(msg.find(expected[i]), std::string::npos) << msg.substr(0, 200);
    EXPECT_LT(msg.size(), 400u);
  }
  expect_input_error([&] { parse(nest("[", "]", deep, "")); }, {"does not start with '{'"});
  // Unknown fields are skipped (as the Rust library's serde does) when they nest within the bound.
  const auto f = parse(R"({"w":{"extra":{"a":[1,[2,{"b":null}]]},"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                       std::string(4, 'x'));
  EXPECT_EQ(f.tensor("w").shape, std::vector<std::int64_t>{1});
}

TEST(HostileHeader, DuplicateFieldsOfAnEntryAreRefused) {
  expect_input_error(
      [&] { parse(R"({"w":{"dtype":"BF16","dtype":"F16","shape":[2],"data_offsets":[0,4]}})", std::string(4, 'x')); },
      {"tensor 'w'", "duplicate field \"dtype\""});
  expect_input_error(
      [&] { parse(R"({"w":{"dtype":"F32","shape":[1],"shape":[1],"data_offsets":[0,4]}})", std::string(4, 'x')); },
      {"tensor 'w'", "duplicate field \"shape\""});
  expect_input_error(
      [&] {
        parse(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data_offsets":[0,4]}})", std::string(4, 'x'));
      },
      {"tensor 'w'", "duplicate field \"data_offsets\""});
  expect_input_error(
      [&] {
        parse(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})");
      },
      {"tensor 'w'", "listed twice"});
}

TEST(HostileHeader, NamesWithControlCharactersAreEscapedAndNulIsRefused) {
  // A newline and an ANSI escape in a tensor name: the message stays one line and carries no raw escape.
  const std::string msg =
      input_error([&] { parse(R"({"a\nb\u001b[31m":{"dtype":"F128","shape":[1],"data_offsets":[0,4]}})", "xxxx"); });
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\x1b'), std::string::npos) << msg;
  EXPECT_NE(msg.find("tensor 'a\\nb\\x1b[31m'"), std::string::npos) << msg;
  expect_input_error([&] { parse(R"({"a\u0000b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "xxxx"); },
                     {"tensor name", "NUL"});
  expect_input_error([&] { parse(R"({"__metadata__":{"k\u0000":"v"}})"); }, {"__metadata__ key", "NUL"});
  expect_input_error([&] { parse(R"({"__metadata__":{"k":"v\u0000"}})"); }, {"__metadata__ value of 'k'", "NUL"});
  // A name with '/' is a valid safetensors name (checkpoints of other frameworks use them).
  EXPECT_TRUE(parse(R"({"a/b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "xxxx").has("a/b"));
}

TEST(HostileHeader, OverflowIsReportedAsOverflowAndLongShapesAreCut) {
  // 2^62 elements of 32 bits: 2^67 bits.
  expect_input_error([&] { parse(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]}})", "xxxx"); },
                     {"tensor 'w'", "overflows", "bits"});
  expect_input_error([&] { parse(R"({"w":{"dtype":"F4","shape":[4611686018427387904,4],"data_offsets":[0,4]}})", "xxxx"); },
                     {"tensor 'w'", "overflows"});
  std::string shape = "[";
  for (int i = 0; i < 100'000; ++i) shape += i ? ",1" : "1";
  shape += "]";
  const std::string msg =
      input_error([&] { parse(R"({"w":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,8]}})", std::string(8, 'x')); });
  EXPECT_NE(msg.find("(100000 dimensions)"), std::string::npos) << msg.substr(0, 300);
  EXPECT_LT(msg.size(), 300u) << msg.substr(0, 300);
}

TEST(HostileHeader, ValuesInMessagesAreNeverSerialisedWhole) {
  const std::string big(1'000'000, 'x');
  const std::string msg =
      input_error([&] { parse(R"({"w":{"dtype":"F32","shape":["big)" + big + R"("],"data_offsets":[0,4]}})", "xxxx"); });
  EXPECT_LT(msg.size(), 400u);
  EXPECT_NE(msg.find("dimension must be a non-negative integer"), std::string::npos) << msg;
}

/// Seconds to parse a header of n zero-size tensors (best of 3).
double parse_seconds(int n) {
  std::string h = "{";
  for (int i = 0; i < n; ++i)
    h += (i ? "," : "") + std::string("\"model.layers.") + std::to_string(i) +
         R"(.weight":{"dtype":"F32","shape":[0,7],"data_offsets":[0,0]})";
  h += "}";
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto f = parse(h);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(f.tensors().size(), static_cast<std::size_t>(n));
    best = std::min(best, s);
  }
  return best;
}

TEST(HostileHeader, ParseTimeGrowsLinearlyWithTheTensorCount) {
  // A complexity check, not a timing one: 10x the tensors may cost up to 30x the time (n log n with noise passes;
  // a quadratic parser takes 100x).
  const double t1 = parse_seconds(10'000), t10 = parse_seconds(100'000);
  EXPECT_LT(t10, 30 * std::max(t1, 1e-3)) << "10k tensors: " << t1 << " s, 100k tensors: " << t10 << " s";
}

// ---- files that are not regular files, JSON files -----------------------------------------------------------

class HostileDir : public ::testing::Test {
 protected:
  ScratchDir tmp{"hostile"};
  std::filesystem::path dir = tmp.path() / "ck";
  void SetUp() override { kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir); }
  void make_fifo(const std::filesystem::path& p) {
    std::filesystem::remove(p);
    ASSERT_EQ(::mkfifo(p.c_str(), 0644), 0) << p;
  }
  std::string config() { return kmoe::test::file_bytes(dir / "config.json"); }
  void set_config(const std::string& from, const std::string& to) {
    std::string c = config();
    const auto at = c.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    kmoe::test::write_bytes(dir / "config.json", c.replace(at, from.size(), to));
  }
};

TEST_F(HostileDir, FifosAreRefusedWithoutBlocking) {
  // An open() that waits for a FIFO's writer would block here forever (the test then fails by its ctest timeout).
  const auto shard = dir / "model-00003-of-00006.safetensors";
  make_fifo(shard);
  expect_input_error([&] { SafetensorsFile::open(shard); }, {shard.string(), "not a regular file (a FIFO)"});
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"model-00003-of-00006.safetensors", "FIFO"});
  for (const char* name : {"config.json", "model.safetensors.index.json"}) {
    std::filesystem::remove_all(dir);
    kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir);
    make_fifo(dir / name);
    expect_input_error([&] { HfCheckpoint::open(dir); }, {name, "not a regular file (a FIFO)"});
  }
}

TEST_F(HostileDir, SymbolicLinkLoopsAreInputErrors) {
  std::filesystem::create_directory_symlink(tmp.path() / "loop-b", tmp.path() / "loop-a");
  std::filesystem::create_directory_symlink(tmp.path() / "loop-a", tmp.path() / "loop-b");
  expect_input_error([&] { HfCheckpoint::open(tmp.path() / "loop-a"); }, {"loop-a", "symbolic links"});
  for (const char* name : {"config.json", "model.safetensors.index.json", "model-00002-of-00006.safetensors"}) {
    std::filesystem::remove(dir / name);
    std::filesystem::create_symlink(name, dir / name);  // points at itself
    expect_input_error([&] { HfCheckpoint::open(dir); }, {name, "symbolic links"});
    std::filesystem::remove(dir / name);
    kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir);
  }
}

TEST_F(HostileDir, DeepOrHugeJsonValuesAreRefusedBriefly) {
  const std::size_t deep = 100'000;
  set_config("\"hidden_size\": 64", "\"hidden_size\": " + nest("[", "]", deep, ""));
  std::string msg = input_error([&] { HfCheckpoint::open(dir); });
  EXPECT_NE(msg.find("config.json: JSON nests deeper than 64 levels"), std::string::npos) << msg.substr(0, 300);
  kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir);
  std::string zeros = "[";
  for (int i = 0; i < 100'000; ++i) zeros += i ? ",0" : "0";
  set_config("\"hidden_size\": 64", "\"hidden_size\": " + zeros + "]");
  msg = input_error([&] { HfCheckpoint::open(dir); });
  EXPECT_NE(msg.find("\"hidden_size\" must be a non-negative integer, got an array of 100000 elements"),
            std::string::npos) << msg.substr(0, 300);
  EXPECT_LT(msg.size(), 400u);
  std::string index = kmoe::test::file_bytes(dir / "model.safetensors.index.json");
  index.replace(index.find("\"weight_map\""), 12, "\"x\": " + nest("{\"a\": ", "}", deep, "1") + ", \"weight_map\"");
  std::filesystem::remove_all(dir);
  kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir);
  kmoe::test::write_bytes(dir / "model.safetensors.index.json", index);
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"model.safetensors.index.json", "nests deeper than 64"});
}

TEST_F(HostileDir, ConfigSizesAreCheckedAgainstTheTensorsBeforeAllocating) {
  set_config("\"hidden_size\": 64", "\"hidden_size\": 1099511627776");  // 2^40
  const auto ck = HfCheckpoint::open(dir);
  expect_input_error([&] { load_moe_layer<float>(ck, 0); }, {"router.layer.weight", "has shape", "1099511627776"});
  std::filesystem::remove_all(dir);
  kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir);
  set_config("\"num_local_experts\": 6", "\"num_local_experts\": 1073741824");
  set_config("\"intermediate_size\": 48", "\"intermediate_size\": 1073741824");
  expect_input_error([&] { HfCheckpoint::open(dir); }, {"config.json", "more than 2^60 elements"});
}

TEST_F(HostileDir, AnActivationKmoeDoesNotComputeIsRefusedByName) {
  set_config("\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"");
  const auto ck = HfCheckpoint::open(dir);  // inspection still works
  EXPECT_EQ(ck.config().hidden_act, "gelu");
  expect_input_error([&] { load_moe_layer<float>(ck, 0); }, {"config.json", "hidden_act 'gelu'", "silu"});
  std::filesystem::remove_all(dir);
  kmoe::test::copy_dir(kmoe::test::hf_dir("granitemoe-tiny"), dir);
  set_config("\"hidden_act\": \"silu\"", "\"hidden_act\": \"swish\"");
  EXPECT_NO_THROW(load_moe_layer<float>(HfCheckpoint::open(dir), 0));
}

}  // namespace
