#!/bin/bash
# Test perplexity of every finished run at its LAST checkpoint (the end of the 12M budget), beside
# the sweep's figure at the best-validation checkpoint: a comparison with no checkpoint selection.
# Usage: test_at_last_checkpoint.sh [grid dir] [data-bin] > test_at_last_checkpoint.md
grid=${1:-${EXP:-exp}/bible_grid}
data=${2:-${EXP:-exp}/data/kjv}
plugin=$(cd "$(dirname "$0")/../.." && pwd)/atbptt_fairseq
echo "| run | test ppl, best-validation checkpoint | test ppl, last checkpoint |"
echo "| --- | --- | --- |"
for run in "$grid"/sweep/runs/* "$grid"/sweep_inwindow/runs/*; do
  [ -f "$run/result.json" ] && [ -f "$run/checkpoints/checkpoint_last.pt" ] || continue
  last=$(fairseq-eval-lm "$data" --user-dir "$plugin" --task adaptive_tbptt_lm \
    --path "$run/checkpoints/checkpoint_last.pt" --gen-subset test 2>&1 |
    sed -n 's/.*Perplexity: \([0-9.]*\).*/\1/p')
  best=$(python -c "import json,sys; print('%.2f' % json.load(open(sys.argv[1]))['test_ppl'])" "$run/result.json")
  name=$(basename "$run")
  [[ $run == */sweep_inwindow/* ]] && name="$name (in-window)"
  echo "| $name | $best | $last |"
done
