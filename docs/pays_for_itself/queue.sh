#!/bin/bash
# Issue 28's grid, one lane of runs after another, resumable (sweep.py skips finished runs and
# resumes a started one from its checkpoint_last.pt). Code: a frozen worktree at $CODE; data:
# prepare_corpora.sh's $EXP/data. Each run is the bible preset at 12M processed tokens on one core.
# Usage: queue.sh CORPUS [CORPUS...]; SEEDS (default 1), CONFIGS (default: all below, in order).
set -uo pipefail
EXP=${EXP:-exp}
CODE=${CODE:-$EXP/code}
PYTHON=${PYTHON:-python}
cd "$CODE"
export PYTHONPATH=$CODE

sweep() {  # sweep CORPUS OUT_NAME SWEEP_ARGS... [-- FAIRSEQ_ARGS...]
  local corpus=$1 name=$2
  shift 2
  nice -n 19 "$PYTHON" scripts/sweep.py --preset bible --data "$EXP/data/$corpus" \
    --out "$EXP/grid/$corpus/$name" --seeds "$seed" --budget-processed-tokens 12e6 \
    --threads 1 --keep-going "$@"
}

run_config() {  # the configurations of issue 28, by name
  local corpus=$1 config=$2
  case $config in
    fixed10) sweep "$corpus" fixed --fixed 10 --deltas none ;;
    fixed20) sweep "$corpus" fixed --fixed 20 --deltas none ;;
    fixed50) sweep "$corpus" fixed --fixed 50 --deltas none ;;
    fixed100) sweep "$corpus" fixed --fixed 100 --deltas none ;;
    fixed20_lr10)  # K = 20 at K = 10's lr (10 sqrt(20 / 2) = 10 sqrt(10)): the K or the lr?
      sweep "$corpus" fixed20_lr10 --fixed 20 --deltas none -- --lr-scaling-reference 2 ;;
    fixed5) sweep "$corpus" fixed5 --fixed 5 --deltas none -- --min-truncation-length 5 ;;
    paper) sweep "$corpus" paper --fixed none --deltas 0.1 ;;
    inwindow) sweep "$corpus" inwindow --fixed none --deltas 0.1 -- --estimate-method in-window ;;
    noise)  # the in-window estimate, the bias relative to the update's noise, K from the start
      sweep "$corpus" noise --fixed none --deltas 0.1 -- --estimate-method in-window \
        --bias-relative-to update --first-estimate start ;;
    inwindow_start)  # the default since stop 37 (the preset sets the paper's rule): the in-window
      # estimate relative to the gradient, K from the start (--estimate-at-start before stop 37)
      sweep "$corpus" inwindow_start --fixed none --deltas 0.1 -- --estimate-method in-window \
        --first-estimate start ;;
    inwindow_start_step20)  # the default rule with every step at K = 20's length, lr x clip =
      # 10 sqrt(20) x 1 / 20 whatever K (a fixed lr and clip threshold): K no longer sets the step
      sweep "$corpus" inwindow_start_step20 --fixed none --deltas 0.1 -- --estimate-method \
        in-window --first-estimate start --lr-scaling none --lr 44.72 --truncation-clip-norm 0 \
        --clip-norm 0.05 ;;
    candidate)  # the in-window estimate, K moved at most x2 per decision
      sweep "$corpus" candidate --fixed none --deltas 0.1 -- --estimate-method in-window \
        --max-truncation-change 2 ;;
    *) echo "unknown configuration $config" >&2; return 1 ;;
  esac
}

for seed in ${SEEDS:-1}; do
  for corpus in "$@"; do
    for config in ${CONFIGS:-fixed10 candidate fixed20 paper inwindow fixed50 fixed100}; do
      run_config "$corpus" "$config"
    done
  done
done
