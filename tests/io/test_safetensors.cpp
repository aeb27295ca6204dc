// safetensors reading and writing: byte-exact round trips of the oracle's files, the writer's exact bytes, zero-copy
// views, conversions to Kokkos host Views, atomic writes.
#include <kmoe/io/safetensors.hpp>

#include "io_test_util.hpp"

#include <cmath>
#include <cstring>

namespace {

using namespace kmoe::io;
using kmoe::test::file_bytes;
using kmoe::test::hf_dir;
using kmoe::test::ScratchDir;

/// Reads `path` and writes it back (same tensors, same metadata) to `out`.
void rewrite(const std::filesystem::path& path, const std::filesystem::path& out) {
  const auto f = SafetensorsFile::open(path);
  std::vector<TensorToWrite> ts;
  for (const auto& t : f.tensors()) ts.push_back(TensorToWrite::borrow(t));
  std::optional<MetadataEntries> md;
  if (f.has_metadata()) md = f.metadata_entries();
  write_safetensors_ordered(out, ts, md);
}

TEST(Safetensors, EveryShardOfEverySetRoundTripsByteForByte) {
  ScratchDir tmp("st-roundtrip");
  int files = 0;
  for (const auto& set : kmoe::test::testdata_sets()) {
    for (const auto& e : std::filesystem::directory_iterator(hf_dir(set))) {
      if (e.path().extension() != ".safetensors") continue;
      const auto out = tmp.path() / (set + "-" + e.path().filename().string());
      rewrite(e.path(), out);
      EXPECT_TRUE(file_bytes(out) == file_bytes(e.path())) << e.path() << " differs when written back";
      ++files;
    }
  }
  EXPECT_EQ(files, 6 + 7 + 6 + 8 + 7 + 7 + 9 + 5 + 8);  // in testdata_sets() order
}

TEST(Safetensors, ReferenceFilesWithManyMetadataKeysRoundTripByteForByte) {
  // Written by the Python library (Mixtral's with ten metadata keys in HashMap order), I64 and F64 tensors: the header order of
  // the metadata is kept on reading and reproduced by write_safetensors_ordered.
  ScratchDir tmp("st-ref-roundtrip");
  for (const auto& set : kmoe::test::testdata_sets()) {
    const auto path = kmoe::test::testdata_dir() / set / (set + "-ref.safetensors");
    const auto f = SafetensorsFile::open(path);
    if (set == "mixtral-tiny") EXPECT_GT(f.metadata_entries().size(), 5u);  // the Granite sets have no metadata
    EXPECT_EQ(f.metadata_entries().size(), f.metadata().size());
    rewrite(path, tmp.path() / "ref.safetensors");
    EXPECT_TRUE(file_bytes(tmp.path() / "ref.safetensors") == file_bytes(path)) << path;
  }
  // write_safetensors (a map) writes the keys sorted.
  write_safetensors(tmp.path() / "sorted.safetensors", {}, std::map<std::string, std::string>{{"b", "1"}, {"a", "2"}});
  const auto s = SafetensorsFile::open(tmp.path() / "sorted.safetensors");
  EXPECT_EQ(s.metadata_entries(), (MetadataEntries{{"a", "2"}, {"b", "1"}}));
  kmoe::test::expect_input_error(
      [&] { write_safetensors_ordered(tmp.path() / "dup.safetensors", {}, MetadataEntries{{"a", "1"}, {"a", "2"}}); },
      {"'a'", "twice"});
}

TEST(Safetensors, ReadsTheOracleHeaderAndDataZeroCopy) {
  const auto path = hf_dir("granitemoe-tiny") / "model-00003-of-00006.safetensors";
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.file_size(), 59160u);
  EXPECT_EQ(f.header_size() % 8, 0u);
  EXPECT_TRUE(f.has_metadata());
  EXPECT_EQ(f.metadata().at("format"), "pt");
  ASSERT_EQ(f.tensors().size(), 7u);
  EXPECT_EQ(f.names().front(), "model.layers.0.block_sparse_moe.output_linear.weight");
  const auto& t = f.tensor("model.layers.0.block_sparse_moe.router.layer.weight");
  EXPECT_EQ(t.dtype, DType::BF16);
  EXPECT_EQ(t.shape, (std::vector<std::int64_t>{6, 64}));
  EXPECT_EQ(t.nbytes, 6u * 64u * 2u);
  EXPECT_EQ(t.numel(), 384);
  // Zero copy: the view points into the mapping, at 8 + header + offset, and matches the bytes on disk.
  const auto& first = f.tensors().front();
  const std::string bytes = file_bytes(path);
  EXPECT_EQ(0, std::memcmp(first.data, bytes.data() + 8 + f.header_size(), first.nbytes));
  EXPECT_EQ(0, std::memcmp(t.data, bytes.data() + (t.data - first.data) + 8 + f.header_size(), t.nbytes));
  // Views keep the mapping alive after the file object is gone.
  TensorView copy = t;
  { const auto g = SafetensorsFile::open(path); copy = g.tensor(t.name); }
  EXPECT_EQ(0, std::memcmp(copy.data, t.data, t.nbytes));
  EXPECT_TRUE(f.has(t.name));
  EXPECT_FALSE(f.has("nope"));
}

