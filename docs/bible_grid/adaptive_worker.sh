#!/bin/bash
# Adaptive part of the issue-15 §3 grid (code at /work/exp/code2), seed by seed, resumable:
# the paper's norm estimate at delta 0.5 and 0.1, and the in-window estimate at delta 0.1.
cd /work/exp/code2
export PYTHONPATH=/work/exp/code2
for seed in ${SEEDS:-1 2 3}; do
  /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
    --out /work/exp/bible_grid/sweep --fixed none --deltas 0.5,0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
  /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
    --out /work/exp/bible_grid/sweep_inwindow --fixed none --deltas 0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going \
    -- --estimate-method in-window
done
