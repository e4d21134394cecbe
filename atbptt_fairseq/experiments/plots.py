"""Figures and a summary table of a sweep directory written by ``scripts/sweep.py``.

Details: docs/scripts.md, section scripts/plot.py.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .results import load_results, mean_std_cell, read_csv, seed_statistics
from .run_records import recorded_run
from .runs import option_value

FIGURES = (
    "valid_ppl_vs_wall",
    "valid_ppl_vs_tokens",
    "valid_loss_vs_tokens",
    "k_vs_updates",
    "bias_vs_updates",
    "valid_ppl_vs_processed",
    "k_vs_processed",
    "valid_loss_vs_processed",
    "valid_loss_vs_wall",
)


@dataclass
class RunData:
    """A finished run: its result record and its training / validation trajectories."""

    result: dict[str, Any]
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    variant: str = ""  # label of the sweep it comes from when several are compared (--also)

    @property
    def config(self) -> str:
        return (
            f"{self.result['config']} ({self.variant})" if self.variant else self.result["config"]
        )

    @property
    def fixed(self) -> bool:
        return self.result["mode"] == "fixed"

    @property
    def adaptive(self) -> bool:
        return self.result["mode"] == "adaptive"


def load_runs(sweep_dir: Path, variant: str = "") -> list[RunData]:
    """Every finished run of a sweep directory, in grid order (``variant`` labels them)."""
    runs = []
    for result in load_results(sweep_dir):
        run_dir = sweep_dir / "runs" / result["run"]
        train = (
            read_csv(run_dir / "trajectory.csv") if (run_dir / "trajectory.csv").is_file() else []
        )
        valid = (
            read_csv(run_dir / "validation.csv") if (run_dir / "validation.csv").is_file() else []
        )
        if not result.get("arch"):  # recorded before results had it: the run's own command
            recorded = recorded_run(run_dir)
            arch = option_value(recorded["command"], "--arch") if recorded else None
            result = {**result, "arch": arch or ""}
        runs.append(RunData(result, train, valid, variant))
    return runs


def by_config(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    """Runs grouped by configuration, in grid order (fixed K ascending, then delta descending,
    then the gradient estimators)."""
    groups: dict[str, list[RunData]] = defaultdict(list)
    for run in runs:
        groups[run.config].append(run)
    return dict(groups)


def config_label(run: RunData) -> str:
    """``fixed K=10``, ``adaptive delta=0.1``, or a gradient estimator with its K and model,
    ``uoro K=15 on tbptt_lstm_copy``; `` (variant)`` for a sweep of ``--also``."""
    if run.fixed:
        label = f"fixed K={run.result['k']:g}"
    elif run.adaptive:
        label = f"adaptive delta={run.result['delta']:g}"
    else:
        label = f"{run.result['method']} K={run.result['k']:g} on {run.result['arch']}"
    return f"{label} ({run.variant})" if run.variant else label


def mean_curve(
    runs: Sequence[RunData], source: str, x_key: str, y_key: str, log_y: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds of y against x (geometric mean if log_y), on the x range all seeds cover.

    Each seed's curve is interpolated at the union of the seeds' x values, so seeds that log or
    validate at different x (adaptive runs validating every N processed tokens reach them at
    different updates) still average point by point. Non-finite values are left out.
    """
    curves = []
    for run in runs:
        rows = run.train if source == "train" else run.valid
        points = sorted(
            (x, y)
            for row in rows
            for x, y in [(point(run, row, x_key), row.get(y_key, math.nan))]
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
            and (y > 0 or not log_y)
        )  # fmt: skip
        if not points:
            return np.array([]), np.array([])
        xs, ys = np.array(points).T
        curves.append((xs, np.log(ys) if log_y else ys))
    if not curves:
        return np.array([]), np.array([])
    low, high = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    grid = grid[(grid >= low) & (grid <= high)]
    if not len(grid):
        return np.array([]), np.array([])
    mean = np.mean([np.interp(grid, xs, ys) for xs, ys in curves], axis=0)
    return grid, np.exp(mean) if log_y else mean


