// Registers the CUDA kernels on the splitvl library, one per op of ../op_list.h
// (schemas: torch_bindings.cpp).
#include <torch/library.h>

#include "ops.cuh"

TORCH_LIBRARY_IMPL(splitvl, CUDA, m) {
#define SPLITVL_OP(name, schema, params) m.impl(#name, &splitvl::cuda::name);
#include "../op_list.h"
#undef SPLITVL_OP
}