TEST(Safetensors, WriterBytesMatchThePythonLibrary) {
  // The Rust library's own serialisation tests (safetensors/src/tensor.rs): exact bytes.
  const float v[6] = {0, 1, 2, 3, 4, 5};
  std::vector<TensorToWrite> one = {tensor_from_array("attn.0", v, {1, 2, 3}, DType::F32)};
  EXPECT_EQ(safetensors_header_json(one, std::nullopt),
            R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})");
  ScratchDir tmp("st-writer");
  write_safetensors(tmp.path() / "a.safetensors", one, std::nullopt);
  const std::string a = file_bytes(tmp.path() / "a.safetensors");
  ASSERT_EQ(a.size(), 8u + 64u + 24u);
  EXPECT_EQ(a[0], 64);
  write_safetensors(tmp.path() / "e.safetensors", {}, std::nullopt);
  EXPECT_EQ(file_bytes(tmp.path() / "e.safetensors"), std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  write_safetensors(tmp.path() / "m.safetensors", {}, std::map<std::string, std::string>{{"framework", "pt"}});
  EXPECT_EQ(file_bytes(tmp.path() / "m.safetensors"),
            std::string("\x28\0\0\0\0\0\0\0", 8) + R"({"__metadata__":{"framework":"pt"}})" + "     ");
  // Default metadata is transformers' {"format":"pt"}; order: descending dtype (safetensors' enum), then name.
  const double d = 1.5;
  const std::int64_t i = 7;
  std::vector<TensorToWrite> mixed = {tensor_from_array("z", &d, {}, DType::F64), tensor_from_array("b", &d, {1}, DType::BF16),
                                      tensor_from_array("a", &d, {1}, DType::BF16), tensor_from_array("idx", &i, {1}, DType::I64)};
  EXPECT_EQ(safetensors_header_json(mixed, MetadataEntries{{"format", "pt"}}),
            R"({"__metadata__":{"format":"pt"},"idx":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
            R"("z":{"dtype":"F64","shape":[],"data_offsets":[8,16]},"a":{"dtype":"BF16","shape":[1],"data_offsets":[16,18]},)"
            R"("b":{"dtype":"BF16","shape":[1],"data_offsets":[18,20]}})");
  // JSON escaping as serde_json: quotes, backslashes, control characters; UTF-8 verbatim.
  std::vector<TensorToWrite> odd = {tensor_from_array("q\"\\\n\x01\xc3\xa9", &d, {1}, DType::F64)};
  EXPECT_EQ(safetensors_header_json(odd, std::nullopt),
            "{\"q\\\"\\\\\\n\\u0001\xc3\xa9\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}");
  write_safetensors(tmp.path() / "odd.safetensors", odd);
  EXPECT_TRUE(SafetensorsFile::open(tmp.path() / "odd.safetensors").has("q\"\\\n\x01\xc3\xa9"));
}

