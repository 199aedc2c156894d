// prefetch_l2 on the CPU (semantics: ops/reference.py): a hint for a GPU's L2, nothing to do here.
#include "ops_cpu.h"

namespace splitvl::cpu {

void prefetch_l2(const at::Tensor& weight) { (void)weight; }

}  // namespace splitvl::cpu
