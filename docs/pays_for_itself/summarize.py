"""The issue-28 grid's table, from each finished run's records (result.json, validation.csv,
the k_decision lines of train.log): python docs/pays_for_itself/summarize.py GRID_DIR > table.md"""

import csv
import json
import sys
from pathlib import Path


def decisions(run: Path) -> list[dict]:
    lines = (run / "train.log").read_text().splitlines()
    return [json.loads(line.split("k_decision ", 1)[1]) for line in lines if "k_decision {" in line]


def main(grid: Path) -> None:
    rows = []
    for result in sorted(grid.glob("*/*/runs/*/result.json")):
        run = result.parent
        corpus, variant = run.parts[-4], run.parts[-3]
        record = json.loads(result.read_text())
        valid = list(csv.DictReader((run / "validation.csv").open()))
        curve = [(float(v["processed_tokens"]), float(v["valid_ppl"])) for v in valid]
        name = record["config"] if variant == "fixed" else f"{variant} delta {record['delta']:g}"
        ks = [d["truncation_length"] for d in decisions(run)] if record["mode"] == "adaptive" else []
        rows.append((corpus, name, record, curve, ks))
    print("| corpus | configuration | seed | best valid ppl | test ppl (best valid) | last valid ppl "
          "| K at the decisions | processed tokens to the best fixed K's best valid ppl |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for corpus in sorted({row[0] for row in rows}):
        mine = [row for row in rows if row[0] == corpus]
        fixed = [row for row in mine if row[2]["mode"] == "fixed"]
        best_fixed = min(fixed, key=lambda row: min(p for _, p in row[3]))
        target = min(p for _, p in best_fixed[3])
        reached_fixed = next(t for t, p in best_fixed[3] if p <= target)
        for _, name, record, curve, ks in mine:
            reached = next((t for t, p in curve if p <= target), None)
            ratio = "never" if reached is None else f"{reached / reached_fixed:.2f}x"
            if record is best_fixed[2]:
                ratio = f"(target {target:.1f} at {reached_fixed / 1e6:.2f}M)"
            print(f"| {corpus} | {name} | {record['run'].rsplit('_s', 1)[1]} | "
                  f"{min(p for _, p in curve):.1f} | {record['test_ppl']:.1f} | {curve[-1][1]:.1f} | "
                  f"{', '.join(map(str, ks)) or record['final_k']:} | {ratio} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
