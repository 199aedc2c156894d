// One-shot all-reduce over CUDA IPC for small rows (TP decode), without NCCL.
//
// Every rank owns one registered buffer (a uint8 CUDA tensor, see
// models/layers/custom_allreduce.py) that its peers map through CUDA IPC:
//   [0, 1024)          uint32 flags[kMaxBlocks][kMaxRanks]: flags[b][r] = the last call
//                      number block b of rank r announced to this rank;
//   [1024, 1152)       uint32 calls[kMaxBlocks]: how many calls block b of this rank has
//                      finished (only this rank touches it);
//   [kDataOffset, ...) two data slots of `slot_bytes` each.
// Call k of block b: copy its packs of x into slot k % 2 of its own buffer, announce k to
// every rank (release, system scope), wait until every rank announced >= k (acquire), then
// sum its packs of every rank's slot k % 2 in rank order into x. A pack p always belongs to
// block (p / kThreads) % kMaxBlocks (the grid stride is fixed), so blocks are independent
// whatever the sizes of consecutive calls. Two slots make one barrier per call enough: a
// rank writes slot k % 2 again at call k + 2, after it saw every peer announce k + 1,
// which each peer does after its reads of call k. The call counter lives in device memory
// and is advanced by the kernel, so CUDA-graph replays count like eager calls.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime.h>

#include "common.cuh"
#include "ops.cuh"

namespace splitvl::cuda {
namespace {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 32;
constexpr int kThreads = 512;
constexpr int64_t kCallsOffset = int64_t(kMaxBlocks) * kMaxRanks * 4;
constexpr int64_t kDataOffset = 4096;
constexpr int64_t kHandleBytes = sizeof(cudaIpcMemHandle_t) + sizeof(int64_t);

static_assert(kCallsOffset + kMaxBlocks * 4 <= kDataOffset, "signal area overflows");

struct RankBuffers {
  char* base[kMaxRanks];
};

__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// grid min(kMaxBlocks, packs / kThreads rounded up), kThreads threads; x [packs] of 16 bytes.
template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
    one_shot_kernel(T* __restrict__ x, int64_t packs, RankBuffers bufs, int rank, int64_t slot_bytes) {
  constexpr int V = kPack16<T>;
  using P = Pack<T, V>;
  char* own = bufs.base[rank];
  uint32_t* calls = reinterpret_cast<uint32_t*>(own + kCallsOffset) + blockIdx.x;
  const uint32_t call = *calls + 1;
  const int64_t slot = kDataOffset + (call & 1) * slot_bytes;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(kMaxBlocks) * kThreads;
  P* xp = reinterpret_cast<P*>(x);
  P* mine = reinterpret_cast<P*>(own + slot);
  for (int64_t p = first; p < packs; p += stride) mine[p] = xp[p];
  __syncthreads();
  if (threadIdx.x < W) {
    const int peer = threadIdx.x;
    __threadfence_system();  // this block's copies, seen through the barrier, before the flag
    store_release_sys(reinterpret_cast<uint32_t*>(bufs.base[peer]) + blockIdx.x * kMaxRanks + rank, call);
    const uint32_t* flag = reinterpret_cast<const uint32_t*>(own) + blockIdx.x * kMaxRanks + peer;
    // Signed difference: a peer may already announce call + 1, and the counters wrap.
    while (static_cast<int32_t>(load_acquire_sys(flag) - call) < 0) {
    }
  }
  __syncthreads();
  for (int64_t p = first; p < packs; p += stride) {
    P v[W];
#pragma unroll
    for (int r = 0; r < W; ++r) v[r] = reinterpret_cast<const P*>(bufs.base[r] + slot)[p];
    P out;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float acc = to_float(v[0].v[e]);
#pragma unroll
      for (int r = 1; r < W; ++r) acc += to_float(v[r].v[e]);
      out.v[e] = from_float<T>(acc);
    }
    xp[p] = out;
  }
  if (threadIdx.x == 0) *calls = call;
}

template <typename T>
void launch(T* x, int64_t packs, const RankBuffers& bufs, int world, int rank, int64_t slot_bytes,
            cudaStream_t stream) {
  const int blocks = static_cast<int>(std::min<int64_t>(kMaxBlocks, (packs + kThreads - 1) / kThreads));
#define SPLITVL_AR_CASE(N) \
  case N:                  \
    one_shot_kernel<T, N><<<blocks, kThreads, 0, stream>>>(x, packs, bufs, rank, slot_bytes); \
    break;
  switch (world) {
    SPLITVL_AR_CASE(2)
    SPLITVL_AR_CASE(3)
    SPLITVL_AR_CASE(4)
    SPLITVL_AR_CASE(5)
    SPLITVL_AR_CASE(6)
    SPLITVL_AR_CASE(7)
    SPLITVL_AR_CASE(8)
    default:
      SPLITVL_CHECK(false, "custom_all_reduce: world size ", world, " not in [2, 8]");
  }
#undef SPLITVL_AR_CASE
}

void check_buffer(const at::Tensor& buffer, const char* op) {
  check_cuda(buffer, op, "buffer");
  SPLITVL_CHECK(buffer.scalar_type() == at::kByte && buffer.dim() == 1 && buffer.is_contiguous() &&
                    buffer.numel() > kDataOffset && (buffer.numel() - kDataOffset) % 32 == 0 &&
                    is_aligned16(buffer.data_ptr()),
                op, ": buffer must be a contiguous, 16-byte aligned uint8 [", kDataOffset,
                " + 2 * slot bytes] CUDA tensor (slot bytes a multiple of 16), got ", buffer.sizes());
}

void check_host(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  SPLITVL_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), op, ": ", name,
                " must be a contiguous CPU tensor of ", dtype);
}

}  // namespace

