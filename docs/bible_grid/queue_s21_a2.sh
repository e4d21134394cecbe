#!/bin/bash
# Session 21, worker A (re-planned at 13:57 from measured speeds): after the running delta 0.1 seed 2
# (pid 22987), delta 0.1 seed 3, then the unfinished seed-1 runs delta 0.5, fixed K = 300 and 100.
while kill -0 22987 2>/dev/null; do sleep 20; done
run() { ${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
  --budget-processed-tokens 12e6 --threads 1 --keep-going "$@"; }
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.1 --seeds 3
run --out ${EXP:-exp}/bible_grid/sweep --fixed none --deltas 0.5 --seeds 1
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
run --out ${EXP:-exp}/bible_grid/sweep --fixed 300 --deltas none --seeds 1
run --out ${EXP:-exp}/bible_grid/sweep --fixed 100 --deltas none --seeds 1
