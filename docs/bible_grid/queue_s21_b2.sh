#!/bin/bash
# Session 21, worker B (re-planned at 13:57): after the running fixed K = 10 seed 2 (pid 22986),
# fixed K = 10 seed 3, then delta 0.1 with the in-window estimate, seeds 2 and 3.
while kill -0 22986 2>/dev/null; do sleep 20; done
run() { ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
  --budget-processed-tokens 12e6 --threads 1 --keep-going "$@"; }
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep --fixed 10 --deltas none --seeds 3
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep_inwindow --fixed none --deltas 0.1 --seeds 2 -- --estimate-method in-window
run --out ${EXP:-exp}/bible_grid/sweep_inwindow --fixed none --deltas 0.1 --seeds 3 -- --estimate-method in-window