void custom_ar_export(at::Tensor& handle, const at::Tensor& buffer) {
  constexpr const char* op = "custom_ar_export";
  check_buffer(buffer, op);
  check_host(handle, at::kByte, op, "handle");
  SPLITVL_CHECK(handle.numel() == kHandleBytes, op, ": handle must hold ", kHandleBytes, " bytes");
  const c10::cuda::CUDAGuard guard(buffer.device());
  size_t base_size = 0;
  // The handle names the caching allocator's whole segment; the peer adds the offset.
  void* base = c10::cuda::CUDACachingAllocator::getBaseAllocation(buffer.data_ptr(), &base_size);
  cudaIpcMemHandle_t ipc;
  C10_CUDA_CHECK(cudaIpcGetMemHandle(&ipc, base));
  const int64_t offset = static_cast<char*>(buffer.data_ptr()) - static_cast<char*>(base);
  auto* out = handle.data_ptr<uint8_t>();
  std::memcpy(out, &ipc, sizeof(ipc));
  std::memcpy(out + sizeof(ipc), &offset, sizeof(offset));
}

void custom_ar_open(at::Tensor& rank_ptrs, const at::Tensor& handles, const at::Tensor& buffer,
                    int64_t rank) {
  constexpr const char* op = "custom_ar_open";
  check_buffer(buffer, op);
  check_host(rank_ptrs, at::kLong, op, "rank_ptrs");
  check_host(handles, at::kByte, op, "handles");
  const int64_t world = handles.dim() == 2 ? handles.size(0) : 0;
  SPLITVL_CHECK(world >= 2 && world <= kMaxRanks && handles.size(1) == kHandleBytes, op,
                ": handles must be [world in 2..8, ", kHandleBytes, "], got ", handles.sizes());
  SPLITVL_CHECK(rank_ptrs.dim() == 2 && rank_ptrs.size(0) == world && rank_ptrs.size(1) == 2, op,
                ": rank_ptrs must be [world, 2]");
  SPLITVL_CHECK(rank >= 0 && rank < world, op, ": rank ", rank, " out of range");
  const c10::cuda::CUDAGuard guard(buffer.device());
  auto* ptrs = rank_ptrs.data_ptr<int64_t>();
  const auto* h = handles.data_ptr<uint8_t>();
  for (int64_t r = 0; r < world; ++r) {
    if (r == rank) {  // column 1: the mapping to close (none for this rank's own buffer)
      ptrs[2 * r] = reinterpret_cast<int64_t>(buffer.data_ptr());
      ptrs[2 * r + 1] = 0;
      continue;
    }
    cudaIpcMemHandle_t ipc;
    int64_t offset = 0;
    std::memcpy(&ipc, h + r * kHandleBytes, sizeof(ipc));
    std::memcpy(&offset, h + r * kHandleBytes + sizeof(ipc), sizeof(offset));
    void* mapped = nullptr;
    C10_CUDA_CHECK(cudaIpcOpenMemHandle(&mapped, ipc, cudaIpcMemLazyEnablePeerAccess));
    ptrs[2 * r] = reinterpret_cast<int64_t>(static_cast<char*>(mapped) + offset);
    ptrs[2 * r + 1] = reinterpret_cast<int64_t>(mapped);
  }
}

void custom_ar_close(const at::Tensor& rank_ptrs, const at::Tensor& buffer) {
  constexpr const char* op = "custom_ar_close";
  check_buffer(buffer, op);
  check_host(rank_ptrs, at::kLong, op, "rank_ptrs");
  const c10::cuda::CUDAGuard guard(buffer.device());
  const auto* ptrs = rank_ptrs.data_ptr<int64_t>();
  for (int64_t r = 0; r < rank_ptrs.size(0); ++r)
    if (ptrs[2 * r + 1] != 0) C10_CUDA_CHECK(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptrs[2 * r + 1])));
}

void custom_all_reduce(at::Tensor& x, const at::Tensor& buffer, at::IntArrayRef rank_ptrs, int64_t rank) {
  constexpr const char* op = "custom_all_reduce";
  check_buffer(buffer, op);
  check_cuda_tensors(op, "x", x, buffer);
  const int64_t world = static_cast<int64_t>(rank_ptrs.size());
  SPLITVL_CHECK(world >= 2 && world <= kMaxRanks, op, ": world size ", world, " not in [2, 8]");
  SPLITVL_CHECK(rank >= 0 && rank < world && rank_ptrs[rank] == reinterpret_cast<int64_t>(buffer.data_ptr()),
                op, ": rank_ptrs[rank] must be this rank's buffer");
  SPLITVL_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
                ": x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t bytes = x.numel() * x.element_size();
  const int64_t slot_bytes = (buffer.numel() - kDataOffset) / 2;
  SPLITVL_CHECK(x.is_contiguous() && is_aligned16(x.data_ptr()) && bytes % 16 == 0, op,
                ": x must be contiguous, 16-byte aligned, a multiple of 16 bytes");
  SPLITVL_CHECK(bytes <= slot_bytes, op, ": ", bytes, " bytes exceed the slot's ", slot_bytes);
  if (bytes == 0) return;
  RankBuffers bufs{};
  for (int64_t r = 0; r < world; ++r) bufs.base[r] = reinterpret_cast<char*>(rank_ptrs[r]);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t packs = bytes / 16;
  if (x.scalar_type() == at::kBFloat16)
    launch(reinterpret_cast<__nv_bfloat16*>(x.data_ptr()), packs, bufs, world, rank, slot_bytes, stream);
  else
    launch(reinterpret_cast<__half*>(x.data_ptr()), packs, bufs, world, rank, slot_bytes, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace splitvl::cuda
