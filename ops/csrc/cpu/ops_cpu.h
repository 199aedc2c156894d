// CPU kernels of torch.ops.splitvl, one per op of ../op_list.h (which also gives
// their schema), registered by ops/csrc/torch_bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace splitvl::cpu {

#define SPLITVL_OP(name, schema, params) void name params;
#include "../op_list.h"
#undef SPLITVL_OP

}  // namespace splitvl::cpu
