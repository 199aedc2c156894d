#!/usr/bin/env bash
# Issue 15 (TP=2 decode: the one-shot CUDA IPC all-reduce) on two H200s (nvidia-h200-x2), logs + JSON under $OUT.
#
#   bash bench/gpu_i15.sh                 # build test tp
#   bash bench/gpu_i15.sh tp              # any steps, in the order given
#
# Steps (each under `timeout`, cut to what is left of I15_TOTAL_S, default 570 s):
#   build  JIT-build the splitvl extension (C++ + CUDA)
#   test   GPU tests: the one-shot all-reduce vs an fp32 rank-order sum and vs NCCL (sizes up to the
#          512 KB slot, bf16/fp16, 300 back-to-back calls, a CUDA graph with two all-reduces replayed 100
#          times), every op has a CUDA kernel, engine TP=2 == TP=1 over NCCL and custom all-reduce ==
#          NCCL greedy tokens (bf16, CUDA graphs)
#   tp     bench/decode.py: Qwen3-VL-8B (random weights) decode at batch 1 and 64, TP=1, TP=2 over NCCL
#          and TP=2 with the custom all-reduce (vs TP1 column)
#   serve  (needs the Ray bundle) `serve run configs/qwen3-vl-8b-tp2.yaml` on the two GPUs: image chats, a TP
#          worker killed under load, the replica replaced (tests/deployments/test_gpu_serve.py -k tp2)
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc., set on the device machine; exported here too).
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TOTAL=${I15_TOTAL_S:-570}
declare -A BUDGET=([build]=240 [test]=240 [tp]=480 [serve]=560)

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -c "import torch; n = torch.cuda.device_count(); assert n >= 2, f'{n} GPU(s): needs nvidia-h200-x2'" &&
          python -m pytest -m gpu -q -rs tests/models/test_custom_allreduce_gpu.py tests/ops/test_op_table.py \
            tests/engine/test_tp.py ;;
    tp) python -m bench.decode --models qwen3-vl-8b --tp 1,2 --batches 1,64 --custom-ar both --no-hf \
          --ckpt-cache /tmp/ckpt --json "$OUT/decode-tp2.json" ;;
    serve) python -m pytest -m gpu -q -s -rs tests/deployments/test_gpu_serve.py -k tp2 ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps i15 "build test tp" "$@"
