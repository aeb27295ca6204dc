/// \file version.hpp
/// \brief kmoe's version and the configuration it was built with, as one line for --version.
#pragma once

#include <kmoe/config.hpp>
#include <string>

namespace kmoe {

/// "kmoe 0.1.0 (Kokkos 3.4.1; MPI on; NCCL off; HDF5 on; CUDA off)".
std::string version_string();

}  // namespace kmoe
