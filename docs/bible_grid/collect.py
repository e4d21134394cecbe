"""Copy finished runs of the §3 grid (without checkpoints) into the repo and write STATUS.md."""
import json, shutil, sys
from pathlib import Path

dest = Path("/work/main/docs/bible_grid")
rows = []
for sweep in (Path("/work/exp/bible_grid/sweep"), Path("/work/exp/bible_grid/sweep_inwindow")):
    for run in sorted((sweep / "runs").glob("*")):
        name = f"{sweep.name}/{run.name}"
        if (run / "result.json").is_file():
            target = dest / "runs" / sweep.name / run.name
            target.mkdir(parents=True, exist_ok=True)
            for f in run.iterdir():
                if f.is_file() and f.name != "lock":
                    shutil.copy2(f, target / f.name)
            r = json.loads((run / "result.json").read_text())
            rows.append(f"| {name} | finished | {r['test_ppl']:.2f} | {r['processed_tokens']:,.0f} |")
        else:
            valid = [l for l in (run / "train.log").read_text().splitlines() if "| valid |" in l]
            last = json.loads(valid[-1].split("| valid | ", 1)[1]) if valid else {}
            rows.append(f"| {name} | unfinished (last valid ppl {last.get('valid_ppl', '-')} at update {last.get('valid_num_updates', '-')}) | - | - |")
dest.mkdir(parents=True, exist_ok=True)
(dest / "STATUS.md").write_text(
    "# Issue 15 §3 grid: state at the end of stop 19\n\n"
    "Runs finished so far are copied (without checkpoints) into `runs/`; copy them into a sweep\n"
    "`--out` (keeping `sweep/` and `sweep_inwindow/` apart) and rerun the README commands to go on:\n"
    "finished runs are skipped, the rest start afresh if their checkpoints are gone.\n\n"
    "| run | state | test ppl | processed tokens |\n| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
print((dest / "STATUS.md").read_text())
