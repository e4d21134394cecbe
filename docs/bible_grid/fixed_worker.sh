#!/bin/bash
# Fixed-K part of the issue-15 §3 grid, seed by seed (resumable: finished runs are skipped).
cd /work/exp/code
export PYTHONPATH=/work/exp/code
for seed in ${SEEDS:-1 2 3}; do
  /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
    --out /work/exp/bible_grid/sweep --fixed ${FIXED:-10,50,100,200,300} --deltas none \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
done
