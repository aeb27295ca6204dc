#include "io_test_util.hpp"

#include <kmoe/core/error.hpp>

#include <fstream>
#include <sstream>

namespace kmoe::test {

std::vector<std::string> testdata_sets() {
  return {"granitemoe-tiny",   "granitemoeshared-tiny", "mixtral-tiny", "qwen2_moe-tiny", "qwen3_moe-tiny",
          "olmoe-tiny",        "deepseek_v3-tiny",      "gpt_oss-tiny", "granitemoehybrid-tiny"};
}

std::filesystem::path hf_dir(const std::string& set) { return testdata_dir() / set / "hf_save_pretrained"; }

std::string file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string make_safetensors(const std::string& header_json, const std::string& data, bool pad) {
  std::string h = header_json;
  if (pad) h.append((8 - h.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const std::uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + h + data;
}

void copy_dir(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::filesystem::create_directories(to);
  for (const auto& e : std::filesystem::directory_iterator(from)) {
    std::filesystem::copy_file(e.path(), to / e.path().filename(), std::filesystem::copy_options::overwrite_existing);
    std::filesystem::permissions(to / e.path().filename(), std::filesystem::perms::owner_write,
                                 std::filesystem::perm_options::add);
  }
}

void expect_input_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no InputError thrown (expected one mentioning '" << (parts.empty() ? "" : parts[0]) << "')";
  } catch (const kmoe::InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

}  // namespace kmoe::test
