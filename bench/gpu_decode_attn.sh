#!/usr/bin/env bash
# Decode attention, conv1d and norm kernels on one H200, in one device call; logs + JSON under $OUT.
#
#   bash bench/gpu_decode_attn.sh            # build test ops
#   bash bench/gpu_decode_attn.sh ops        # any steps, in the order given
#
# Steps (each under `timeout`, cut to what is left of ATTN_TOTAL_S, default 540 s):
#   build  JIT-build the splitvl extension (C++ + CUDA)
#   test   GPU tests of paged_attention_decode (GQA groups 1-8, D 64-256, partitions), the norms,
#          gated RMSNorm and the causal conv1d kernels against their references
#   ops    bench/ops.py rows with % of copy: paged decode at the 2B/8B/30B-A3B/0.8B attention shapes,
#          conv1d, gated and plain RMSNorm, the 0.8B decode fusions (the fp32-weight norm)
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
TOTAL=${ATTN_TOTAL_S:-540}
declare -A BUDGET=([build]=300 [test]=150 [ops]=150)

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_attention.py tests/ops/test_norm.py \
            tests/ops/test_gated_rms_norm.py tests/ops/test_linear_attn.py ;;
    ops) python bench/ops.py --ops paged_attention_decode causal_conv1d gated_rms_norm rms_norm qwen3_5_fusions \
           --json "$OUT/ops_attn.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps attn "build test ops" "$@"
