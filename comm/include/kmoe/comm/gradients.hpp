/// \file gradients.hpp
/// \brief Gradient reduction for expert parallelism and the global gradient norm for clipping.
///
/// Two kinds of parameters: replicated ones (the router, shared experts: every rank holds all of them and saw only its
/// own tokens) are summed over the world; expert ones (each rank holds its local experts' slice and saw the tokens of
/// its replica) are summed over the replica group. After reduce(), every copy of a parameter holds the full gradient,
/// and global_norm() counts each parameter once: replicated ones on world rank 0, expert slices on replica 0.
#pragma once

#include <kmoe/comm/expert_parallel.hpp>

#include <Kokkos_Core.hpp>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace kmoe::comm {

/// Which ranks share a gradient buffer.
enum class GradKind {
  replicated,  ///< every rank holds the whole parameter: summed over the world
  expert       ///< a slice of the experts held by the ranks of one replica group: summed over that group
};

/// A list of gradient views to reduce together, then measure or clip. The views are captured by value (Kokkos views
/// share their data), so reduce() and clip() update the caller's gradients in place.
class GradientSet {
 public:
  /// \param layout [in] the expert-parallel layout; must outlive this object
  explicit GradientSet(const ExpertParallel& layout) : layout_(&layout) {}

  /// Adds a contiguous gradient view (any rank, float or double, in the communicator's memory space).
  /// \param name [in] for messages
  /// \param kind [in] how the ranks share it
  template <class V>
  void add(const std::string& name, const V& grad, GradKind kind);

  /// Sums every gradient over the ranks that share it (collective over the world; every rank must have added the same
  /// names in the same order). Blocks.
  void reduce();

  /// The L2 norm of all gradients, each parameter counted once over the whole job (identical on every rank).
  /// Call after reduce(). Collective over the world.
  double global_norm() const;

  /// Scales every gradient by min(1, max_norm / (norm + 1e-6)) like torch.nn.utils.clip_grad_norm_.
  /// \return the norm before clipping. Collective over the world.
  double clip(double max_norm);

 private:
  struct Entry {
    std::string name;
    GradKind kind;
    std::function<void(Communicator&)> allreduce;
    std::function<double()> sum_of_squares;
    std::function<void(double)> scale;
  };
  const ExpertParallel* layout_;
  std::vector<Entry> entries_;
};

namespace detail {
// Named functions, not lambdas inside the std::function closures: nvcc rejects a device lambda whose enclosing
// function is itself a lambda.
template <class Exec, class Flat>
double sum_of_squares(const Flat& flat) {
  double s = 0;
  Kokkos::parallel_reduce(
      "kmoe::comm::grad_sum_of_squares", Kokkos::RangePolicy<Exec>(0, flat.extent(0)),
      KOKKOS_LAMBDA(const std::size_t i, double& acc) {
        const double v = static_cast<double>(flat(i));
        acc += v * v;
      },
      s);
  return s;
}

template <class Exec, class Flat>
void scale(const Flat& flat, double f) {
  using T = typename Flat::non_const_value_type;
  const T tf = static_cast<T>(f);
  Kokkos::parallel_for(
      "kmoe::comm::grad_scale", Kokkos::RangePolicy<Exec>(0, flat.extent(0)),
      KOKKOS_LAMBDA(const std::size_t i) { flat(i) = flat(i) * tf; });
  Kokkos::fence();
}
}  // namespace detail

template <class V>
void GradientSet::add(const std::string& name, const V& grad, GradKind kind) {
  using T = typename V::non_const_value_type;
  KMOE_CHECK_USAGE(grad.span_is_contiguous(), "kmoe::comm::GradientSet::add: gradient '", name, "' is not contiguous");
  using Flat = Kokkos::View<T*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  // A flat alias of the caller's data; `grad` itself is captured to keep the allocation alive.
  const Flat flat(grad.data(), grad.span());
  Entry e;
  e.name = name;
  e.kind = kind;
  e.allreduce = [grad, flat](Communicator& c) {
    Kokkos::fence();
    c.allreduce_sum(flat.data(), static_cast<std::int64_t>(flat.extent(0)), data_type_v<T>);
    c.synchronize();
  };
  e.sum_of_squares = [grad, flat]() { return detail::sum_of_squares<typename V::execution_space>(flat); };
  e.scale = [grad, flat](double f) { detail::scale<typename V::execution_space>(flat, f); };
  entries_.push_back(std::move(e));
}

}  // namespace kmoe::comm
