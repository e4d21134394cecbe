"""Results of a sweep: one record per finished run, results.csv and each run's trajectory
and validation CSVs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .console import write_atomically
from .fairseq_logs import ParsedLog
from .runs import RunSpec

TRAJECTORY_COLUMNS = (
    "num_updates",
    "wall",
    "tokens",
    "processed_tokens",
    "est_sec",
    "trunc_k",
    "bias_hat",
    "beta_hat",
    "loss",
    "ppl",
)


VALIDATION_COLUMNS = (
    "num_updates",
    "wall",
    "tokens",
    "processed_tokens",
    "est_sec",
    "valid_loss",
    "valid_ppl",
)


RESULT_COLUMNS = (
    "run",
    "config",
    "mode",
    "k",
    "delta",
    "seed",
    "valid_ppl",
    "test_ppl",
    "valid_loss",
    "test_loss",
    "final_k",
    "final_bias_hat",
    "wall_sec",
    "est_sec",
    "tokens",
    "processed_tokens",
    "updates",
    "method",  # --gradient-estimator (tbptt for fixed and adaptive runs)
    "arch",  # the run's --arch
)


def _cell(value: Any) -> Any:
    """A CSV cell: floats to 6 significant digits, NaN and None empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts) with the given columns, atomically; NaN and None become empty."""
    frame = pd.DataFrame(
        [{key: _cell(row.get(key)) for key in columns} for row in rows], columns=list(columns)
    )
    # CRLF line ends, as the csv module writes
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\r\n"))


def read_frame(path: Path) -> pd.DataFrame:
    """A CSV written by :func:`write_csv` as a frame: numbers as floats, empty cells NaN, text
    as text."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in frame.columns:
        numbers = pd.to_numeric(frame[column].replace("", math.nan), errors="coerce")
        text = frame[column] != ""
        if numbers[text].notna().all():
            frame[column] = numbers.astype(float)
        else:
            frame[column] = frame[column].where(text, math.nan)
    return frame


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by :func:`write_csv`, numbers as floats (empty cells NaN)."""
    return read_frame(path).to_dict("records")


def write_trajectories(run_dir: Path, parsed: ParsedLog) -> None:
    """``trajectory.csv`` (training log lines) and ``validation.csv`` of one run."""
    write_csv(run_dir / "trajectory.csv", TRAJECTORY_COLUMNS, parsed.train)
    write_csv(run_dir / "validation.csv", VALIDATION_COLUMNS, parsed.valid)


# position of each mode in the grid: fixed K ascending, delta descending, then the estimators
MODE_ORDER = {"fixed": 0, "adaptive": 1, "estimator": 2}


def results_frame(out: Path) -> pd.DataFrame:
    """The ``result.json`` of every finished run under ``out/runs``, one row each, in grid order
    (fixed K ascending, delta descending, then the estimator runs by configuration name; each
    over its seeds); the :data:`RESULT_COLUMNS` first, then any other recorded field."""
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    frame = pd.DataFrame(records)
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = None
    if frame.empty:
        return frame[list(RESULT_COLUMNS)]
    mode_rank = frame["mode"].map(MODE_ORDER).fillna(len(MODE_ORDER))
    k = pd.to_numeric(frame["k"], errors="coerce").fillna(0)
    delta = pd.to_numeric(frame["delta"], errors="coerce").fillna(0)
    order = pd.DataFrame(
        {
            "mode": mode_rank,
            "number": k.where(frame["mode"] == "fixed", -delta).where(
                frame["mode"] != "estimator", 0
            ),
            "name": frame["config"].where(frame["mode"] == "estimator", ""),
            "seed": frame["seed"],
        }
    )
    ranked = order.sort_values(["mode", "number", "name", "seed"], kind="stable").index
    extra = [column for column in frame.columns if column not in RESULT_COLUMNS]
    return frame.loc[ranked, [*RESULT_COLUMNS, *extra]].reset_index(drop=True)


def load_results(out: Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished run under ``out/runs``, in grid order
    (:func:`results_frame`), as dicts; a field a record lacks is None."""
    frame = results_frame(out).astype(object)
    return [
        {key: None if _missing(value) else value for key, value in row.items()}
        for row in frame.to_dict("records")
    ]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_results(out: Path) -> Path:
    """Rewrite ``out/results.csv`` from the finished runs; return its path."""
    path = out / "results.csv"
    write_csv(path, RESULT_COLUMNS, load_results(out))
    return path


def seed_statistics(frame: pd.DataFrame, by: str, columns: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by`` (a configuration), in order of first appearance: the number of runs
    (``seeds``) and the mean, sample std and count of the values of each of ``columns``, NaN
    and None left out
    (``<column>_mean``, ``_std``, ``_n``)."""
    numbers = frame[list(columns)].apply(pd.to_numeric, errors="coerce")
    grouped = numbers.groupby(frame[by], sort=False)
    stats = grouped.agg(["mean", "std", "count"])
    stats.columns = [
        f"{column}_{'n' if stat == 'count' else stat}" for column, stat in stats.columns
    ]
    stats.insert(0, "seeds", frame.groupby(by, sort=False).size())
    return stats


def mean_std_cell(stats: pd.Series, column: str, digits: int = 4) -> str:
    """``mean ± std`` of ``column`` in a row of :func:`seed_statistics` (sample std), the mean
    alone for one value, ``-`` for none."""
    count = int(stats[f"{column}_n"])
    if count == 0:
        return "-"
    mean = f"{float(stats[f'{column}_mean']):.{digits}g}"
    return mean if count == 1 else f"{mean} ± {float(stats[f'{column}_std']):.2g}"


def summarize_run(
    spec: RunSpec,
    parsed: ParsedLog,
    valid: tuple[float, float],
    test: tuple[float, float],
    arch: str = "",
) -> dict[str, Any]:
    """The result record of a finished run (one row of results.csv); ``arch``: its --arch."""
    last_train = parsed.train[-1] if parsed.train else {}
    final_k = last_train.get("trunc_k", math.nan)
    final_bias = last_train.get("bias_hat", math.nan)
    if parsed.estimates:  # exact values of the last estimate, rather than a log-interval mean
        final_k = parsed.estimates[-1]["trunc_k"]
        final_bias = parsed.estimates[-1]["bias_hat"]
    return {
        "run": spec.name,
        "config": spec.config,
        "mode": spec.mode,
        "k": None if spec.mode == "adaptive" else int(spec.value),
        "delta": spec.value if spec.mode == "adaptive" else None,
        "seed": spec.seed,
        "valid_loss": valid[0],
        "valid_ppl": valid[1],
        "test_loss": test[0],
        "test_ppl": test[1],
        "final_k": final_k,
        "final_bias_hat": final_bias,
        "wall_sec": parsed.wall_sec,
        "est_sec": parsed.est_sec,
        "tokens": parsed.tokens,
        "processed_tokens": parsed.processed_tokens,
        "updates": parsed.updates,
        "method": spec.method,
        "arch": arch,
    }