TEST(Safetensors, EveryDTypeRoundTrips) {
  ScratchDir tmp("st-dtypes");
  std::vector<TensorToWrite> ts;
  std::vector<std::string> payloads;
  for (int k = 0; k < kNumDTypes; ++k) {
    const DType d = static_cast<DType>(k);
    TensorToWrite t;
    t.name = std::string("t_") + dtype_name(d);
    t.dtype = d;
    t.shape = {2, 4};  // 8 elements: whole bytes even for F4 and F6
    t.owned.resize(t.expected_nbytes());
    for (std::size_t b = 0; b < t.owned.size(); ++b) t.owned[b] = static_cast<std::byte>(b * 37 + k);
    ts.push_back(t);
  }
  TensorToWrite empty;
  empty.name = "empty";
  empty.dtype = DType::F32;
  empty.shape = {0, 3};
  ts.push_back(empty);
  write_safetensors(tmp.path() / "all.safetensors", ts);
  const auto f = SafetensorsFile::open(tmp.path() / "all.safetensors");
  ASSERT_EQ(f.tensors().size(), ts.size());
  for (const auto& t : ts) {
    const auto& r = f.tensor(t.name);
    EXPECT_EQ(r.dtype, t.dtype) << t.name;
    EXPECT_EQ(r.shape, t.shape) << t.name;
    ASSERT_EQ(r.nbytes, t.owned.size()) << t.name;
    EXPECT_EQ(0, std::memcmp(r.data, t.owned.data(), r.nbytes)) << t.name;
  }
  // File order = descending dtype: U64 first, BOOL last before... (names break ties).
  EXPECT_EQ(f.names().front(), "t_U64");
  // Writing the read file again gives the same bytes.
  rewrite(tmp.path() / "all.safetensors", tmp.path() / "again.safetensors");
  EXPECT_TRUE(file_bytes(tmp.path() / "all.safetensors") == file_bytes(tmp.path() / "again.safetensors"));
}

TEST(Safetensors, ConvertsToHostViews) {
  const auto ref = SafetensorsFile::open(kmoe::test::testdata_dir() / "granitemoe-tiny" / "granitemoe-tiny-ref.safetensors");
  const auto& x = ref.tensor("layers.0.x");
  auto flat = to_host_view<double>(x);
  ASSERT_EQ(flat.extent(0), 2u * 6u * 64u);
  for (std::size_t i = 0; i < flat.extent(0); ++i) {
    double v;
    std::memcpy(&v, x.data + 8 * i, 8);
    ASSERT_EQ(flat(i), v);
  }
  auto x3 = to_host_view_3d<double>(x);
  EXPECT_EQ(x3.extent(0), 2u);
  EXPECT_EQ(x3.extent(2), 64u);
  EXPECT_EQ(x3(1, 5, 63), flat(flat.extent(0) - 1));
  auto idx = to_host_view_2d<std::int64_t>(ref.tensor("layers.0.topk_idx"));
  EXPECT_EQ(idx.extent(0), 12u);
  for (std::size_t i = 0; i < idx.extent(0); ++i)
    for (std::size_t j = 0; j < 2; ++j) EXPECT_TRUE(idx(i, j) >= 0 && idx(i, j) < 6);
  kmoe::test::expect_input_error([&] { to_host_view_2d<double>(x); }, {"layers.0.x", "rank 2"});
  kmoe::test::expect_input_error([&] { to_host_view<std::int64_t>(x); }, {"layers.0.x", "F64", "int64"});

  // bf16 -> float is exact; bf16 -> bf16 keeps the bits; float -> bf16 -> float is the identity on bf16 values.
  const auto shard = SafetensorsFile::open(hf_dir("mixtral-tiny") / "model-00001-of-00006.safetensors");
  const auto& w = shard.tensor("lm_head.weight");
  auto wf = to_host_view<float>(w);
  auto wb = to_host_view<kmoe::bf16>(w);
  auto wd = to_host_view<double>(w);
  for (std::size_t i = 0; i < wf.extent(0); ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, w.data + 2 * i, 2);
    ASSERT_EQ(wb(i).bits, bits);
    std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
    float expect;
    std::memcpy(&expect, &u, 4);
    ASSERT_EQ(wf(i), expect);
    ASSERT_EQ(wd(i), static_cast<double>(expect));
  }
  auto back = tensor_from_host_view("lm_head.weight", wf, DType::BF16);
  EXPECT_EQ(0, std::memcmp(back.owned.data(), w.data, w.nbytes));
  auto backd = tensor_from_host_view("lm_head.weight", wd, DType::BF16);
  EXPECT_EQ(0, std::memcmp(backd.owned.data(), w.data, w.nbytes));
}

