#!/usr/bin/env bash
# Issue 17 (embedding transfer by CUDA IPC) on one H200, in one device call; logs under $OUT.
#
#   bash bench/gpu_i17.sh                 # build test transfer
#   bash bench/gpu_i17.sh test transfer   # any steps, in the order given
#
# Steps (each under `timeout`, cut to what is left of I17_TOTAL_S, default 230 s):
#   build     JIT-build the splitvl extension (C++ + CUDA)
#   test      tests/deployments/test_gpu_embedding_ipc.py: two Ray actors on one GPU, the producer's
#             pool slot opened by CUDA IPC in the consumer, values equal, slots come back, stale refused
#   transfer  python -m bench.transfer: one 1024x1024 image of Qwen3-VL-8B, object store vs IPC (GB/s)
#   timeline-2b, timeline-8b  python -m bench.serve, one-gpu layout, concurrency 1,8,32,64: the serve tables
#             with the LLM replica's step timeline per level; JSON (raw step records) to $OUT/timeline-<model>.json.
#             One per device call: I17_TOTAL_S=560 bash bench/gpu_i17.sh build timeline-8b
#   serve-test  tests/deployments/test_gpu_serve.py -k qwen3_5: configs/qwen3.5-0.8b.yaml served (colocated), and
#             the same with llm.engine_process == in process (needs Ray Serve: the device Ray bundle)
#   process-08b, process-8b  python -m bench.serve, image chat c=64 (8b: c=1,64): the colocated ingress with the
#             engine in the replica vs in its own process (llm.engine_process), one command, same checkpoint
#   engine-gpu  the GPU tests of tests/engine and tests/models (CUDA graphs, async scheduling, the
#             high-priority step stream, bf16 parity)
#   vit-attn  python -m bench.vit_attention: the tower's attention, ours vs torch SDPA (flash, cuDNN, efficient)
#   budget-8b  8B image chat c=1,64, engine process, one run per llm.max_num_batched_tokens (512, 1024, 4096)
#   vision-8b  8B image chat c=1,64: colocated engine with the VisionEncoder deployment vs the tower in the
#             replica (vision.colocate_llm: its own stream, the engine's steps on a high-priority one)
#   vision-serve-test  tests/deployments/test_gpu_serve.py -k vision_in_the_llm (needs the Ray bundle)
#   split-8b  8B image chat c=64, engine process: mixed steps' attention split at the decode rows (default)
#             vs one varlen call (SPLITVL_SPLIT_MIXED_ATTENTION=0), one bench.serve run each; plus the
#             split's GPU test (tests/models/test_layers.py -k mixed)
#   ttft-2b   2B, one 1024px image, c=1, the vision deployment and the tower in the replica: where the TTFT
#             goes (the image level's breakdown table: emb wait vs vision ms, engine TTFT vs its step)
#   sm90-test  the wgmma attention kernel's GPU tests (with the old kernel's and PDL's)
#   ttft-prof  python -m bench.profile --ttft (2B, one 1024px image, in process): preprocess, tower, engine,
#             GPU busy vs wall, top kernels; wgmma attention on and off
#   vit-tower  python -m bench.vision --vit-attn splitvl sdpa auto: the 2B and 8B towers on our attention kernel
#             and torch's (SDPA's own choice, its flash backend / varlen_attn), transformers beside
#   vit-test  the towers' GPU parity tests on every attention backend (bf16 vs transformers and fp32)
#   sm90-bench  python -m bench.ops --ops varlen_attention --attn-sm90 on,off (both kernels, adjacent rows)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH=${PYTHONPATH:-$PWD}
TOTAL=${I17_TOTAL_S:-230}
START=$(date +%s)
declare -A BUDGET=([build]=150 [test]=90 [transfer]=90 [timeline-2b]=330 [timeline-8b]=400 [serve-test]=240
                   [process-08b]=300 [process-8b]=450 [engine-gpu]=200 [vit-attn]=60 [budget-8b]=560 [vision-8b]=590
                   [vision-serve-test]=300 [ttft-2b]=240 [split-8b]=420
                   [sm90-test]=120 [sm90-bench]=120 [ttft-prof]=150 [vit-tower]=200 [vit-test]=120)
