#!/usr/bin/env bash
# MoE expert GEMMs at prefill sizes (64- and 128-row blocks) on one H200, in one device call;
# logs + JSON under $OUT.
#
#   bash bench/gpu_s8_moepf.sh                   # build test ops
#   bash bench/gpu_s8_moepf.sh ops               # bench rows only (extension already built)
#
# Steps (each under `timeout`, cut to what is left of MOEPF_TOTAL_S, default 570 s):
#   build   JIT-build the splitvl extension (C++ + CUDA)
#   test    GPU tests: MoE expert ops vs their references (odd sizes, 64/128-row blocks with an
#           empty expert, the 30B-A3B shapes at T = 1 ... 4096, CUDA-graph capture), the router,
#           the MoE blocks vs transformers
#   ops     bench/ops.py moe_experts: the chain and gate_up / down alone at T = 1 ... 4096,
#           TFLOP/s and % of the matmul rate
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
TOTAL=${MOEPF_TOTAL_S:-570}
declare -A BUDGET=([build]=260 [test]=200 [ops]=120)

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -m pytest -m gpu -q tests/ops/test_moe_experts.py tests/ops/test_moe.py \
            tests/models/test_moe_gpu.py ;;
    ops) python bench/ops.py --ops moe_experts --json "$OUT/ops_moe_experts.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps moepf "build test ops" "$@"
