#!/bin/bash
# Session 20 order for the fixed-K part: finish the half-done K=200, then K=50, 100, 300 (seed 1 first).
cd ${CODE:-.}
export PYTHONPATH=${CODE:-.}
for seed in ${SEEDS:-1 2 3}; do
 for k in ${FIXED:-200 50 100 300 10}; do
  ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
    --out ${EXP:-exp}/bible_grid/sweep --fixed $k --deltas none \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
 done
done