TEST(Safetensors, HostViewsOfAnyLayoutWriteRowMajor) {
  Kokkos::View<double**, Kokkos::LayoutLeft, Kokkos::HostSpace> m("m", 2, 3);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) m(i, j) = 10 * i + j;
  auto t = tensor_from_host_view("m", m);
  EXPECT_EQ(t.dtype, DType::F64);
  EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2, 3}));
  const double expect[6] = {0, 1, 2, 10, 11, 12};
  EXPECT_EQ(0, std::memcmp(t.owned.data(), expect, sizeof expect));
  Kokkos::View<std::int64_t*, Kokkos::HostSpace> iv("iv", 3);
  iv(2) = -5;
  auto ti = tensor_from_host_view("iv", iv);
  EXPECT_EQ(ti.dtype, DType::I64);
  ScratchDir tmp("st-views");
  write_safetensors(tmp.path() / "v.safetensors", {t, ti});
  const auto f = SafetensorsFile::open(tmp.path() / "v.safetensors");
  auto r = to_host_view_2d<double>(f.tensor("m"));
  EXPECT_EQ(r(1, 2), 12.0);
  EXPECT_EQ(to_host_view<std::int64_t>(f.tensor("iv"))(2), -5);
  auto i32 = tensor_from_host_view("iv32", iv, DType::I32);
  EXPECT_EQ(i32.owned.size(), 12u);
  iv(0) = std::int64_t(1) << 40;
  kmoe::test::expect_input_error([&] { tensor_from_host_view("big", iv, DType::I32); }, {"big", "does not fit"});
}

TEST(Safetensors, WritesAreAtomic) {
  ScratchDir tmp("st-atomic");
  const auto path = tmp.path() / "x.safetensors";
  const float v[2] = {1, 2};
  write_safetensors(path, {tensor_from_array("a", v, {2}, DType::F32)});
  const std::string before = file_bytes(path);
  // A failing write (bytes do not match the shape) leaves the old file untouched and no temporary behind.
  TensorToWrite bad;
  bad.name = "bad";
  bad.dtype = DType::F32;
  bad.shape = {3};
  bad.owned.resize(4);
  kmoe::test::expect_input_error([&] { write_safetensors(path, {bad}); }, {"x.safetensors", "bad"});
  EXPECT_EQ(file_bytes(path), before);
  kmoe::test::expect_input_error([&] { write_safetensors(path, {tensor_from_array("a", v, {2}, DType::F32),
                                                                tensor_from_array("a", v, {1}, DType::F32)}); },
                                 {"'a'", "twice"});
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(tmp.path())) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 1);
  kmoe::test::expect_input_error([&] { write_safetensors(tmp.path() / "no" / "dir.safetensors", {}); },
                                 {"dir.safetensors"});
}

}  // namespace
