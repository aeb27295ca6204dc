// Must NOT compile: MoeLayer<bf16, S> exists only for S = Kokkos::Cuda (the hand-written block). The ctest
// compile_fail_bf16_host_layer builds this file and passes when the compiler prints the static_assert's message.
#include <kmoe/moe/moe_layer.hpp>

int main() {
  kmoe::moe::MoeLayer<kmoe::bf16, Kokkos::DefaultHostExecutionSpace> layer({}, {});
  return static_cast<int>(layer.options().top_k);
}