def point(run: RunData, row: dict[str, Any], x_key: str) -> float:
    """The x value of a trajectory row; wall time of fixed-K runs excludes bias monitoring."""
    if x_key == "wall" and run.fixed:
        return row.get("wall", math.nan) - (row.get("est_sec") or 0.0)
    return row.get(x_key, math.nan)


def training_wall(run: RunData) -> float:
    """A run's wall time as the figures draw it: fixed-K runs without bias monitoring."""
    wall, est = run.result.get("wall_sec"), run.result.get("est_sec")
    wall = math.nan if wall is None else float(wall)
    return wall - float(est or 0.0) if run.fixed else wall


def styles(groups: dict[str, list[RunData]]) -> dict[str, dict[str, Any]]:
    """Line style per configuration: fixed K dashed in cool colours, adaptive solid in warm,
    gradient estimators dash-dotted in distinct colours."""
    fixed = [c for c, runs in groups.items() if runs[0].fixed]
    adaptive = [c for c, runs in groups.items() if runs[0].adaptive]
    estimators = [c for c, runs in groups.items() if not (runs[0].fixed or runs[0].adaptive)]
    out = {}
    for index, config in enumerate(fixed):
        colour = plt.cm.viridis(0.1 + 0.75 * index / max(len(fixed) - 1, 1))
        out[config] = {"color": colour, "linestyle": "--"}
    for index, config in enumerate(adaptive):
        colour = plt.cm.autumn(0.8 * index / max(len(adaptive) - 1, 1))
        out[config] = {"color": colour, "linestyle": "-", "linewidth": 2}
    for index, config in enumerate(estimators):
        colour = plt.cm.Dark2(index % plt.cm.Dark2.N)
        out[config] = {"color": colour, "linestyle": "-.", "linewidth": 1.5}
    return out


def _finish(ax: plt.Axes, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)


def plot_validation(
    runs: Sequence[RunData], x_key: str, path: Path, metric: str = "valid_ppl"
) -> None:
    """Validation perplexity (``valid_ppl``, linear, mean over seeds) or loss (``valid_loss``,
    log scale, geometric mean) against wall time (``wall``), scored tokens (``tokens``) or
    processed tokens (``processed_tokens``)."""
    groups = by_config(runs)
    style = styles(groups)
    log_y = metric == "valid_loss"
    _, ax = plt.subplots(figsize=(7, 4.5))
    for config, members in groups.items():
        xs, ys = mean_curve(members, "valid", x_key, metric, log_y=log_y)
        ax.plot(xs, ys, marker=".", label=config_label(members[0]), **style[config])
    xlabel = {
        "wall": "wall time (s; fixed K without bias monitoring)",
        "tokens": "scored training tokens",
        "processed_tokens": "processed tokens (windows and estimates: compute)",
    }[x_key]
    if log_y:
        ax.set_yscale("log")
        title, ylabel = "validation loss (geometric mean over seeds)", "loss (bits per token)"
    else:
        title, ylabel = "validation perplexity (mean over seeds)", "perplexity"
    _finish(ax, path, title, xlabel, ylabel)


