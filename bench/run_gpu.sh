#!/usr/bin/env bash
# Issue 7's benchmarks on a GPU box, in one device call per part; logs + JSON under $OUT.
#
#   bash bench/run_gpu.sh single     # 1 GPU:  build ops vision decode serve-2b
#   bash bench/run_gpu.sh dual       # 2 GPUs: build serve tp
#   bash bench/run_gpu.sh tp serve   # any steps, in the order given
#
# Steps:
#   build     JIT-build the splitvl extension (C++ + CUDA) once; later steps and Ray replicas reuse it
#   ops       bench/ops.py, every op family vs copy bandwidth / matmul rate
#   vision    bench/vision.py, 2B and 8B towers vs transformers vs the compute floor
#   decode    bench/decode.py, 2B and 8B, batch 1/8/32/64, vs transformers generate vs the weight-read floor
#   serve-2b  bench/serve.py, 2B, one-gpu layout, concurrency 1: HTTP TTFT vs transformers in-process
#   serve     bench/serve.py, 8B, one-gpu and split layouts (split needs 2 GPUs), concurrency 1,8,32,64
#   tp        bench/decode.py, 8B, batch 1, TP=1 vs TP=2 (2 GPUs, NCCL)
#
# On the device, Ray comes from the bundle; prepend:
#   bash .device/ray/install.sh && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
# Each step runs under `timeout` with its budget (seconds, BUDGET_<STEP> overrides), cut to what is left
# of BENCH_TOTAL_S (default 540: the device's 10 minutes less the Ray install and the copy back).
# A step that no longer fits is skipped and named at the end, to run in the next call.
# BENCH_TP_HF=1 adds transformers' batch-1 decode to the tp step (decode has it already).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export SPLITVL_OPS_BUILD_DIR=${SPLITVL_OPS_BUILD_DIR:-$PWD/build/ops}  # ignored; kept while the box is warm
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
CKPT=${BENCH_CKPT_CACHE:-/tmp/splitvl-bench-ckpt}  # random checkpoints, shared by the steps of one call
TOTAL=${BENCH_TOTAL_S:-540}
START=$(date +%s)

declare -A BUDGET=([build]=300 [ops]=90 [vision]=150 [decode]=270 [serve-2b]=150 [serve]=360 [tp]=150)
declare -A NEEDS_GPUS=([build]=1 [ops]=1 [vision]=1 [decode]=1 [serve-2b]=1 [serve]=2 [tp]=2)

step_cmd() {  # $1 = step, $2 = seconds it may take (serve's soft budget)
  case $1 in
    build) echo python -c "'import ops; assert ops.extension_available(), ops.fallback_reason(); print(\"extension ok\")'" ;;
    ops) echo python -m bench.ops --json "$OUT/ops.json" ;;
    vision) echo python -m bench.vision --ckpt-cache "$CKPT" --json "$OUT/vision.json" ;;
    decode) echo python -m bench.decode --ckpt-cache "$CKPT" --json "$OUT/decode.json" ;;
    serve-2b) echo python -m bench.serve --model qwen3-vl-2b --layout one-gpu --concurrency 1 --min-requests 16 \
                --ckpt-cache "$CKPT" --time-budget-s $(( $2 * 6 / 10 )) --json "$OUT/serve-2b.json" ;;
    serve) echo python -m bench.serve --model qwen3-vl-8b --layout one-gpu split --concurrency 1,8,32,64 \
             --ckpt-cache "$CKPT" --time-budget-s $(( $2 * 7 / 10 )) --json "$OUT/serve-8b.json" ;;
    tp) echo python -m bench.decode --models qwen3-vl-8b --tp 1,2 --batches 1 \
          $([ -z "${BENCH_TP_HF:-}" ] && echo --no-hf) --ckpt-cache "$CKPT" --json "$OUT/decode-tp.json" ;;
    *) return 1 ;;
  esac
}

expand() {
  for s in "$@"; do
    case $s in
      single) echo build ops vision decode serve-2b ;;
      dual) echo build serve tp ;;
      *) echo "$s" ;;
    esac
  done
}

STEPS=$(expand "${@:-single}" | tr '\n' ' ')
for s in $STEPS; do
  step_cmd "$s" 0 >/dev/null || { echo "unknown step: $s (steps: ${!BUDGET[*]}; groups: single dual)" >&2; exit 2; }
done
GPUS=${BENCH_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
{
  date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  python -c 'import ray; print("ray", ray.__version__)' 2>&1 | tail -1
  echo "steps: $STEPS"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

SUMMARY=()
SKIPPED=()
for s in $STEPS; do
  if (( GPUS < ${NEEDS_GPUS[$s]} )); then
    SUMMARY+=("$s: skipped, needs ${NEEDS_GPUS[$s]} GPUs, $GPUS visible"); SKIPPED+=("$s"); continue
  fi
  left=$(( TOTAL - ($(date +%s) - START) ))
  budget=${BUDGET[$s]}
  override="BUDGET_${s//-/_}"; budget=${!override:-$budget}
  (( budget > left )) && budget=$left
  if (( budget < 45 )); then SUMMARY+=("$s: skipped, ${left}s left"); SKIPPED+=("$s"); continue; fi
  cmd=$(step_cmd "$s" "$budget")
  echo "=== $s (budget ${budget}s): $cmd"
  t0=$(date +%s)
  eval timeout -k 15 "$budget" "$cmd" > "$OUT/$s.log" 2>&1
  rc=$?
  SUMMARY+=("$s: rc=$rc in $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (TIMED OUT: partial JSON only)')")
  (( rc != 0 )) && { SKIPPED+=("$s"); tail -n 25 "$OUT/$s.log"; }
done

echo
for s in $STEPS; do  # the tables, last, as every bench prints them
  [ -f "$OUT/$s.log" ] && sed -n '/^### /,$p' "$OUT/$s.log" | grep -v -e '^(raylet)' -e 'WARNING' -e '^\[' 
done
echo
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
(( ${#SKIPPED[@]} )) && echo "skipped or failed, run next: bash bench/run_gpu.sh ${SKIPPED[*]}" | tee -a "$OUT/summary.txt"
exit 0
