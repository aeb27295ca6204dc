// libFuzzer target: the safetensors header parser and validator on arbitrary bytes. Properties: it never crashes,
// hangs or over-allocates (ASan/UBSan watch), every rejection is a one-line kmoe::InputError of bounded length with
// no control character in it (names from the file are escaped), every accepted name is free of NUL, and every
// accepted file re-serialises (with kmoe's writer) into a file that parses to the same tensors. The seeds
// (fuzz_seeds/) and the dictionary (fuzz_safetensors_header.dict) carry escaped names, deep nesting, duplicate
// fields and overflowing shapes.
#include <kmoe/io/safetensors_file.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace {

std::shared_ptr<const std::vector<std::byte>> copy(const std::uint8_t* d, std::size_t n) {
  auto v = std::make_shared<std::vector<std::byte>>(n);
  if (n) std::memcpy(v->data(), d, n);
  return v;
}

void check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace kmoe::io;
  SafetensorsFile f;
  try {
    f = SafetensorsFile::from_bytes(copy(data, size), "fuzz.safetensors");
  } catch (const kmoe::InputError& e) {
    const std::size_t n = std::strlen(e.what());
    check(n <= kmoe::detail::kMaxMessageBytes + 64);  // bounded
    for (std::size_t i = 0; i < n; ++i) {
      const auto c = static_cast<unsigned char>(e.what()[i]);
      check(c >= 0x20 && c != 0x7F);  // one printable line
    }
    return 0;
  }
  for (const auto& t : f.tensors()) check(t.name.find('\0') == std::string::npos);
  // Accepted: write it back in memory and parse again.
  std::vector<TensorToWrite> ts;
  for (const auto& t : f.tensors()) ts.push_back(TensorToWrite::borrow(t));
  std::optional<MetadataEntries> md;
  if (f.has_metadata()) md = f.metadata_entries();
  std::string header = safetensors_header_json(ts, md);
  header.append((8 - header.size() % 8) % 8, ' ');
  std::vector<std::size_t> order;
  safetensors_header_json(ts, md, &order);
  auto out = std::make_shared<std::vector<std::byte>>();
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<std::byte>(static_cast<std::uint64_t>(header.size()) >> (8 * i)));
  for (char c : header) out->push_back(static_cast<std::byte>(c));
  for (std::size_t i : order) out->insert(out->end(), ts[i].bytes(), ts[i].bytes() + ts[i].expected_nbytes());
  const SafetensorsFile g = SafetensorsFile::from_bytes(out, "rewritten.safetensors");
  check(g.tensors().size() == f.tensors().size());
  check(g.metadata() == f.metadata());
  check(g.metadata_entries() == f.metadata_entries());
  check(f.metadata_entries().size() == f.metadata().size());
  for (const auto& t : f.tensors()) {
    const TensorView& u = g.tensor(t.name);
    check(u.dtype == t.dtype && u.shape == t.shape && u.nbytes == t.nbytes);
    check(t.nbytes == 0 || std::memcmp(u.data, t.data, t.nbytes) == 0);
  }
  return 0;
}
