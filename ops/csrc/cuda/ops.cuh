// Host entry points of the splitvl CUDA kernels, one per op of ../op_list.h (which
// also gives their schema), registered on torch.ops.splitvl by registration.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace splitvl::cuda {

#define SPLITVL_OP(name, schema, params) void name params;
#include "../op_list.h"
#undef SPLITVL_OP

}  // namespace splitvl::cuda
