#!/bin/bash
# Fixed-K part of the issue-15 §3 grid, seed by seed (resumable: finished runs are skipped).
cd ${CODE:-.}
export PYTHONPATH=${CODE:-.}
for seed in ${SEEDS:-1 2 3}; do
  ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
    --out ${EXP:-exp}/bible_grid/sweep --fixed ${FIXED:-10,50,100,200,300} --deltas none \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
done
