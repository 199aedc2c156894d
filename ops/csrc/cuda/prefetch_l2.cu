// prefetch_l2 (semantics: ops/reference.py): one CTA of one warp per SM splits the first
// min(bytes, L2 / 2) bytes of a weight into equal 16-byte multiples and asks L2 for them with
// bulk prefetches, which no one waits for. Launched with PDL (pdl.cuh) between two kernels of a
// decode step: it reads nothing a kernel writes, so it issues its prefetches before the wait and
// lets the next kernel launch at once; the wait before it exits keeps the chain's order (the next
// kernel's griddepcontrol.wait then also covers the kernel before this one).
#include "../l2_prefetch.h"
#include "common.cuh"
#include "l2_cache.cuh"
#include "ops.cuh"
#include "pdl.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kPrefetchThreads = 32;

__global__ void __launch_bounds__(kPrefetchThreads) prefetch_l2_kernel(const char* base, int64_t bytes,
                                                                       int64_t piece) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x * piece;
  for (int64_t off = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * piece; off < bytes; off += stride)
    l2_prefetch_bytes(base + off, unsigned(min(piece, bytes - off)));
  pdl_launch_dependents();
  pdl_wait();
}

}  // namespace

void prefetch_l2(const at::Tensor& weight) {
  check_cuda(weight, "prefetch_l2", "weight");
  if (!l2_prefetch_enabled() || !weight.is_contiguous() || !is_aligned16(weight.data_ptr())) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(weight.get_device());
  const int64_t bytes = std::min<int64_t>(weight.numel() * weight.element_size(), prop->l2CacheSize / 2) / 16 * 16;
  if (bytes == 0) return;
  const int64_t threads = int64_t(prop->multiProcessorCount) * kPrefetchThreads;
  const int64_t piece = (bytes + threads * 16 - 1) / (threads * 16) * 16;
  const int grid = static_cast<int>(std::min<int64_t>(prop->multiProcessorCount, (bytes + piece * kPrefetchThreads - 1) /
                                                                                    (piece * kPrefetchThreads)));
  launch_pdl(prefetch_l2_kernel, dim3(grid), dim3(kPrefetchThreads), 0, at::cuda::getCurrentCUDAStream(),
             static_cast<const char*>(weight.data_ptr()), bytes, piece);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
