#!/bin/bash
# Issue 18 training comparison, estimator part (frozen code: a worktree in $CODE, default the checkout), same --out as compare_tbptt.sh.
cd ${CODE:-.}
export PYTHONPATH=${CODE:-.}
for seed in 1 2 3; do ${PYTHON:-python} scripts/sweep.py --preset copy --data ${EXP:-exp}/demo/data/copy_variable \
  --out ${EXP:-exp}/compare --fixed none --deltas none \
  --estimators artbp,uoro,kf-rtrl@tanh_rnn_copy,tbptt@tanh_rnn_copy,exact-rtrl@elementwise_lstm_copy,tbptt@elementwise_lstm_copy \
  --estimator-length 10 --seeds $seed \
  --budget-processed-tokens 3648000 --threads 1 --jobs 1 --keep-going -- \
  --optimizer adam --lr 0.01 --lr-scaling none --truncation-clip-norm 0 --clip-norm 1.0 \
  --estimate-repeats 5 --estimate-cumulative approx --estimate-burnin -1 --estimate-interval 500;
done
