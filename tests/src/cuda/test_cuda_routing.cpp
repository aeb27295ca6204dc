// routing_forward on Kokkos::Cuda: the CUDA overload (bf16 x/gate) is the one a plain call selects, and it agrees
// with the portable implementation forced by GemmAlgo::Kokkos on the same space. Outputs are poisoned first.
#include "cuda_test.hpp"
#include "moe_reference.hpp"

#include <kmoe/core/routing.hpp>

#include <cmath>
#include <random>

namespace {

using Mat = Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::CudaSpace>;
using BMat = Kokkos::View<kmoe::bf16**, Kokkos::LayoutRight, Kokkos::CudaSpace>;
using IMat = Kokkos::View<std::int64_t**, Kokkos::LayoutRight, Kokkos::CudaSpace>;

struct Out {
  std::vector<double> logits, probs, weight;
  std::vector<std::int64_t> idx;
};

template <class V>
auto host(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  using T = typename V::non_const_value_type;
  using R = std::conditional_t<std::is_same<T, std::int64_t>::value, std::int64_t, double>;
  return std::vector<R>(h.data(), h.data() + h.span());
}

Out route(const BMat& x, const BMat& gate, int k, kmoe::core::GemmAlgo algo) {
  const std::int64_t T = x.extent(0), E = gate.extent(0);
  Mat logits("logits", T, E), probs("probs", T, E), weight("weight", T, k);
  IMat idx("idx", T, k);
  Kokkos::deep_copy(logits, NAN);
  Kokkos::deep_copy(probs, NAN);
  Kokkos::deep_copy(weight, NAN);
  Kokkos::deep_copy(idx, -1);
  kmoe::core::routing_forward(Kokkos::Cuda(), x, gate, logits, probs, idx, weight, algo);
  return {host(logits), host(probs), host(weight), host(idx)};
}

BMat random_bf16(const char* name, std::int64_t rows, std::int64_t cols, float scale, std::mt19937& rng) {
  BMat v(std::string(name), rows, cols);
  auto h = Kokkos::create_mirror_view(v);
  std::normal_distribution<float> d(0.f, scale);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = kmoe::bf16::from_float(d(rng));
  Kokkos::deep_copy(v, h);
  return v;
}

TEST(CudaRouting, OverloadOnCudaMatchesPortablePath) {
  KMOE_REQUIRE_GPU();
  std::mt19937 rng(11);
  for (auto [T, H, E, k] : {std::tuple<std::int64_t, int, int, int>{1000, 256, 8, 2}, {333, 128, 64, 8},
                            {77, 64, 6, 1}, {129, 64, 256, 32}}) {
    SCOPED_TRACE(::testing::Message() << "T=" << T << " H=" << H << " E=" << E << " k=" << k);
    const BMat x = random_bf16("x", T, H, 1.f, rng), gate = random_bf16("gate", E, H, 2.f / std::sqrt(float(H)), rng);
    const Out fast = route(x, gate, k, kmoe::core::GemmAlgo::Auto);
    const Out portable = route(x, gate, k, kmoe::core::GemmAlgo::Kokkos);
    // Both accumulate bf16 products in fp32: only the summation order differs.
    EXPECT_LE(kmoe::test::rel_l2(fast.logits, portable.logits), 1e-5);
    EXPECT_LE(kmoe::test::rel_l2(fast.probs, portable.probs), 1e-5);
    EXPECT_LE(kmoe::test::rel_l2(fast.weight, portable.weight), 1e-5);
    int differ = 0;
    for (std::size_t i = 0; i < fast.idx.size(); ++i) differ += fast.idx[i] != portable.idx[i];
    EXPECT_LE(differ, 2) << "top-k entries differ (beyond fp32 near ties)";
  }
}

}  // namespace
