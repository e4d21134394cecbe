#!/bin/bash
# Session 21, worker A: seeds 2-3 of adaptive delta 0.1 (norm estimate) first, then the unfinished seed-1 runs.
run() { /work/main/.venv/bin/python scripts/sweep.py --preset bible --data /work/exp/data/kjv \
  --budget-processed-tokens 12e6 --threads 1 --keep-going "$@"; }
cd /work/exp/code2 && export PYTHONPATH=/work/exp/code2
run --out /work/exp/bible_grid/sweep --fixed none --deltas 0.1 --seeds 2
run --out /work/exp/bible_grid/sweep --fixed none --deltas 0.1 --seeds 3
run --out /work/exp/bible_grid/sweep --fixed none --deltas 0.5 --seeds 1
cd /work/exp/code && export PYTHONPATH=/work/exp/code
run --out /work/exp/bible_grid/sweep --fixed 300 --deltas none --seeds 1
