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
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from atbptt_fairseq.experiments.bias_check import DEFAULT_GRID, check_bias


def positive_grid(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"truncation lengths must be >= 1: {text!r}")
    return values


def at_least(least: int):
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


if __name__ == "__main__":
    sys.exit(main())
