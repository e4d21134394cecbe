#!/bin/bash
# Session 20 order for the fixed-K part: finish the half-done K=200, then K=50, 100, 300 (seed 1 first).
cd /work/exp/code
export PYTHONPATH=/work/exp/code
for seed in ${SEEDS:-1 2 3}; do
 for k in ${FIXED:-200 50 100 300 10}; do
  /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
    --out /work/exp/bible_grid/sweep --fixed $k --deltas none \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
 done
done
