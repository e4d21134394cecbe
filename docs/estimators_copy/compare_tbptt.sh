#!/bin/bash
# Issue 18 training comparison, TBPTT part (fixed K 5/10/20, adaptive delta 0.1), frozen code: a worktree in $CODE, default the checkout.
cd ${CODE:-.}
export PYTHONPATH=${CODE:-.}
${PYTHON:-python} scripts/sweep.py --preset copy --data ${EXP:-exp}/demo/data/copy_variable \
  --out ${EXP:-exp}/compare --fixed 5,10,20 --deltas 0.1 --seeds 1,2,3 \
  --budget-processed-tokens 3648000 --threads 1 --jobs 2 --keep-going -- \
  --optimizer adam --lr 0.01 --lr-scaling none --truncation-clip-norm 0 --clip-norm 1.0 \
  --estimate-repeats 5 --estimate-cumulative approx --estimate-burnin -1 --estimate-interval 500
