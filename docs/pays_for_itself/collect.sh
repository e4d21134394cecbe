#!/bin/bash
# Copy every finished run's records (no checkpoints, no lock) from a grid into docs/pays_for_itself/runs
# Usage: collect.sh GRID_DIR   (GRID_DIR/CORPUS/CONFIGURATION/runs/RUN, as queue.sh writes)
set -euo pipefail
grid=${1:?usage: collect.sh GRID_DIR}
dest=$(cd "$(dirname "$0")" && pwd)/runs
for result in "$grid"/*/*/runs/*/result.json; do
  run=$(dirname "$result")
  relative=${run#"$grid"/}
  mkdir -p "$dest/$relative"
  find "$run" -maxdepth 1 -type f ! -name lock -exec cp {} "$dest/$relative/" \;
  metrics="$run/checkpoints/atbptt_metrics.jsonl"  # the run's records (runs of code since issue 23)
  if [ -f "$metrics" ]; then cp "$metrics" "$dest/$relative/"; fi
  for file in "$(dirname "$(dirname "$run")")"/*; do  # the configuration's own records
    if [ -f "$file" ]; then cp "$file" "$dest/$(dirname "$(dirname "$relative")")/"; fi
  done
done
