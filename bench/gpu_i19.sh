#!/usr/bin/env bash
# Issue 19 kernels on one GPU in one device call: build the extension, the GPU tests of the
# linear-attention ops, then bench/ops.py's causal conv1d, gated delta rule (incl. one
# 4,096-token sequence at the 0.8B shape), gated RMSNorm and fused decode-step rows with % of copy bandwidth.
# Logs and JSON under $OUT. About 4-5 minutes on an H200 (most of it the build).
#
#   bash bench/gpu_i19.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
status=0

timeout 270 python -m ops.build > "$OUT/i19-build.log" 2>&1 || { status=1; tail -30 "$OUT/i19-build.log"; }
tail -3 "$OUT/i19-build.log"

timeout 150 python -m pytest -m gpu -q tests/ops/test_linear_attn.py tests/ops/test_gdn_decode.py -p no:cacheprovider \
  > "$OUT/i19-tests.log" 2>&1 || status=1
grep -E "passed|failed|error" "$OUT/i19-tests.log" | tail -25

timeout 120 python bench/ops.py --ops causal_conv1d gated_delta_rule gated_rms_norm gated_delta_net_decode \
  --json "$OUT/i19-ops.json" > "$OUT/i19-ops.log" 2>&1 || status=1
tail -40 "$OUT/i19-ops.log"
exit $status
