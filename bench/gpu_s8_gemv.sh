#!/usr/bin/env bash
# Small-row dense linears (ops.linear_small / gate_up_silu_small) on one H200, in one device call;
# logs + JSON under $OUT.
#
#   bash bench/gpu_s8_gemv.sh build test ops     # kernels: GPU tests and bench rows vs cuBLAS
#   bash bench/gpu_s8_gemv.sh decode moe         # what they buy: 0.8B and 30B-A3B decode steps
#
# Steps (each under `timeout`, cut to what is left of GEMV_TOTAL_S, default 570 s):
#   build   JIT-build the splitvl extension (C++ + CUDA)
#   test    GPU tests: the ops vs their references (full-size decoder shapes, split-K clusters,
#           CUDA-graph capture), the layers at <= 16 rows == their F.linear path, the MoE
#           blocks at batch 1 vs transformers and graph == eager, MoE expert ops (shared
#           stream header), engine decode with CUDA graphs == eager == transformers
#   ops     bench/ops.py linear_small rows: M = 1, 4, 16 at the 0.8B / 30B-A3B / 8B shapes next
#           to F.linear (cuBLAS), % of copy over the weight bytes
#   decode  bench/decode.py Qwen3.5-0.8B batch 1 and 64 (random checkpoint cached in /tmp/ckpt)
#   moe     bench/moe.py: the 48-layer Qwen3-VL-30B-A3B built in GPU memory, batch 1 and 64
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
TOTAL=${GEMV_TOTAL_S:-570}
declare -A BUDGET=([build]=230 [test]=150 [ops]=150 [decode]=240 [moe]=300)

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -m pytest -m gpu -x -q tests/ops/test_linear_small.py tests/models/test_small_rows_gpu.py \
            tests/models/test_moe_gpu.py tests/ops/test_moe_experts.py tests/ops/test_op_table.py \
            "tests/engine/test_gpu.py::test_cuda_graph_decode_equals_eager_and_transformers" ;;
    ops) python bench/ops.py --ops linear_small --json "$OUT/ops_linear_small.json" ;;
    decode) python -m bench.decode --models qwen3.5-0.8b --batches 1,64 --no-hf --ckpt-cache /tmp/ckpt \
              --json "$OUT/decode_0.8b.json" ;;
    moe) python -m bench.moe --no-hf --json "$OUT/moe.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps gemv "build test ops" "$@"
