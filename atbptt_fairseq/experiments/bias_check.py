"""Is delta_hat the bias it claims to be? The true relative bias of truncated BPTT on a checkpoint.

For a fairseq checkpoint of the ``adaptive_tbptt_lm`` task this draws S windows at random offsets
of a split (burn-in without gradient, then a long window of L steps) and measures, for each K of a
grid (atbptt/ground_truth.py):

* the true relative bias of the parameter gradient truncated at K, for the final-step loss (the
  loss whose state-gradient norms the estimator models), with a bootstrap spread over window
  groups, a noise-debiased value and the noise floor;
* the same for the overlap training loss (mean loss of the last K positions of a window of 2K-1);
* delta_hat(K) of the estimator on the same windows, with lag 0 at the state the final loss reads
  (``final``) and at the state before it (``previous``, the authors' code), both with the
  checkpoint's estimate settings (W, tau, cumulative norm), and a diagnostic delta_hat whose decay
  rate is fitted on the tail of the window only (lags >= --tail-fit-from, default W/2).

It prints a table, the K each rule would pick at delta 0.1/0.5/0.9 against the smallest K of the
grid whose true bias is below delta, and writes ``bias_check.csv`` and ``bias_check.png`` (log-log:
true bias with its bootstrap band, the delta_hat curves) to --out. The model runs in eval mode
(no dropout) and fp32, as the estimator does.

    python scripts/check_bias.py CHECKPOINT --data data-bin/kjv --out bias_out
    python scripts/check_bias.py ckpt.pt --data data-bin/copy_variable --windows 256 --device cuda

The checkpoint is verified before it is unpickled (``atbptt.load_checkpoint``'s checks, through
the plugin's fairseq loader). Expected problems (missing checkpoint or data, a damaged or unsafe
checkpoint, a K grid the window cannot hold, ...) end with one line ``error: ...`` and exit
status 1.

The measurement itself is :func:`atbptt.measure_true_bias`; this module loads the checkpoint
and its data through fairseq, resolves the windows and the estimate settings, prints the tables,
writes the files, and holds the command line of ``scripts/check_bias.py`` (``main``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from atbptt_fairseq.experiments import console
from atbptt_fairseq.experiments.console import fail, write_atomically

DEFAULT_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DELTAS = (0.1, 0.5, 0.9)


def log(message: str) -> None:
    """One progress line of the check on stderr (stdout carries the tables)."""
    console.log(message, "check_bias")


def check_out_directory(out: Path) -> None:
    """Fail before any work unless --out is, or can become, a directory."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"lies below the file {existing}"
        raise fail(f"--out {out} {what}; give a directory for bias_check.csv and .png")


def load(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """Model (eval, fp32, on the device), the loaded task and the checkpoint's update count."""
    from fairseq import checkpoint_utils

    from atbptt import CheckpointError
    from atbptt_fairseq import fairseq_fixes
    from atbptt_fairseq.errors import UserInputError

    fairseq_fixes.install()  # fairseq loads checkpoints through the plugin's (atbptt's) loader

    overrides: dict[str, Any] = {"data": str(args.data)}
    if args.target_dir is not None:
        overrides["target_dir"] = args.target_dir or None
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(args.checkpoint), overrides)
        task_name = state["cfg"]["task"].get("_name") if state.get("cfg") else None
        if task_name != "adaptive_tbptt_lm":
            raise fail(f"{args.checkpoint} is a {task_name} checkpoint, not adaptive_tbptt_lm")
        models, _, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(args.checkpoint)], overrides, state=state
        )
        task.load_dataset(args.split)
    except (CheckpointError, UserInputError) as error:  # a damaged or unsafe checkpoint, ...
        raise fail(str(error)) from None
    except KeyError as error:
        raise fail(f"split {args.split!r} is not in {args.data} ({error})") from None
    history = state.get("optimizer_history") or [{}]
    updates = int(history[-1].get("num_updates", -1))
    model = models[0].float().to(args.device).eval()
    return model, task, updates


