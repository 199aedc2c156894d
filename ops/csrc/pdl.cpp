// The programmatic-dependent-launch switch (pdl.h). It lives in the C++ sources, built with or
// without CUDA, so Python can always set it; CPU kernels ignore it. The launch settings have a
// namespace of their own: they are not ops with a reference (torch.ops.splitvl lists ops only).
#include "pdl.h"

#include <torch/library.h>

#include "launch_switch.h"

TORCH_LIBRARY(splitvl_launch, m) {}  // every switch adds its pair (SPLITVL_LAUNCH_SWITCH)

// On unless SPLITVL_PDL=0 (a bisecting switch: the results are the same either way, which
// tests/ops/test_pdl.py and tests/engine/test_gpu_graphs.py check on the GPU).
SPLITVL_LAUNCH_SWITCH(pdl, "SPLITVL_PDL", true)
