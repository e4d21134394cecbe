#!/bin/bash
# Session 21, worker B: seeds 2-3 of fixed K = 10 (the best fixed K at seed 1), then delta 0.1 in-window seeds 2-3, then fixed K = 100 seed 1.
run() { ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
  --budget-processed-tokens 12e6 --threads 1 --keep-going "$@"; }
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep --fixed 10 --deltas none --seeds 2
run --out ${EXP:-exp}/bible_grid/sweep --fixed 10 --deltas none --seeds 3
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep_inwindow --fixed none --deltas 0.1 --seeds 2 -- --estimate-method in-window
run --out ${EXP:-exp}/bible_grid/sweep_inwindow --fixed none --deltas 0.1 --seeds 3 -- --estimate-method in-window
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep --fixed 100 --deltas none --seeds 1
