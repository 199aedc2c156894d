#!/usr/bin/env bash
# Issue 19 (graph-captured hybrid decode) on one H200, in one device call; logs + JSON under $OUT.
#
#   bash bench/gpu_i19_graph.sh                 # build test decode
#   bash bench/gpu_i19_graph.sh decode          # any steps, in the order given
#
# Steps (each under `timeout`, cut to what is left of I19_TOTAL_S, default 290 s):
#   build   JIT-build the splitvl extension (C++ + CUDA)
#   test    GPU tests: CUDA-graph decode == eager for Qwen3.5 dense, Qwen3.5-MoE and Qwen3-VL-MoE tiny
#           checkpoints (bf16 step by step with caches and state pools, fp32 end to end), and the dense
#           graph test (graph == eager == transformers)
#   decode  bench/decode.py on the Qwen3.5-0.8B shape (configs/models/qwen3.5-0.8b.json), batch 1 and 64,
#           with transformers; the JSON row says whether CUDA graphs ran (cuda_graphs)
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
TOTAL=${I19_TOTAL_S:-290}
declare -A BUDGET=([build]=180 [test]=120 [decode]=160)

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -m pytest -m gpu -x -q -s tests/engine/test_gpu_graphs.py \
            "tests/engine/test_gpu.py::test_cuda_graph_decode_equals_eager_and_transformers" ;;
    decode) python -m bench.decode --models qwen3.5-0.8b --batches 1,64 --json "$OUT/decode_qwen3.5-0.8b.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps i19-graph "build test decode" "$@"
