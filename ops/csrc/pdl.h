// The process's programmatic-dependent-launch switch (host side; the device helpers and the
// launcher are in cuda/pdl.cuh). Read once from SPLITVL_PDL (0 disables; default on), set at
// run time through torch.ops.splitvl_launch.set_pdl (ops.set_programmatic_launch). Kernels
// launched after a change use the new value, so CUDA graphs keep what they were captured with.
#pragma once

namespace splitvl {

bool pdl_enabled();
void set_pdl_enabled(bool enabled);

}  // namespace splitvl
