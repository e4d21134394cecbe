#!/bin/bash
# Adaptive part of the issue-15 §3 grid (code: a worktree in $CODE, default the checkout), seed by seed, resumable:
# the paper's norm estimate at delta 0.5 and 0.1, and the in-window estimate at delta 0.1.
cd ${CODE:-.}
export PYTHONPATH=${CODE:-.}
for seed in ${SEEDS:-1 2 3}; do
  ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
    --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.5,0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
  ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
    --out ${EXP:-exp}/bible_grid/sweep_inwindow --fixed none --deltas 0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going \
    -- --estimate-method in-window
done
