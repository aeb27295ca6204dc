// The command's communicator of device buffers (cli.hpp, device_world).
#include "cli.hpp"

#if KMOE_ENABLE_MPI && KMOE_ENABLE_CUDA
#include <kmoe/comm/mpi_communicator.hpp>
#include <kmoe/core/cuda/check.hpp>
#if KMOE_ENABLE_NCCL
#include <kmoe/comm/nccl_communicator.hpp>
#endif

#include <Kokkos_Core.hpp>
#include <cuda_runtime_api.h>

namespace kmoe::cli {

std::unique_ptr<comm::Communicator> device_world(const std::string& choice) {
  KMOE_CHECK_USAGE(choice == "auto" || choice == "nccl" || choice == "mpi", "--comm '", choice,
                   "' is not one of auto, nccl, mpi");
  auto world = comm::MpiCommunicator::world();
  // Ranks per node against the node's GPUs: NCCL needs a GPU per rank.
  MPI_Comm node = MPI_COMM_NULL;
  KMOE_MPI_CHECK(MPI_Comm_split_type(world->native(), MPI_COMM_TYPE_SHARED, world->rank(), MPI_INFO_NULL, &node));
  const comm::MpiCommunicator node_comm(node, true);
  int devices = 0;
  KMOE_CUDA_CHECK(cudaGetDeviceCount(&devices));
  double crowded = node_comm.size() > devices ? 1.0 : 0.0;
  world->allreduce_sum_host(&crowded, 1);  // every rank makes the same choice
#if KMOE_ENABLE_NCCL
  const bool nccl = choice == "nccl" || (choice == "auto" && crowded == 0.0);
  if (nccl) {
    KMOE_CHECK_USAGE(crowded == 0.0, "--comm nccl: ", node_comm.size(), " ranks share ", devices,
                     " GPU(s) on a node; NCCL needs one GPU per rank (use --comm mpi)");
    const Kokkos::Cuda space;  // Kokkos' device and stream: the layers' work and NCCL's are then in one order
    return std::make_unique<comm::NcclCommunicator>(world->split_mpi(0, world->rank()), space.cuda_stream(),
                                                    space.cuda_device());
  }
#else
  KMOE_CHECK_USAGE(choice != "nccl", "--comm nccl needs a kmoe built with KMOE_ENABLE_NCCL=ON");
#endif
  return std::make_unique<comm::MpiCommunicator>(MPI_COMM_WORLD, false, comm::BufferMemory::device);
}

}  // namespace kmoe::cli
#endif