CKPT=${BENCH_CKPT_CACHE:-/tmp/splitvl-bench-ckpt}  # random checkpoints, kept while the box is warm

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -m pytest -m gpu -x -q -p no:warnings tests/deployments/test_gpu_embedding_ipc.py ;;
    transfer) python -m bench.transfer --model qwen3-vl-8b --image-size 1024 --iters 20 ;;
    timeline-2b|timeline-8b) python -m bench.serve --model "qwen3-vl-${1#timeline-}" --layout one-gpu \
        --concurrency 1,8,32,64 --no-hf --ckpt-cache "$CKPT" --time-budget-s $(( $2 * 7 / 10 )) \
        --json "$OUT/$1.json" ;;
    serve-test) python -m pytest -m gpu -q -s -p no:warnings tests/deployments/test_gpu_serve.py -k qwen3_5 ;;
    process-08b) python -m bench.serve --model qwen3.5-0.8b --layout one-gpu-colocated one-gpu-colocated-process \
        --load-format dummy --no-hf --transfer-iters 3 --overhead-probes 30 --concurrency 64 --ramp-s 4 \
        --min-requests 256 --json "$OUT/$1.json" ;;
    process-8b) python -m bench.serve --model qwen3-vl-8b --layout one-gpu-colocated one-gpu-colocated-process \
        --load-format dummy --no-hf --transfer-iters 3 --overhead-probes 30 --concurrency 1,64 --ramp-s 4 \
        --min-requests 128 --json "$OUT/$1.json" ;;
    engine-gpu) python -m pytest -m gpu -q -p no:warnings tests/engine tests/models ;;
    vit-attn) python -m bench.vit_attention --json "$OUT/vit_attention.json" ;;
    budget-8b) python -m bench.serve --model qwen3-vl-8b --layout one-gpu-colocated-process --load-format dummy \
        --no-hf --transfer-iters 1 --overhead-probes 3 --concurrency 1,64 --ramp-s 4 --min-requests 16 \
        --step-tokens 512 1024 4096 --time-budget-s $(( $2 - 160 )) --json "$OUT/$1.json" ;;
    vision-8b) python -m bench.serve --model qwen3-vl-8b --layout one-gpu-colocated-vision one-gpu-colocated \
        one-gpu-colocated-vision-process \
        --load-format dummy --no-hf --transfer-iters 1 --overhead-probes 10 --concurrency 1,64 --ramp-s 4 \
        --min-requests 16 --json "$OUT/$1.json" ;;
    vision-serve-test) python -m pytest -m gpu -q -s -p no:warnings tests/deployments/test_gpu_serve.py \
        -k "vision_in_the_llm or vision_in_the_engine_process" ;;
    split-8b) python -m pytest -m gpu -q -p no:warnings tests/models/test_layers.py -k mixed || return 1
        for split in 1 0; do
          python -m bench.serve --model qwen3-vl-8b --layout one-gpu-colocated-process --load-format dummy --no-hf \
            --transfer-iters 1 --overhead-probes 1 --concurrency 64 --ramp-s 4 --min-requests 128 \
            --serve-env SPLITVL_SPLIT_MIXED_ATTENTION=$split --time-budget-s $(( ($2 - 20) / 2 )) \
            --json "$OUT/$1-$split.json" || return 1
        done ;;
    ttft-2b) python -m bench.serve --model qwen3-vl-2b --layout one-gpu-colocated one-gpu-colocated-vision \
        --load-format dummy --no-hf \
        --concurrency 1 --min-requests 24 --overhead-probes 10 --transfer-iters 1 --json "$OUT/$1.json" ;;
    sm90-test) python -m pytest -m gpu -q -p no:warnings tests/ops/test_attention_sm90.py tests/ops/test_attention.py \
        tests/ops/test_pdl.py ;;
    ttft-prof) python -m bench.profile --model qwen3-vl-2b --batches --images 0 --ttft \
        --ckpt-cache "$CKPT" --json "$OUT/ttft-prof.json" ;;
    vit-tower) python -m bench.vision --models qwen3-vl-2b qwen3-vl-8b --vit-attn splitvl sdpa auto \
        --ckpt-cache "$CKPT" --json "$OUT/vit-tower.json" ;;
    vit-test) python -m pytest -m gpu -q -p no:warnings tests/models/test_vision_parity.py ;;
    sm90-bench) python -m bench.ops --ops varlen_attention --attn-sm90 on,off --json "$OUT/sm90.json" ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build test transfer)
status=0
for step in "${STEPS[@]}"; do
  left=$(( TOTAL - ($(date +%s) - START) ))
  limit=${BUDGET[$step]:-60}
  (( limit > left )) && limit=$left
  if (( limit <= 5 )); then echo "== $step: skipped (no time left)"; status=1; continue; fi
  echo "== $step (limit ${limit}s)"
  timeout "$limit" bash -c "$(declare -f step_cmd); CKPT=$CKPT OUT=$OUT step_cmd $step $limit" 2>&1 | tee "$OUT/i17_$step.log"
  rc=${PIPESTATUS[0]}
  echo "== $step: rc=$rc"
  (( rc != 0 )) && status=1
done
exit $status
