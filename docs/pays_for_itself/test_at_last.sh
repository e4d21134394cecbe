#!/bin/bash
# Test perplexity at the LAST checkpoint (the end of the budget) of every finished run that has no
# eval_test_last.log yet, written beside its records for summarize.py: a comparison without
# checkpoint selection. Usage: test_at_last.sh GRID_DIR DATA_ROOT (DATA_ROOT/CORPUS is a data-bin)
set -uo pipefail
grid=${1:?usage: test_at_last.sh GRID_DIR DATA_ROOT}
data=${2:?usage: test_at_last.sh GRID_DIR DATA_ROOT}
plugin=$(cd "$(dirname "$0")/../.." && pwd)/atbptt_fairseq
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one core, beside the grid's runs
for run in "$grid"/*/*/runs/*; do
  [ -f "$run/result.json" ] && [ -f "$run/checkpoints/checkpoint_last.pt" ] || continue
  [ -f "$run/eval_test_last.log" ] && continue
  corpus=$(basename "$(dirname "$(dirname "$(dirname "$run")")")")
  echo "test at the last checkpoint: $run" >&2
  fairseq-eval-lm "$data/$corpus" --user-dir "$plugin" --task adaptive_tbptt_lm --cpu \
    --path "$run/checkpoints/checkpoint_last.pt" --gen-subset test > "$run/eval_test_last.tmp" 2>&1 &&
    mv "$run/eval_test_last.tmp" "$run/eval_test_last.log"
done
