#!/bin/bash
# Refresh this folder from the grid's directory (default $EXP/bible_grid, EXP default exp): the progress table
# (also in STATUS.md) and figure, the finished runs' records, and plot.py's figures and tables.
set -euo pipefail
grid=${1:-${EXP:-exp}/bible_grid}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python}
PYTHONPATH=$root/scripts $python "$here/progress.py" "$grid" "$here" > /dev/null
plots=$(mktemp -d)
PYTHONPATH=$root $python "$root/scripts/plot.py" "$grid/sweep" \
  --also "$grid/sweep_inwindow=in-window" --out "$plots" > /dev/null
for name in valid_ppl_vs_processed valid_ppl_vs_wall k_vs_processed bias_vs_updates; do
  cp "$plots/$name.png" "$here/plots/"
done
cp "$plots/summary.md" "$here/plots/"
rm -r "$plots"
