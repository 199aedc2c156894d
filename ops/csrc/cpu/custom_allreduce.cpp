// The custom all-reduce ops exist only on CUDA (peers' buffers mapped through CUDA IPC);
// on CPU they raise, and models/layers/custom_allreduce.py never calls them there.
#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {
namespace {

void cuda_only(const char* op) {
  SPLITVL_CHECK(false, op, ": CUDA only (a CUDA IPC all-reduce); use torch.distributed on CPU");
}

}  // namespace

void custom_ar_export(at::Tensor&, const at::Tensor&) { cuda_only("custom_ar_export"); }

void custom_ar_open(at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t) {
  cuda_only("custom_ar_open");
}

void custom_ar_close(const at::Tensor&, const at::Tensor&) { cuda_only("custom_ar_close"); }

void custom_all_reduce(at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t) {
  cuda_only("custom_all_reduce");
}

}  // namespace splitvl::cpu