def truncation_steps(members: Sequence[RunData], x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """K (mean over seeds) against updates or processed tokens from the start to the end of the
    runs: the first record's K from 0, the last one's to the runs' final count (the records stop
    at the last log interval)."""
    xs, ys = mean_curve(members, "train", x_key, "trunc_k")
    if not len(xs):
        return xs, ys
    end_key = "updates" if x_key == "num_updates" else "processed_tokens"
    ends = [float(run.result.get(end_key) or math.nan) for run in members]
    end = float(np.mean(ends)) if all(math.isfinite(e) for e in ends) else math.nan
    xs, ys = np.concatenate([[0.0], xs]), np.concatenate([[ys[0]], ys])
    if math.isfinite(end) and end > xs[-1]:
        xs, ys = np.append(xs, end), np.append(ys, ys[-1])
    return xs, ys


def plot_truncation(runs: Sequence[RunData], path: Path, x_key: str = "num_updates") -> None:
    """K of the adaptive runs against updates or processed tokens (fixed-K and estimator runs as
    flat lines)."""
    groups = by_config(runs)
    style = styles(groups)
    _, ax = plt.subplots(figsize=(7, 4.5))
    for config, members in groups.items():
        xs, ys = truncation_steps(members, x_key)
        alpha = 1.0 if members[0].adaptive else 0.5
        # a logged K covers the updates since the record before it: the step at the record
        # before (steps-pre) puts a jump at the update where K changed
        ax.plot(xs, ys, drawstyle="steps-pre", alpha=alpha, label=config_label(members[0]),
                **style[config])  # fmt: skip
    xlabel = "updates" if x_key == "num_updates" else "processed tokens"
    _finish(ax, path, "truncation length K (mean over seeds)", xlabel, "K")


def plot_bias(runs: Sequence[RunData], path: Path) -> None:
    """Estimated relative bias delta_hat at the K in use against updates, log scale."""
    groups = by_config(runs)
    style = styles(groups)
    _, ax = plt.subplots(figsize=(7, 4.5))
    targets = set()
    for config, members in groups.items():
        xs, ys = mean_curve(members, "train", "num_updates", "bias_hat", log_y=True)
        if len(xs):
            ax.plot(xs, ys, label=config_label(members[0]), **style[config])
        if members[0].adaptive:
            targets.add(float(members[0].result["delta"]))
    for delta in sorted(targets):
        ax.axhline(delta, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    title = "estimated relative bias at the K in use (geometric mean over seeds)"
    _finish(ax, path, title, "updates", "delta_hat")


def config_statistics(
    runs: Sequence[RunData], columns: Sequence[str], **computed: Sequence[float]
) -> pd.DataFrame:
    """:func:`~.results.seed_statistics` of the runs' result fields ``columns`` and of the
    per-run values ``computed`` (name: one value per run), one row per configuration."""
    frame = pd.DataFrame([{**run.result, "configuration": run.config} for run in runs])
    for name, values in computed.items():
        frame[name] = list(values)
    return seed_statistics(frame, "configuration", [*columns, *computed])


def fewest_tokens(runs: Sequence[RunData]) -> float:
    """The scored training tokens of the run that saw the fewest: the default equal-data point."""
    return min(float(run.result["tokens"]) for run in runs)


def valid_ppl_within(run: RunData, tokens: float) -> float:
    """Best validation perplexity a run logged within its first ``tokens`` scored training tokens.

    NaN when the run stopped short of ``tokens``: its best so far would flatter it.
    """
    if float(run.result["tokens"]) < tokens * (1 - 1e-9):
        return math.nan
    seen = [
        row["valid_ppl"]
        for row in run.valid
        if row["tokens"] <= tokens * (1 + 1e-9) and math.isfinite(row["valid_ppl"])
    ]
    return min(seen, default=math.nan)


def summary_table(runs: Sequence[RunData], equal_tokens: float) -> str:
    """Markdown table, one row per configuration; the best fixed K by mean validation ppl."""
    groups = by_config(runs)
    columns = ("valid_ppl", "test_ppl", "final_k", "wall_sec", "est_sec", "tokens")
    stats = config_statistics(
        runs,
        (*columns, "processed_tokens"),
        within=[valid_ppl_within(run, equal_tokens) for run in runs],
    )
    best = best_fixed(groups)
    lines = [
        (
            "| configuration | seeds | valid ppl | test ppl | final K | wall (s) | estimation (s) "
            f"| tokens | processed tokens | valid ppl within {equal_tokens:.3g} tokens |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    digits = {"valid_ppl": 5, "test_ppl": 5, "processed_tokens": 3, "within": 5}
    for config, members in groups.items():
        label = config_label(members[0])
        if config == best:
            label = f"**{label}** (best fixed)"
        row = stats.loc[config]
        cells = [
            mean_std_cell(row, column, digits.get(column, 3))
            for column in (*columns, "processed_tokens", "within")
        ]
        lines.append(f"| {label} | {int(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_fixed(groups: dict[str, list[RunData]]) -> str | None:
    """The fixed-K configuration of the lowest mean validation perplexity; None without one."""
    fixed = {c: m for c, m in groups.items() if m[0].fixed}
    return min(
        fixed, key=lambda c: np.mean([r.result["valid_ppl"] for r in fixed[c]]), default=None
    )


def compute_to_reach(run: RunData, target: float) -> float:
    """Processed tokens at the first validation with perplexity at or below ``target``; NaN if
    the run never got there."""
    for row in sorted(run.valid, key=lambda row: row["num_updates"]):
        if row.get("valid_ppl", math.nan) <= target * (1 + 1e-9):
            return float(row.get("processed_tokens", math.nan))
    return math.nan


def time_to_target_table(runs: Sequence[RunData]) -> str:
    """Per seed, the compute each adaptive (and gradient estimator) run needs to reach the best
    fixed run's best validation perplexity, against what that fixed run needed (the paper's
    time-to-target)."""
    groups = by_config(runs)
    fixed = {c: m for c, m in groups.items() if m[0].fixed}
    if not fixed:
        return ""
    best = best_fixed(groups)
    targets = {r.result["seed"]: r for r in fixed[best]}
    lines = [
        (
            f"| configuration | seed | target: {config_label(fixed[best][0])}'s best valid ppl "
            "| its processed tokens to reach it | this run's | ratio |"
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for members in groups.values():
        if members[0].fixed:
            continue
        for run in sorted(members, key=lambda r: r.result["seed"]):
            reference = targets.get(run.result["seed"])
            if reference is None:
                continue
            target = min(row["valid_ppl"] for row in reference.valid)
            theirs, ours = compute_to_reach(reference, target), compute_to_reach(run, target)
            ratio = ours / theirs if math.isfinite(ours) and theirs else math.nan
            lines.append(
                f"| {config_label(run)} | {run.result['seed']:g} | {target:.5g} | {theirs:.4g} "
                f"| {'not reached' if math.isnan(ours) else f'{ours:.4g}'} "
                f"| {'-' if math.isnan(ratio) else f'{ratio:.2f}'} |"
            )
    return "\n".join(lines) + "\n"


def comparison_table(runs: Sequence[RunData]) -> str:
    """Markdown table, one row per configuration: test perplexity and loss, compute and wall
    time, mean ± std over seeds (the compact comparison, e.g. of gradient estimators)."""
    stats = config_statistics(
        runs, ("test_ppl", "test_loss", "processed_tokens"), wall=[training_wall(r) for r in runs]
    )
    lines = [
        (
            "| configuration | model | seeds | test ppl | test loss (bits) | processed tokens "
            "| wall (s) |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config, members in by_config(runs).items():
        row = stats.loc[config]
        lines.append(
            f"| {config_label(members[0])} | {members[0].result.get('arch') or '-'} "
            f"| {int(row['seeds'])} | {mean_std_cell(row, 'test_ppl', 5)} "
            f"| {mean_std_cell(row, 'test_loss', 4)} "
            f"| {mean_std_cell(row, 'processed_tokens', 3)} "
            f"| {mean_std_cell(row, 'wall', 3)} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(
    runs: Sequence[RunData],
    path: Path,
    title: str = "Sweep summary",
    equal_tokens: float | None = None,
) -> None:
    """``summary.md``: the table and how to read it."""
    equal_tokens = equal_tokens or fewest_tokens(runs)
    text = (
        f"# {title}\n\n"
        "Mean ± sample std over seeds. Perplexities from fairseq-eval-lm at the best validation "
        "checkpoint; final K is the K in use at the end; wall time is fairseq's (training, "
        "estimation, validation), estimation the part spent estimating the bias (monitoring "
        "only, for fixed K); tokens are scored training tokens. The best fixed K is chosen by "
        "mean validation perplexity. The last column compares at equal training data: the best "
        f"validation perplexity fairseq-train logged within the first {equal_tokens:.4g} scored "
        "tokens (- for runs that stopped short of them). Processed tokens count every token "
        "run through the model (training windows, 2K-1 per column in the overlap style, and "
        "the adaptive runs' estimates): the compute.\n\n" + summary_table(runs, equal_tokens)
    )
    if any(math.isfinite(float(r.result.get("processed_tokens") or math.nan)) for r in runs):
        table = time_to_target_table(runs)
        if table:
            text += (
                "\n## Time to target\n\nProcessed tokens each adaptive or gradient estimator "
                "run needed to reach the best validation perplexity of the best fixed K (same "
                "seed), against what that fixed run needed; ratio < 1: the run got there with "
                "less compute.\n\n" + table
            )
    text += (
        "\n## Test perplexity by configuration\n\nMean ± sample std over seeds: test "
        "perplexity and loss (bits per token) from fairseq-eval-lm at the best validation "
        "checkpoint, the processed tokens (compute) and the wall time (fixed K without bias "
        "monitoring, as in the figures).\n\n" + comparison_table(runs)
    )
    path.write_text(text)


def load_all(sweep_dir: Path, also: Sequence[tuple[Path, str]] = ()) -> list[RunData]:
    """The finished runs of ``sweep_dir`` and of the labelled sweeps ``also``; one ``error:``
    line for a directory without any."""
    runs = load_runs(sweep_dir)
    for directory, label in also:
        extra = load_runs(directory, label)
        if not extra:
            raise SystemExit(f"error: {directory} has no finished runs (runs/*/result.json)")
        runs += extra
    if not runs:
        raise SystemExit(f"error: {sweep_dir} has no finished runs (runs/*/result.json)")
    return runs


def make_all(
    sweep_dir: Path,
    out: Path,
    equal_tokens: float | None = None,
    also: Sequence[tuple[Path, str]] = (),
) -> list[Path]:
    """Write every figure and summary.md of ``sweep_dir`` (and the labelled sweeps ``also``,
    e.g. the same grid with another estimate method) into ``out``; return their paths."""
    runs = load_all(sweep_dir, also)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png" for name in FIGURES]
    draw = {
        "valid_ppl_vs_wall": lambda path: plot_validation(runs, "wall", path),
        "valid_ppl_vs_tokens": lambda path: plot_validation(runs, "tokens", path),
        "valid_loss_vs_tokens": lambda path: plot_validation(runs, "tokens", path, "valid_loss"),
        "k_vs_updates": lambda path: plot_truncation(runs, path),
        "bias_vs_updates": lambda path: plot_bias(runs, path),
        "valid_ppl_vs_processed": lambda path: plot_validation(runs, "processed_tokens", path),
        "k_vs_processed": lambda path: plot_truncation(runs, path, x_key="processed_tokens"),
        "valid_loss_vs_processed": lambda path: plot_validation(
            runs, "processed_tokens", path, "valid_loss"
        ),
        "valid_loss_vs_wall": lambda path: plot_validation(runs, "wall", path, "valid_loss"),
    }
    for name, path in zip(FIGURES, paths):
        draw[name](path)
    paths.append(out / "summary.md")
    write_summary(runs, paths[-1], f"Sweep {sweep_dir.name}", equal_tokens)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Figures and a summary table of a sweep directory written by scripts/sweep.py."
    )
    parser.add_argument("sweep", type=Path, help="sweep directory (the --out of sweep.py)")
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for the files (default: SWEEP/plots)"
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="DIR=LABEL",
        help="another sweep directory to compare in the same figures, its configurations "
        "labelled, e.g. sweeps/bible_inwindow=in-window (repeatable)",
    )
    parser.add_argument(
        "--equal-tokens",
        type=float,
        default=None,
        help="scored training tokens at which summary.md compares validation perplexity "
        "(default: the fewest tokens of any run)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the figures and the summary; print their paths, then the test-perplexity table."""
    args = build_parser().parse_args(argv)
    if args.equal_tokens is not None and args.equal_tokens <= 0:
        raise SystemExit(f"error: --equal-tokens must be positive, got {args.equal_tokens:g}")
    also = []
    for item in args.also:
        directory, separator, label = item.partition("=")
        if not separator or not label:
            raise SystemExit(f"error: --also takes DIR=LABEL, got {item!r}")
        also.append((Path(directory), label))
    out = args.out or args.sweep / "plots"
    for path in make_all(args.sweep, out, args.equal_tokens, also):
        print(path)
    print("\n" + comparison_table(load_all(args.sweep, also)), end="")
    return 0
