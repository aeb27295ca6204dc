// A job in which one rank fails while the others wait in a collective: run_or_abort must take the job down with the
// failing rank's message instead of leaving the others hanging. Run by ctest under mpirun (see CMakeLists.txt).
#include <kmoe/comm/mpi_communicator.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  auto world = kmoe::comm::MpiCommunicator::world();
  const int failing = world->size() - 1;
  kmoe::comm::run_or_abort(*world, "abort_probe", [&] {
    if (world->rank() == failing) throw kmoe::InputError("injected failure on the last rank");
    world->barrier();  // never completes: the last rank does not come
  });
  MPI_Finalize();
  return 0;
}
