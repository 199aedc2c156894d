# Sourced (from the repository root) by the one-call GPU scripts (bench/gpu_*.sh): sets $OUT and the
# build / run environment, starts the clock, and defines run_steps, which runs named steps under
# `timeout`, each cut to what is left of the script's TOTAL seconds, logs to $OUT/<prefix>-<step>.log,
# and says at the end what failed or did not fit. The caller defines `step_cmd STEP`, BUDGET
# (step -> seconds) and TOTAL.
#
#   run_steps PREFIX "default steps" "$@"
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-$PWD}
START=$(date +%s)

run_steps() {
  local prefix=$1 defaults=$2 step s left budget rc
  shift 2
  local failed=() skipped=()
  for step in "${@:-$defaults}"; do
    for s in $step; do
      left=$(( TOTAL - ($(date +%s) - START) ))
      budget=${BUDGET[$s]:-120}
      (( budget > left )) && budget=$left
      if (( budget < 20 )); then skipped+=("$s"); continue; fi
      echo "=== $s (timeout ${budget}s) ==="
      timeout "$budget" bash -c "$(declare -f step_cmd); step_cmd $s" 2>&1 | tee "$OUT/$prefix-$s.log"
      rc=${PIPESTATUS[0]}
      (( rc != 0 )) && failed+=("$s (rc $rc)")
    done
  done
  echo "done in $(( $(date +%s) - START )) s; failed: ${failed[*]:-none}; skipped (no time left): ${skipped[*]:-none}"
  (( ${#failed[@]} == 0 ))
}
