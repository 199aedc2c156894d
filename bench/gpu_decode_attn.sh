#!/usr/bin/env bash
# Decode attention, conv1d and norm kernels on one GPU in one device call: build the extension,
# the GPU tests of those ops, then bench/ops.py's rows with % of copy bandwidth (paged decode at
# the 2B/8B/30B-A3B/0.8B attention shapes, conv1d, gated and plain RMSNorm, the 0.8B fusions).
# Logs and JSON under $OUT. About 5-6 minutes on an H200 (most of it the build).
#
#   bash bench/gpu_decode_attn.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
status=0

timeout 300 python -m ops.build > "$OUT/attn-build.log" 2>&1 || { status=1; tail -30 "$OUT/attn-build.log"; }
tail -3 "$OUT/attn-build.log"

timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_attention.py tests/ops/test_norm.py \
  tests/ops/test_gated_rms_norm.py tests/ops/test_linear_attn.py > "$OUT/attn-tests.log" 2>&1 || status=1
grep -E "passed|failed|error|FAILED" "$OUT/attn-tests.log" | tail -25

timeout 200 python bench/ops.py --ops paged_attention_decode causal_conv1d gated_rms_norm rms_norm qwen3_5_fusions \
  --json "$OUT/attn-ops.json" > "$OUT/attn-ops.log" 2>&1 || status=1
tail -80 "$OUT/attn-ops.log"
exit $status
