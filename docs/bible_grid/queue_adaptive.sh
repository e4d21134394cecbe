#!/bin/bash
# Session 20 order for the adaptive part: delta 0.1 (norms), delta 0.1 in-window, then the half-done delta 0.5.
cd /work/exp/code2
export PYTHONPATH=/work/exp/code2
for seed in ${SEEDS:-1 2 3}; do
  /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
    --out /work/exp/bible_grid/sweep --fixed none --deltas 0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
  /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
    --out /work/exp/bible_grid/sweep_inwindow --fixed none --deltas 0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going \
    -- --estimate-method in-window
  /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
    --out /work/exp/bible_grid/sweep --fixed none --deltas 0.5 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
done
