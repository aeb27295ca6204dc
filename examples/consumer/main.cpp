// The smallest kmoe consumer: prints the version of the installed kmoe and runs a Kokkos kernel through it.
#include <Kokkos_Core.hpp>
#include <cstdio>
#include <kmoe/core/bf16.hpp>
#include <kmoe/core/version.hpp>

int main(int argc, char** argv) {
  Kokkos::ScopeGuard guard(argc, argv);
  std::printf("%s\n", kmoe::version_string().c_str());
  // Round 1000 floats through bf16 on the default execution space and count how many changed by more than 2^-8.
  const int n = 1000;
  int bad = 0;
  Kokkos::parallel_reduce(
      "consumer.bf16", n,
      KOKKOS_LAMBDA(int i, int& acc) {
        const float x = 1.0f + 0.001f * i;
        const float y = static_cast<float>(kmoe::bf16::from_float(x));
        if ((x - y) > x / 256 || (y - x) > x / 256) ++acc;
      },
      bad);
  std::printf("bf16 round trip: %d of %d outside 2^-8\n", bad, n);
  return bad == 0 ? 0 : 1;
}
