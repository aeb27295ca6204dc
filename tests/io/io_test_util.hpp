// Helpers shared by the io tests: the oracle's checkpoint sets, file bytes, hand-made (possibly corrupt) files.
#pragma once

#include "kmoe_test.hpp"

#include <cstdint>
#include <functional>
#include <filesystem>
#include <string>
#include <vector>

namespace kmoe::test {

/// The checkpoint sets of the oracle: {"granitemoe-tiny", ...}.
std::vector<std::string> testdata_sets();
/// testdata/<set>/hf_save_pretrained
std::filesystem::path hf_dir(const std::string& set);
/// The bytes of a file.
std::string file_bytes(const std::filesystem::path& path);
/// Writes bytes to a file (plain, for making test inputs).
void write_bytes(const std::filesystem::path& path, const std::string& bytes);
/// A safetensors file from a header JSON (padded with spaces to a multiple of 8 unless pad is false) and data.
std::string make_safetensors(const std::string& header_json, const std::string& data, bool pad = true);
/// Copies a checkpoint directory (files only).
void copy_dir(const std::filesystem::path& from, const std::filesystem::path& to);
/// Asserts that `fn` throws kmoe::InputError whose one-line message contains every string of `parts`.
void expect_input_error(const std::function<void()>& fn, const std::vector<std::string>& parts);

}  // namespace kmoe::test
