#!/usr/bin/env bash
# Issue 18 (MoE kernels) on one H200, in one device call; logs + JSON under $OUT.
#
#   bash bench/gpu_i18.sh                 # build test ops moe
#   bash bench/gpu_i18.sh moe             # any steps, in the order given
#
# Steps (each under `timeout`, cut to what is left of I18_TOTAL_S, default 330 s):
#   build  JIT-build the splitvl extension (C++ + CUDA)
#   test   GPU tests: MoE ops (kernels vs references, full-size shapes, CUDA-graph capture), the grouped-GEMM
#          prefill path (== the kernels == fp32 at T 512/1000/4096, its dispatch, no host sync), the
#          bf16 MoE block (30B-A3B and Qwen3.5-MoE shapes) vs transformers and graph == eager,
#          every op has a CUDA kernel, engine decode with CUDA graphs == eager == transformers (MoE too)
#   ops    bench/ops.py MoE rows (% copy bandwidth at small T, % matmul rate at large T, 64/128-row
#          blocks and the grouped-GEMM path at prefill sizes) and the small-row dense linears next to cuBLAS
#   moe    bench/moe.py: full 48-layer Qwen3-VL-30B-A3B built in GPU memory, decode batch 1 and 64, programmatic
#          dependent launch on and off
#          (eager and CUDA graph) vs the active-weight floor, transformers at batch 64
#   moe-prof  bench/moe.py at batch 1 with the top kernels of five graph replays (where the b1 step's time goes)
#   qkc-test  qk_norm_rope_and_cache (the q/k norm + RoPE with the KV-cache write, one launch): its kernel vs
#          the reference and the two-op path, the PDL chain with it, and the model paths that use it (engine
#          decode with CUDA graphs == eager == transformers, bf16 parity); not a default step
#   qkc-ops  bench/ops.py: qk_norm_rope_and_cache next to qk_norm_rope + reshape_and_cache at the 30B-A3B
#          decode shape (T = 1 and 64, 32/4 heads x 128, interleaved mRoPE); not a default step
#   wide   bench/moe.py at batch 1: the small-row linears wider than their input (qkv) streamed by
#          ops.linear_small vs cuBLAS, in the graph with PDL (--stream-wide on,off), for the 48-layer 30B-A3B, then
#          Qwen3.5-0.8B, 2B and 8B built in GPU memory; not a default step
#   block  the one-op MoE decode block (ops.moe_decode_block, issue 18): its GPU tests (kernel == reference and
#          chain at odd sizes and the 30B-A3B shape, which kernel ran, graph replays == eager, the model paths on
#          and off), the engine's graph decode == eager and the bf16 MoE block vs transformers with
#          SPLITVL_MOE_BLOCK_KERNEL=1, bench/ops.py moe_decode (block vs its chain at T 1, 4) and bench.moe at
#          batch 1 with the block on and off; not a default step: I18_TOTAL_S=600 bash bench/gpu_i18.sh build block
#   merge  paged decode with its partition merge fused into the decode kernel (one launch): the GPU tests
#          (fused == merge kernel == reference, counters reset, graph replays; the PDL attention chain; the mixed
#          step's decode rows; engine decode with CUDA graphs == eager == transformers) and bench/ops.py's 30B-A3B decode rows (B 1 and 64, context 512/1,024/4,096)
#          with the fused merge on and off; not a default step: I18_TOTAL_S=560 bash bench/gpu_i18.sh build merge
#   normqkv  the input norm folded into the qkv projection (ops.add_rms_norm_linear_small): its GPU tests (vs
#          the reference, bit for bit vs fused_add_rms_norm + linear_small, graph capture, PDL on/off, the
#          decoders folded vs not), bench/ops.py rows next to the two-launch paths at the 30B-A3B and 8B qkv
#          shapes, and bench/moe.py at batch 1 with the fold on and off (MoE fused decode off: a pending
#          combine keeps its own norm); not a default step: I18_TOTAL_S=330 bash bench/gpu_i18.sh build normqkv
#   b1-test  block, merge and normqkv's GPU tests in one pytest run each (no -x: every failure shows), then the
#          engine's and models' GPU tests with all three on (SPLITVL_MOE_BLOCK_KERNEL=1 SPLITVL_NORM_QKV_FUSED=1
#          SPLITVL_DECODE_FUSED_MERGE=1): graph == eager == transformers, PDL on and off, async scheduling
#   b1-bench  bench/moe.py at batch 1, every combination of --moe-block, --norm-qkv and --decode-merge on the one
#          48-layer 30B-A3B build
#   b1-ops  bench/ops.py rows of the three: moe_decode, add_rms_norm_linear_small, paged decode merge on/off
#   wide-test  the engine's and models' GPU tests (graph == eager == transformers, bf16 parity, small rows == cuBLAS)
#          with SPLITVL_STREAM_WIDE=1 (the wide small-row linears streamed too); not a default step
#   serve  bench/serve.py: Qwen3-VL-30B-A3B image chat over HTTP on the one-gpu layout, c = 1 and 64, with
#          random weights made in the replicas (--load-format dummy: its ~60 GB checkpoint does not fit the
#          disk); not a default step, it needs its own call: I18_TOTAL_S=560 bash bench/gpu_i18.sh build serve
set -uo pipefail
cd "$(dirname "$0")/.."

