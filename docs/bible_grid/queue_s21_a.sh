#!/bin/bash
# Session 21, worker A: seeds 2-3 of adaptive delta 0.1 (norm estimate) first, then the unfinished seed-1 runs.
run() { ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
  --budget-processed-tokens 12e6 --threads 1 --keep-going "$@"; }
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.1 --seeds 2
run --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.1 --seeds 3
run --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.5 --seeds 1
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep --fixed 300 --deltas none --seeds 1
