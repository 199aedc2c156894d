// The splitvl op library: every op's schema and its CPU kernel, both from the one
// op list in op_list.h. The CUDA kernels register in cuda/registration.cu.
#include <torch/library.h>

#include "cpu/ops_cpu.h"

TORCH_LIBRARY(splitvl, m) {
#define SPLITVL_OP(name, schema, params) m.def(#name "(" schema ") -> ()");
#include "op_list.h"
#undef SPLITVL_OP
}

TORCH_LIBRARY_IMPL(splitvl, CPU, m) {
#define SPLITVL_OP(name, schema, params) m.impl(#name, &splitvl::cpu::name);
#include "op_list.h"
#undef SPLITVL_OP
}
