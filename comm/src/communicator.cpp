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

int exit_code_for(const std::exception& e) {
  if (dynamic_cast<const InputError*>(&e)) return 1;
  if (dynamic_cast<const UsageError*>(&e)) return 2;
  return 3;
}

}  // namespace kmoe::comm
