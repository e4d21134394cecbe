"""State of the issue-15 §3 grid, finished or not: validation ppl at equal processed tokens.

Reads every run's train.log with sweep.py's own parser (so unfinished runs count too), writes
progress_table.md, also spliced into STATUS.md between its markers (a table of valid ppl at each
1.2M processed tokens each run has reached, its last K and delta_hat), progress.png (valid ppl
against processed tokens) and second_half.png (every seed, 4.8M on), and copies finished runs
(without checkpoints) into the repository's docs/bible_grid/runs.
Usage: PYTHONPATH=<repo> python progress.py <grid dir> <repo docs/bible_grid dir>
"""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from atbptt_fairseq.experiments.fairseq_logs import parse_run

grid, dest = Path(sys.argv[1]), Path(sys.argv[2])
marks = [1.2e6 * i for i in range(1, 11)]
rows, curves = [], {}
for sweep in ("sweep", "sweep_inwindow"):
    for run in sorted((grid / sweep / "runs").glob("*")):
        log = run / "train.log"
        if not log.is_file():
            continue
        parsed = parse_run(run)
        name = run.name + (" (in-window)" if sweep == "sweep_inwindow" else "")
        valid = [(r["processed_tokens"], r["valid_ppl"]) for r in parsed.valid]
        valid.sort()
        curves[name] = valid
        done = (run / "result.json").is_file()
        if done:
            target = dest / "runs" / sweep / run.name
            target.mkdir(parents=True, exist_ok=True)
            for f in run.iterdir():
                if f.is_file() and f.name != "lock":
                    shutil.copy2(f, target / f.name)
        xs = np.array([v[0] for v in valid]) if valid else np.array([])
        ys = np.array([v[1] for v in valid]) if valid else np.array([])
        at = [
            f"{np.interp(m, xs, ys):.1f}" if len(xs) and xs.max() >= m and xs.min() <= m else "-"
            for m in marks
        ]
        ks = [e["trunc_k"] for e in parsed.estimates]
        last = parsed.train[-1] if parsed.train else {}
        test = json.loads((run / "result.json").read_text())["test_ppl"] if done else None
        rows.append(
            f"| {name} | {'finished' if done else 'running'} | {parsed.processed_tokens / 1e6:.2f}M "
            f"| {parsed.updates} | {' | '.join(at)} | {'-' if test is None else f'{test:.2f}'} "
            f"| {int(last.get('trunc_k', math.nan)) if last else '-'} "
            f"| {'->'.join(str(int(k)) for k in ks[:12])}{' ...' if len(ks) > 12 else ''} |"
        )
fig, ax = plt.subplots(figsize=(8, 5))
for name, valid in curves.items():
    if valid:
        ax.plot([v[0] / 1e6 for v in valid], [v[1] for v in valid], marker=".", label=name)
ax.set(
    xlabel="processed tokens (M)",
    ylabel="valid ppl",
    yscale="log",
    title="King James Bible grid (12M processed tokens per run): valid ppl so far",
)
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
dest.mkdir(parents=True, exist_ok=True)
fig.savefig(dest / "progress.png", dpi=100)
# the second half, where the comparison is decided: every seed (colour: configuration, line: seed)
config_of = {name: re.sub(r"_s\d+", "", name) for name in curves}
colours = dict(zip(sorted(set(config_of.values())), plt.cm.tab10.colors))
fig, ax = plt.subplots(figsize=(8, 5))
for name, valid in curves.items():
    seed = int(re.search(r"_s(\d+)", name).group(1))
    late = [v for v in valid if v[0] >= 4.8e6]
    if late and min(v[1] for v in late) < 130:  # runs far behind stay off this figure
        config = config_of[name]
        ax.plot(
            [v[0] / 1e6 for v in late],
            [v[1] for v in late],
            color=colours[config],
            linestyle=["-", "--", ":"][(seed - 1) % 3],
            marker=".",
            label=f"{config} seed {seed}",
        )
ax.set(
    xlabel="processed tokens (M)",
    ylabel="valid ppl",
    ylim=(90, 130),
    title="King James Bible grid: valid ppl over the second half of the budget, every seed",
)
ax.grid(True, alpha=0.3)
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(dest / "second_half.png", dpi=100)
header = " | ".join(f"{m / 1e6:.1f}M" for m in marks)
table = (
    f"| run | state | processed | updates | valid ppl at {header} | test ppl | K now | K decisions |\n"
    + "| --- " * (6 + len(marks))
    + "| --- |\n"
    + "\n".join(rows)
    + "\n"
)
(dest / "progress_table.md").write_text(table)
status = dest / "STATUS.md"
if status.is_file():  # the table between the markers is this file's
    start, end = "<!-- progress table -->\n", "<!-- end of progress table -->"
    text = status.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        status.write_text(head + start + table + rest[rest.index(end) :])
print(table)
