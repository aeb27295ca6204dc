#include <kmoe/core/version.hpp>

#include <Kokkos_Core.hpp>
#include <sstream>

namespace kmoe {

std::string version_string() {
  std::ostringstream os;
  auto on = [](int v) { return v ? "on" : "off"; };
  os << "kmoe " << KMOE_VERSION_STRING << " (Kokkos " << KOKKOS_VERSION / 10000 << "." << (KOKKOS_VERSION / 100) % 100
     << "." << KOKKOS_VERSION % 100 << "; CUDA " << on(KMOE_ENABLE_CUDA) << "; MPI " << on(KMOE_ENABLE_MPI) << "; NCCL "
     << on(KMOE_ENABLE_NCCL) << "; HDF5 " << on(KMOE_ENABLE_HDF5) << ")";
  return os.str();
}

}  // namespace kmoe