def resolve_windows(args: argparse.Namespace) -> tuple[list[int], int, int]:
    """The K grid, L and the burn-in, checked before anything is loaded."""
    grid = args.k_grid
    window = args.window
    if grid is None:
        grid = list(DEFAULT_GRID)
        if window:
            grid = [length for length in grid if 2 * length - 1 <= window]
            if not grid:
                raise fail(f"--window {window} holds no K of the default grid; lengthen it")
    if not window:
        window = 4 * grid[-1]
    if 2 * grid[-1] - 1 > window:
        raise fail(
            f"--k-grid reaches K = {grid[-1]}, but the window L = {window} holds K up to "
            f"{(window + 1) // 2} (the truncated overlap loss needs 2K - 1 steps); lengthen "
            "--window or shorten the grid"
        )
    if args.windows < 1 or args.groups < 1 or args.windows % args.groups:
        raise fail(f"--windows ({args.windows}) must be a positive multiple of --groups")
    return grid, window, args.burnin or max(window // 10, 1)


def resolve_estimator(args: argparse.Namespace, task_cfg: Any, window: int) -> dict[str, Any]:
    """W, tau, cumulative norm and the tail fit's first lag of delta_hat: the options, else the
    checkpoint's estimate settings."""
    estimate_window = min(args.estimate_window or int(task_cfg.estimate_window), window)
    if args.tail_anchor == -2:
        same_window = estimate_window == int(task_cfg.estimate_window)
        anchor = int(task_cfg.estimate_tail_anchor) if same_window else -1
    else:
        anchor = args.tail_anchor
    if anchor >= estimate_window:
        raise fail(f"--tail-anchor {anchor} must lie below the estimate window {estimate_window}")
    tail_fit_from = estimate_window // 2 if args.tail_fit_from < 0 else args.tail_fit_from
    if tail_fit_from > estimate_window - 2:
        raise fail(f"--tail-fit-from {tail_fit_from} leaves fewer than 2 lags of W")
    return {
        "estimate_window": estimate_window,
        "tail_anchor": None if anchor < 0 else anchor,
        "cumulative": args.cumulative or str(task_cfg.estimate_cumulative),
        "tail_fit_from": tail_fit_from,
    }


def choose(estimate: Any, target: float) -> str:
    from atbptt import raw_truncation_length

    length = raw_truncation_length(estimate, target)
    if length is None:
        return "unbounded"
    window = estimate.relative_bias.numel()
    below = bool(estimate.relative_bias[length - 1] < target)
    return str(length) if below else f">{window}"


def plot(path: Path, title: str, rows: list[dict[str, float]], curves: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["K"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    truth = [row["true_bias_final"] for row in rows]
    low = [row["true_bias_final_low"] for row in rows]
    high = [row["true_bias_final_high"] for row in rows]
    axes.plot(lengths, truth, "ko-", label="true bias, final-step loss")
    if all(math.isfinite(value) for value in low + high):
        axes.fill_between(lengths, low, high, color="0.6", alpha=0.4, label="bootstrap 95%")
    axes.plot(
        lengths,
        [row["true_bias_window"] for row in rows],
        "s--",
        color="0.3",
        label="true bias, training-window loss",
    )
    axes.plot(lengths, [row["noise_floor"] for row in rows], ":", color="0.5", label="noise floor")
    styles = (("C0", "-"), ("C1", "-"), ("C2", "--"))  # the tail fit may coincide with "final"
    for (label, (ks, values)), (color, style) in zip(curves.items(), styles):
        axes.plot(ks, values, style, color=color, label=label)
    for delta in DELTAS:
        axes.axhline(delta, color="0.85", lw=0.8, zorder=0)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("truncation length K")
    axes.set_ylabel("relative bias")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def check_bias(args: argparse.Namespace) -> int:
    """Measure and report as ``args`` (the options of scripts/check_bias.py) ask; 0 when done."""
    if not args.checkpoint.is_file():
        missing = "is a directory" if args.checkpoint.is_dir() else "does not exist"
        raise fail(f"checkpoint {args.checkpoint} {missing}; give the path of a checkpoint file")
    check_out_directory(args.out)
    if not (args.data / "dict.txt").is_file():
        raise fail(f"{args.data} holds no dict.txt; give the fairseq-preprocess output directory")
    import torch

    from atbptt import aligned_stream, delta_hat_on_grid, first_lags, measure_true_bias
    from atbptt.ground_truth import smallest_length_below

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as error:
        raise fail(f"device {args.device!r} is not usable ({str(error).splitlines()[0]})")
    grid, window, burnin = resolve_windows(args)
    model, task, updates = load(args)
    # a module fairseq imports sets the root logger to DEBUG: no library's debug lines (e.g.
    # matplotlib's on import) among the progress
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.INFO))
    settings = resolve_estimator(args, task.cfg, window)
    stream = task.datasets[args.split]
    inputs, targets = aligned_stream(stream.tokens, stream.targets)
    log(
        f"{args.checkpoint} (update {updates}): S {args.windows} in {args.groups} groups, "
        f"L {window}, burn-in {burnin}, K {grid}"
    )
    start = time.perf_counter()

    def progress(done: int, groups: int) -> None:
        elapsed = time.perf_counter() - start
        log(
            f"group {done}/{groups} of windows measured ({elapsed:.0f} s, about "
            f"{elapsed / done * (groups - done):.0f} s to go)"
        )

    try:
        truth = measure_true_bias(
            model,
            inputs,
            targets,
            grid,
            window,
            burnin,
            args.windows,
            torch.Generator().manual_seed(args.seed),
            num_groups=args.groups,
            batch_dim=1,  # the LSTM state is num_layers x B x H
            bootstrap_samples=args.bootstrap,
            training_window=not args.final_step_only,
            progress=progress,
        )
    except ValueError as error:
        raise fail(str(error)) from None
    seconds = time.perf_counter() - start
    estimate_window = settings["estimate_window"]
    profiles = {
        "final": first_lags(truth.profile, estimate_window),
        "previous": first_lags(truth.profile.without_readout_lag(), estimate_window),
    }
    common = {"cumulative": settings["cumulative"], "tail_anchor": settings["tail_anchor"]}
    estimates, on_grid = {}, {}
    for name, profile in profiles.items():
        on_grid[name], estimates[name] = delta_hat_on_grid(profile, grid, **common)
    on_grid["tail"], estimates["tail"] = delta_hat_on_grid(
        profiles["final"], grid, fit_first_lag=settings["tail_fit_from"], **common
    )

    final, overlap = truth.final_step, truth.training_window
    if overlap is None:  # not measured: nan columns keep one CSV layout
        nan = torch.full((len(grid),), math.nan, dtype=torch.float64)
        overlap = dataclasses.replace(final, relative_bias=nan, debiased=nan, gradient_signal=nan)
    rows = []
    for index, length in enumerate(grid):
        rows.append(
            {
                "K": length,
                "true_bias_final": float(final.relative_bias[index]),
                "true_bias_final_std": float(final.bootstrap_std[index]),
                "true_bias_final_low": float(final.bootstrap_low[index]),
                "true_bias_final_high": float(final.bootstrap_high[index]),
                "true_bias_final_debiased": float(final.debiased[index]),
                "noise_floor": float(final.noise_floor[index]),
                "true_bias_window": float(overlap.relative_bias[index]),
                "true_bias_window_debiased": float(overlap.debiased[index]),
                "window_gradient_signal": float(overlap.gradient_signal[index]),
                "delta_hat_final": float(on_grid["final"][index]),
                "delta_hat_previous": float(on_grid["previous"][index]),
                "delta_hat_tail_fit": float(on_grid["tail"][index]),
            }
        )

    header = (
        f"checkpoint {args.checkpoint} (update {updates}), split {args.split}: S = {args.windows} "
        f"windows ({args.groups} groups), L = {window}, burn-in {burnin}; delta_hat with W = "
        f"{estimate_window}, tau = {estimates['final'].tail_anchor}, cumulative "
        f"{settings['cumulative']}; beta_hat {estimates['final'].decay_rate:.4f} (final), "
        f"{estimates['previous'].decay_rate:.4f} (previous), "
        f"{estimates['tail'].decay_rate:.4f} (tail fit from lag {settings['tail_fit_from']}); "
        f"{seconds:.0f} s. Signal share of ||mean g|| (final-step loss; 1 resolved, ~0 noise): "
        f"{float(final.gradient_signal[0]):.3f}"
    )
    print(header)
    print()
    print(
        "| K | true bias, final-step loss (± bootstrap std) | debiased | noise floor | "
        "true bias, training-window loss | delta_hat final | delta_hat previous | "
        "delta_hat tail fit |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['K']} | {row['true_bias_final']:.4g} ± {row['true_bias_final_std']:.2g} | "
            f"{row['true_bias_final_debiased']:.4g} | {row['noise_floor']:.2g} | "
            f"{row['true_bias_window']:.4g} | {row['delta_hat_final']:.4g} | "
            f"{row['delta_hat_previous']:.4g} | {row['delta_hat_tail_fit']:.4g} |"
        )
    print()
    print(
        "| delta | K by delta_hat final | previous | tail fit | smallest grid K with true bias "
        "< delta: final-step loss | (debiased) | training-window loss |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for delta in DELTAS:
        truths = [
            smallest_length_below(grid, values, delta)
            for values in (final.relative_bias, final.debiased, overlap.relative_bias)
        ]
        print(
            f"| {delta} | {choose(estimates['final'], delta)} | "
            f"{choose(estimates['previous'], delta)} | {choose(estimates['tail'], delta)} | "
            + " | ".join(
                str(truth or (f">{grid[-1]}" if bool(values.isfinite().any()) else "-"))
                for truth, values in zip(
                    truths, (final.relative_bias, final.debiased, overlap.relative_bias)
                )
            )
            + " |"
        )

    args.out.mkdir(parents=True, exist_ok=True)

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def curve(name: str) -> tuple[list[int], list[float]]:
        lengths = list(range(1, grid[-1] + 1))
        return lengths, delta_hat_on_grid(
            profiles["final" if name == "tail" else name],
            lengths,
            fit_first_lag=settings["tail_fit_from"] if name == "tail" else 0,
            **common,
        )[0].tolist()

    curves = {
        "delta_hat, lag 0 = h_s (final)": curve("final"),
        "delta_hat, lag 0 = h_{s-1} (previous)": curve("previous"),
        f"delta_hat, tail fit (lags >= {settings['tail_fit_from']})": curve("tail"),
    }
    title = f"{args.checkpoint.name} (update {updates}), S={args.windows}, L={window}, W={estimate_window}"
    write_atomically(args.out / "bias_check.csv", write_csv)
    write_atomically(args.out / "bias_check.png", lambda path: plot(path, title, rows, curves))
    log(f"wrote {args.out / 'bias_check.csv'} and {args.out / 'bias_check.png'}")
    return 0


def positive_grid(text: str) -> list[int]:
    """An argparse type: comma-separated truncation lengths, sorted, each at least 1."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"truncation lengths must be >= 1: {text!r}")
    return values


def at_least(least: float) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least} (got {value})")
        return value

    return parse


def bootstrap_count(text: str) -> int:
    """--bootstrap: 0 (no bootstrap: its columns are nan) or at least 2 resamples (one has no
    spread)."""
    value = at_least(-math.inf)(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (none) or at least 2 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/check_bias.py``."""
    parser = argparse.ArgumentParser(
        description="True relative bias of truncated BPTT against the estimator's delta_hat.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="fairseq checkpoint (adaptive_tbptt_lm)")
    parser.add_argument("--data", type=Path, required=True, help="fairseq-preprocess output")
    parser.add_argument(
        "--target-dir",
        default=None,
        help="target stream subdirectory (copy task); default: the checkpoint's task setting",
    )
    parser.add_argument("--split", default="train", help="split the windows are drawn from")
    parser.add_argument("--windows", type=at_least(1), default=64, help="windows S")
    parser.add_argument(
        "--groups", type=at_least(1), default=8, help="window groups G (batches; bootstrap units)"
    )
    parser.add_argument(
        "--k-grid",
        type=positive_grid,
        default=None,
        help=f"truncation lengths K; default {','.join(map(str, DEFAULT_GRID))}, "
        "clipped to what --window holds (2K - 1 <= L)",
    )
    parser.add_argument(
        "--window",
        type=at_least(0),
        default=0,
        help="long window L; 0: 4 x the largest K of the grid",
    )
    parser.add_argument("--burnin", type=at_least(0), default=0, help="burn-in steps; 0: L // 10")
    parser.add_argument(
        "--estimate-window",
        type=at_least(0),
        default=0,
        help="W of delta_hat; 0: the checkpoint's --estimate-window (at most L)",
    )
    parser.add_argument(
        "--tail-anchor",
        type=at_least(-2),
        default=-2,
        help="tau of delta_hat; -2: the checkpoint's setting, -1: W - W // 10 - 1",
    )
    parser.add_argument(
        "--cumulative",
        choices=("approx", "exact"),
        default=None,
        help="cumulative norm of delta_hat; default: the checkpoint's setting",
    )
    parser.add_argument(
        "--tail-fit-from",
        type=at_least(-1),
        default=-1,
        help="first lag of the tail-only decay fit; -1: W // 2",
    )
    parser.add_argument(
        "--final-step-only",
        action="store_true",
        help="skip the training-window loss (one backward per K): allows many more windows",
    )
    parser.add_argument(
        "--bootstrap",
        type=bootstrap_count,
        default=1000,
        help="bootstrap resamples; 0: none (the bootstrap columns are nan)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the windows and bootstrap")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--threads", type=at_least(0), default=0, help="torch threads; 0: leave as is"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the CSV and PNG")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Check the bias on the checkpoint the command line names."""
    return check_bias(build_parser().parse_args(argv))
