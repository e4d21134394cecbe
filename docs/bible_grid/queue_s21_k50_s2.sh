#!/bin/bash
# Session 21: when worker queue pid 24934 is done, fixed K = 50 seed 2 (the second-best fixed K at seed 1).
while kill -0 24934 2>/dev/null; do sleep 20; done
cd ${CODE:-.} && export PYTHONPATH=${CODE:-.}
${PYTHON:-python} scripts/sweep.py --preset bible --data ${EXP:-exp}/data/kjv \
  --budget-processed-tokens 12e6 --threads 1 --keep-going \
  --out ${EXP:-exp}/bible_grid/sweep --fixed 50 --deltas none --seeds 2
