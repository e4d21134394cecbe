#!/bin/bash
# Session 20 order for the adaptive part: delta 0.1 (norms), delta 0.1 in-window, then the half-done delta 0.5.
cd ${CODE:-.}
export PYTHONPATH=${CODE:-.}
for seed in ${SEEDS:-1 2 3}; do
  ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
    --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
  ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
    --out ${EXP:-exp}/bible_grid/sweep_inwindow --fixed none --deltas 0.1 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going \
    -- --estimate-method in-window
  ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
    --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.5 \
    --seeds $seed --budget-processed-tokens 12e6 --threads 1 --keep-going
done
