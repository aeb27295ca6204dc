#include <kmoe/io/dtype.hpp>

#include <kmoe/core/error.hpp>

#include <limits>

namespace kmoe::io {
namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  unsigned bits;
};

// Same order as the enum (checked by the tests).
constexpr DTypeInfo kInfo[] = {
    {DType::BOOL, "BOOL", 8},       {DType::F4, "F4", 4},           {DType::F6_E2M3, "F6_E2M3", 6},
    {DType::F6_E3M2, "F6_E3M2", 6}, {DType::U8, "U8", 8},           {DType::I8, "I8", 8},
    {DType::F8_E5M2, "F8_E5M2", 8}, {DType::F8_E4M3, "F8_E4M3", 8}, {DType::F8_E8M0, "F8_E8M0", 8},
    {DType::I16, "I16", 16},        {DType::U16, "U16", 16},        {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},      {DType::I32, "I32", 32},        {DType::U32, "U32", 32},
    {DType::F32, "F32", 32},        {DType::C64, "C64", 64},        {DType::F64, "F64", 64},
    {DType::I64, "I64", 64},        {DType::U64, "U64", 64},
};
static_assert(sizeof(kInfo) / sizeof(kInfo[0]) == kNumDTypes, "one entry per DType");

const DTypeInfo& info(DType d) { return kInfo[static_cast<int>(d)]; }

}  // namespace

const char* dtype_name(DType dtype) { return info(dtype).name; }

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& i : kInfo)
    if (name == i.name) return i.dtype;
  return std::nullopt;
}

DType dtype_from_name(std::string_view name) {
  if (auto d = parse_dtype(name)) return *d;
  std::string known;
  for (const auto& i : kInfo) known += std::string(known.empty() ? "" : ", ") + i.name;
  throw InputError(detail::concat("unknown dtype '", name, "' (known: ", known, ")"));
}

std::size_t dtype_bits(DType dtype) { return info(dtype).bits; }

std::size_t dtype_size(DType dtype) { return info(dtype).bits % 8 == 0 ? info(dtype).bits / 8 : 0; }

std::optional<std::uint64_t> dtype_nbytes(DType dtype, std::int64_t numel) {
  if (numel < 0) return std::nullopt;
  const std::uint64_t n = static_cast<std::uint64_t>(numel), bits = info(dtype).bits;
  if (n > std::numeric_limits<std::uint64_t>::max() / bits) return std::nullopt;
  if ((n * bits) % 8 != 0) return std::nullopt;
  return n * bits / 8;
}

bool dtype_is_float(DType dtype) {
  switch (dtype) {
    case DType::F64:
    case DType::F32:
    case DType::F16:
    case DType::BF16:
    case DType::F8_E4M3:
    case DType::F8_E5M2:
    case DType::F8_E8M0:
      return true;
    default:
      return false;
  }
}

bool dtype_is_integer(DType dtype) {
  switch (dtype) {
    case DType::BOOL:
    case DType::U8:
    case DType::I8:
    case DType::I16:
    case DType::U16:
    case DType::I32:
    case DType::U32:
    case DType::I64:
    case DType::U64:
      return true;
    default:
      return false;
  }
}

}  // namespace kmoe::io
