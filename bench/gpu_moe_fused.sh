#!/usr/bin/env bash
# The fused MoE decode ops (moe_gate_route, moe_combine_add_rms_norm) on one H200, in one device call;
# logs + JSON under $OUT.
#
#   bash bench/gpu_moe_fused.sh                 # build test graph ops moe
#   bash bench/gpu_moe_fused.sh test graph      # any steps, in the order given
#
# Steps (each under `timeout`, cut to what is left of MOEFUSED_TOTAL_S, default 420 s):
#   build  JIT-build the splitvl extension (C++ + CUDA)
#   test   GPU op tests of both fused ops (and moe_align / moe_route, whose device code they share), every op
#          has a CUDA kernel, the tiny Qwen3-VL-MoE fused == unfused in bf16 and a fused decode step's CUDA
#          graph == eager
#   graph  the engine's CUDA-graph decode == eager for Qwen3-VL-MoE with SPLITVL_MOE_FUSED_DECODE=1
#   ops    bench/ops.py moe_decode: both fused ops vs the two-op chains they replace, T = 1, 4, 16
#   moe    bench/moe.py: the full 48-layer Qwen3-VL-30B-A3B in GPU memory, decode batch 1, fused path on and off
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
TOTAL=${MOEFUSED_TOTAL_S:-420}
declare -A BUDGET=([build]=200 [test]=90 [graph]=120 [ops]=40 [moe]=180)

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -m pytest -m gpu -x -q tests/ops/test_moe_fused.py tests/models/test_moe_fused_decode.py \
            tests/ops/test_op_table.py "tests/ops/test_moe_experts.py::test_moe_align_matches_reference" \
            "tests/ops/test_moe_experts.py::test_moe_route_matches_topk_then_align" ;;
    graph) SPLITVL_MOE_FUSED_DECODE=1 python -m pytest -m gpu -x -q tests/engine/test_gpu_graphs.py -k qwen3_vl_moe ;;
    ops) python -m bench.ops --ops moe_decode --json "$OUT/ops_moe_decode.json" ;;
    moe) python -m bench.moe --batches 1 --no-hf --moe-fused on,off --json "$OUT/moe_fused.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps moefused "build test graph ops moe" "$@"
