// Programmatic dependent launch (PDL, compute capability >= 9.0): a kernel launched by
// launch_pdl may start while the kernel before it in the stream is still running, so its
// launch, its prologue and its first weight loads overlap that kernel's tail.
//
// Correctness rule of every kernel launched this way: it calls pdl_wait() before it reads
// anything an earlier kernel may write (activations, KV cache, states, routing, indices) and
// before it writes anything an earlier kernel may still read. Before the wait it may only
// compute indices and read read-only inputs: weights, biases, norm weights (parameters no
// kernel of the step writes). griddepcontrol.wait returns once the prerequisite grid has
// completed and its memory is flushed, so where pdl_launch_dependents() is placed only changes
// scheduling, never results. A kernel launched without the attribute (PDL off, an older GPU,
// or after a kernel that never triggers) finds the wait already satisfied.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include <utility>

#include "../pdl.h"

namespace splitvl {

// Blocks until the grids this one depends on have completed and their writes are visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel of the stream be scheduled once every block of this grid has called it
// (or exited). Called after pdl_wait, so at most two grids of a chain are resident at once.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Whether launches now carry the PDL attribute: the switch is on and the current device has
// griddepcontrol (the kernels are built with the wait only for sm_90 and newer).
inline bool pdl_active() {
  return pdl_enabled() && at::cuda::getCurrentDeviceProperties()->major >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...) in thread-block clusters of cluster_x CTAs
// along x (1: no clusters), with programmatic stream serialization when pdl_active(). The
// kernel must follow the rule above.
template <typename... Params, typename... Args>
void launch_pdl_cluster(unsigned cluster_x, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (cluster_x > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = cluster_x;
    attributes[count].val.clusterDim.y = 1;
    attributes[count].val.clusterDim.z = 1;
    ++count;
  }
  if (pdl_active()) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL when pdl_active().
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  launch_pdl_cluster(1, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace splitvl
