#!/usr/bin/env bash
# Issue 19 on one H200, in one device call; logs + JSON under $OUT.
#
#   bash bench/gpu_i19.sh                 # build test ops (about 4-5 minutes, most of it the build)
#   bash bench/gpu_i19.sh serve           # any steps, in the order given
#
# Steps (each under `timeout`, cut to what is left of I19_TOTAL_S, default 540 s):
#   build  JIT-build the splitvl extension (C++ + CUDA)
#   test   GPU tests of the linear-attention ops
#   ops    bench/ops.py: causal conv1d, gated delta rule (incl. one 4,096-token sequence at the 0.8B shape),
#          gated RMSNorm, fused decode-step and Qwen3.5 fusion rows with % of copy bandwidth; the chunked
#          delta rule's time per kernel (bench/gdn_kernels.py)
#   decode bench/decode.py: Qwen3.5-0.8B batch 1 and 64 with programmatic dependent launch on and off,
#          transformers in the same run
#   pdl    GPU tests of programmatic dependent launch (op chains, graph decode with it on == off)
#   serve  bench/serve.py: Qwen3.5-0.8B image chat over HTTP on the one-gpu layout, c = 1 and 64, random
#          weights made in the replicas (--load-format dummy); its own call:
#          I19_TOTAL_S=560 bash bench/gpu_i19.sh build serve
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
TOTAL=${I19_TOTAL_S:-540}
declare -A BUDGET=([build]=270 [test]=180 [ops]=150 [decode]=180 [pdl]=200 [serve]=420)

step_cmd() {
  case $1 in
    build) python -m ops.build ;;
    test) python -m pytest -m gpu -q tests/ops/test_linear_attn.py tests/ops/test_gdn_chunked_algorithm.py \
            tests/ops/test_gdn_chunked_serving.py tests/ops/test_gdn_decode.py tests/ops/test_gated_rms_norm.py tests/ops/test_activation.py -p no:cacheprovider ;;
    ops) python bench/ops.py --ops causal_conv1d gated_delta_rule gated_rms_norm gated_delta_net_decode \
           qwen3_5_fusions --json "$OUT/i19-ops.json" && python -m bench.gdn_kernels ;;
    decode) python -m bench.decode --models qwen3.5-0.8b --batches 1,64 --pdl on,off --ckpt-cache /tmp/ckpt \
              --json "$OUT/decode-0.8b.json" ;;
    pdl) python -m pytest -m gpu -x -q tests/ops/test_pdl.py tests/engine/test_gpu_graphs.py -p no:cacheprovider ;;
    serve) python -m bench.serve --model qwen3.5-0.8b --layout one-gpu --load-format dummy --concurrency 1,64 \
             --no-hf --time-budget-s 240 --json "$OUT/serve-qwen3.5-0.8b.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps i19 "build test ops" "$@"