source bench/steps.sh  # OUT, the build and run environment, run_steps
TOTAL=${I18_TOTAL_S:-330}
declare -A BUDGET=([build]=200 [test]=120 [ops]=60 [moe]=200 [serve]=420 [moe-prof]=200 [qkc-test]=180 [qkc-ops]=60 [wide]=200 [block]=400 [merge]=330 [normqkv]=320 [b1-test]=330 [b1-bench]=300 [b1-ops]=150 [wide-test]=300)

step_cmd() {
  case $1 in
    build) python -c "import ops; assert ops.extension_available(), ops.fallback_reason(); print('ops built')" ;;
    test) python -m pytest -m gpu -x -q tests/ops/test_moe_experts.py tests/ops/test_moe.py tests/ops/test_moe_permute.py \
            tests/models/test_moe_gpu.py tests/models/test_moe_grouped.py \
            tests/ops/test_linear_small.py tests/models/test_small_rows_gpu.py tests/ops/test_op_table.py "tests/engine/test_gpu.py::test_cuda_graph_decode_equals_eager_and_transformers" ;;
    ops) python bench/ops.py --ops moe_experts topk_softmax linear_small --json "$OUT/ops_moe.json" ;;
    qkc-test) python -m pytest -m gpu -x -q tests/ops/test_qk_norm_rope_and_cache.py tests/ops/test_qk_norm_rope.py \
            tests/ops/test_cache.py tests/ops/test_pdl.py tests/ops/test_op_table.py tests/engine/test_gpu.py \
            tests/engine/test_gpu_graphs.py tests/models/test_qwen3_parity.py tests/models/test_qwen3_5_parity.py ;;
    qkc-ops) python bench/ops.py --ops qk_norm_rope_and_cache reshape_and_cache qk_norm_rope --json "$OUT/ops_qkc.json" ;;
    merge) python -m pytest -m gpu -x -q tests/ops/test_paged_decode_merge.py tests/ops/test_attention.py \
            "tests/ops/test_pdl.py::test_attention_chain" \
            "tests/models/test_layers.py::test_mixed_step_split_at_decode_rows_equals_one_varlen_call_gpu" \
            "tests/engine/test_gpu.py::test_cuda_graph_decode_equals_eager_and_transformers" \
          && python bench/ops.py --ops paged_attention_decode --shapes 30B-A3B --decode-merge on,off \
            --json "$OUT/ops_merge.json" ;;
    moe) python -m bench.moe --pdl on,off --json "$OUT/moe.json" ;;
    block) python -m pytest -m gpu -x -q tests/ops/test_moe_decode_block.py tests/models/test_moe_fused_decode.py \
            tests/ops/test_op_table.py \
          && SPLITVL_MOE_BLOCK_KERNEL=1 python -m pytest -m gpu -x -q tests/models/test_moe_gpu.py \
            tests/engine/test_gpu_graphs.py -k "moe or Moe" \
          && python bench/ops.py --ops moe_decode --json "$OUT/ops_moe_block.json" \
          && python -m bench.moe --batches 1 --no-hf --moe-block on,off --json "$OUT/moe-block.json" ;;
    wide) python -m bench.moe --batches 1 --no-hf --stream-wide on,off --json "$OUT/moe-wide.json" || return 1
        for m in qwen3.5-0.8b qwen3-vl-2b qwen3-vl-8b; do
          python -m bench.moe --model "$m" --batches 1 --no-hf --stream-wide on,off --json "$OUT/wide-$m.json" || return 1
        done ;;
    normqkv) python -m pytest -m gpu -x -q tests/ops/test_norm_linear_small.py tests/models/test_norm_fold.py \
            tests/ops/test_norm.py tests/ops/test_linear_small.py tests/ops/test_op_table.py \
          && python bench/ops.py --ops add_rms_norm_linear_small --json "$OUT/ops_normqkv.json" \
          && python -m bench.moe --batches 1 --no-hf --moe-fused off --norm-qkv on,off --json "$OUT/moe-normqkv.json" ;;
    b1-test) python -m pytest -m gpu -q -p no:warnings --maxfail=10 tests/ops/test_moe_decode_block.py \
            tests/ops/test_paged_decode_merge.py tests/ops/test_norm_linear_small.py tests/ops/test_op_table.py \
            "tests/ops/test_attention.py::test_paged_decode" "tests/ops/test_attention.py::test_paged_decode_query_views" \
            "tests/ops/test_attention.py::test_paged_decode_gqa_groups_and_partitions" tests/ops/test_pdl.py \
            tests/ops/test_norm.py tests/ops/test_linear_small.py \
            tests/models/test_moe_fused_decode.py tests/models/test_norm_fold.py tests/models/test_layers.py || return 1
        SPLITVL_MOE_BLOCK_KERNEL=1 SPLITVL_NORM_QKV_FUSED=1 SPLITVL_DECODE_FUSED_MERGE=1 python -m pytest -m gpu -q -p no:warnings --maxfail=10 \
            tests/engine/test_gpu.py tests/engine/test_gpu_graphs.py tests/models/test_moe_gpu.py \
            tests/models/test_qwen3_parity.py tests/models/test_qwen3_5_parity.py tests/models/test_small_rows_gpu.py ;;
    b1-bench) python -m bench.moe --batches 1 --no-hf --moe-block on,off --norm-qkv on,off --decode-merge on,off \
            --json "$OUT/b1-bench.json" ;;
    b1-ops) python bench/ops.py --ops moe_decode add_rms_norm_linear_small --json "$OUT/ops_b1.json" \
          && python bench/ops.py --ops paged_attention_decode --shapes 30B-A3B --decode-merge on,off \
            --json "$OUT/ops_merge.json" ;;
    moe-prof) python -m bench.moe --batches 1 --no-hf --profile --json "$OUT/moe-prof.json" ;;
    wide-test) SPLITVL_STREAM_WIDE=1 python -m pytest -m gpu -q -p no:warnings --maxfail=10 tests/engine/test_gpu.py \
            tests/engine/test_gpu_graphs.py tests/models/test_moe_gpu.py tests/models/test_qwen3_parity.py \
            tests/models/test_qwen3_5_parity.py tests/models/test_small_rows_gpu.py ;;
    serve) python -m bench.serve --model qwen3-vl-30b-a3b --layout one-gpu --load-format dummy --concurrency 1,64 \
            --no-hf --time-budget-s 240 --json "$OUT/serve-moe.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

run_steps i18 "build test ops moe" "$@"
