#include <kmoe/comm/communicator.hpp>

namespace kmoe::comm {

std::size_t size_of(DataType type) {
  switch (type) {
    case DataType::f32: return 4;
    case DataType::f64: return 8;
    case DataType::bf16: return 2;
    case DataType::i32: return 4;
    case DataType::i64: return 8;
  }
  KMOE_ASSERT(false, "unknown DataType ", static_cast<int>(type));
}

const char* name_of(DataType type) {
  switch (type) {
    case DataType::f32: return "f32";
    case DataType::f64: return "f64";
    case DataType::bf16: return "bf16";
    case DataType::i32: return "i32";
    case DataType::i64: return "i64";
  }
  return "?";
}

namespace detail {

void check_row_blocks(const char* function, const char* which, const RowBlock* blocks, std::size_t count, int size) {
  KMOE_CHECK_USAGE(blocks != nullptr || count == 0, function, ": ", which, " is null but holds ", count, " blocks");
  for (std::size_t i = 0; i < count; ++i) {
    const RowBlock& b = blocks[i];
    KMOE_CHECK_USAGE(b.peer >= 0 && b.peer < size, function, ": ", which, "[", i, "].peer = ", b.peer,
                     " is outside the group [0, ", size, ")");
    KMOE_CHECK_USAGE(b.offset >= 0, function, ": ", which, "[", i, "].offset = ", b.offset, " is negative");
    KMOE_CHECK_USAGE(b.rows >= 0, function, ": ", which, "[", i, "].rows = ", b.rows, " is negative");
  }
}

}  // namespace detail

int exit_code_for(const std::exception& e) {
  if (dynamic_cast<const InputError*>(&e)) return 1;
  if (dynamic_cast<const UsageError*>(&e)) return 2;
  return 3;
}

}  // namespace kmoe::comm
