#!/bin/bash
# Session 21: when worker queue pid 24935 is done, fixed K = 50 seed 3 (the second-best fixed K at seed 1).
while kill -0 24935 2>/dev/null; do sleep 20; done
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
  --budget-processed-tokens 12e6 --threads 1 --keep-going \
  --out ${EXP:-exp}/bible_grid/sweep --fixed 50 --deltas none --seeds 3
