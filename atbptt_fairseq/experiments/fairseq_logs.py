"""Reading a run's output: its metrics records (:mod:`atbptt.records`: per update K, tokens,
training loss and wall clock, the decisions on K, the validations), and for runs that predate
records with training losses and validations, fairseq-train's JSON log lines (loss, validation,
wall clock) and the text forms of the decisions."""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .fairseq_process import json_record

TIMESTAMP = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


# runs before atbptt_metrics.jsonl (atbptt.records) logged each decision on K as a k_decision JSON
# line, and before that as free text: read for their old logs only
DECISION_LINE = re.compile(r"\| k_decision (\{.*\})\s*$")


ESTIMATE_LINE = re.compile(r"update (\d+): K = (\d+) \(bias_hat ([^,\s]+), beta_hat ([^,\s]+)")


LOADED_LINE = re.compile(r"Loaded checkpoint .* \(epoch \d+ @ (\d+) updates\)")


# the task's exact count where a token budget stopped the run, in logs without records
BUDGET_STOP_LINE = re.compile(r"Stopping training due to (scored|processed) tokens: ([\d,]+) >=")


DONE_LINE = "fairseq_cli.train | done training in "


EVAL_LINE = re.compile(r"Loss \(base 2\): ([0-9.eE+-]+), Perplexity: ([0-9.eE+-]+|inf)")


def float_field(record: dict[str, Any], key: str) -> float:
    """``record[key]`` as a float; NaN where it is missing or not a number."""
    value = record.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _timestamp(line: str) -> float | None:
    match = TIMESTAMP.match(line)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp()


@dataclass
class ParsedLog:
    """Training and validation trajectories and totals of one fairseq-train log."""

    train: list[dict[str, float]]
    valid: list[dict[str, float]]
    estimates: list[dict[str, float]]
    tokens: float
    processed_tokens: float  # nan for logs without ppb (before the processed-token count)
    est_sec: float
    wall_sec: float
    updates: int


def _interpolate(points: dict[int, float], extrapolate: bool) -> Callable[[float], float]:
    """Piecewise-linear interpolation of a cumulative series that starts at (0, 0); past its
    end it goes on at the last slope (``extrapolate``) or stays at the last value."""
    xs = np.array([0.0, *sorted(points)])
    ys = np.array([0.0, *(points[u] for u in sorted(points))])

    def at(update: float) -> float:
        if update <= xs[-1] or len(xs) < 2 or not extrapolate:
            return float(np.interp(update, xs, ys))
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1.0)
        return float(ys[-1] + slope * (update - xs[-1]))

    return at


class _LogState:
    """Records of a log read so far, keyed by update, and the clock of the current attempt."""

    def __init__(self) -> None:
        self.inner: dict[int, dict[str, Any]] = {}
        self.valid: dict[int, dict[str, Any]] = {}
        self.estimates: dict[int, dict[str, float]] = {}
        self.last: tuple[float, float | None] = (0.0, None)  # (wall, line time) of a record
        self.resume: tuple[float, float] | None = None  # (wall, line time) of a checkpoint load

    def rewind(self, update: int, stamp: float | None) -> None:
        """A resumed attempt: forget what came after its checkpoint, restart the clock there.


        fairseq's own wall meter does not survive a resume (it reads 0 afterwards), so the wall
        clock of a resumed attempt is the wall at the checkpoint plus the log timestamps since.
        """
        self.inner = {u: r for u, r in self.inner.items() if u <= update}
        self.valid = {u: r for u, r in self.valid.items() if u <= update}
        self.estimates = {u: r for u, r in self.estimates.items() if u < update}
        walls = [(u, r["_wall"]) for u, r in [*self.inner.items(), *self.valid.items()]]
        wall = max((w for u, w in walls if u == max(u for u, _ in walls)), default=0.0)
        self.resume = (wall, stamp) if stamp is not None else None

    def wall(self, record_wall: float, stamp: float | None) -> float:
        """Wall clock of a record: fairseq's, else (validation, resumed attempt) from the log
        timestamps, counted from the last record or from the checkpoint load."""
        if self.resume is not None and stamp is not None:
            return self.resume[0] + stamp - self.resume[1]
        if not math.isnan(record_wall):
            return record_wall
        if stamp is not None and self.last[1] is not None:
            return self.last[0] + stamp - self.last[1]
        return self.last[0]


def _exact_estimates(rows: list[dict[str, float]], estimates: dict[int, dict[str, float]]) -> None:
    """Replace the logged bias_hat / beta_hat by the task's own estimate lines where there are
    any: fairseq logs them rounded to 4 decimals (a fixed-K bias of 1e-6 reads 0). A row at update
    u gets the last estimate made before it (the estimate at update e is made in update e + 1)."""
    if not estimates:
        return
    made = sorted(estimates)
    for row in rows:
        index = bisect.bisect_left(made, row["num_updates"]) - 1
        if index >= 0:
            row["bias_hat"] = estimates[made[index]]["bias_hat"]
            row["beta_hat"] = estimates[made[index]]["beta_hat"]


def parse_run(run_dir: Path) -> ParsedLog:
    """A run directory's trajectories: from its metrics records alone where they hold the
    training losses and validations (:func:`parse_records`), else :func:`parse_log` of its
    train.log and the records it has."""
    from atbptt.records import METRICS_FILE, read_records

    records = read_records(run_dir / "checkpoints" / METRICS_FILE)
    if records_are_complete(records):
        return parse_records(records)
    return parse_log((run_dir / "train.log").read_text(), records)


def records_are_complete(records: Sequence[dict[str, Any]]) -> bool:
    """Whether a run's records hold its training losses and validations: the run was recorded
    from its first update by a version that writes them (its update records have a loss)."""
    updates = [record for record in records if record.get("kind") == "update"]
    return bool(updates) and updates[0]["update"] == 0 and "loss" in updates[0]


def _estimate_row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_updates": int(record["update"]),
        "trunc_k": float(record["truncation_length"]),
        "bias_hat": float(record["relative_bias"]),
        "beta_hat": float(record["decay_rate"]),
        "fallback": record.get("fallback", ""),
    }


def parse_records(records: Sequence[dict[str, Any]]) -> ParsedLog:
    """Trajectories and totals of a run from its metrics records alone (see
    :func:`records_are_complete`): a training row per update, a validation row per validation of
    the first validated split, exact token counts and the estimates' seconds cumulated."""
    updates = [record for record in records if record.get("kind") == "update"]
    valid = [record for record in records if record.get("kind") == "valid"]
    valid = [record for record in valid if record["subset"] == valid[0]["subset"]]
    estimate_seconds = np.cumsum([float(record.get("est_sec", 0.0)) for record in updates])

    def seconds_after(num_updates: int) -> float:
        return float(estimate_seconds[num_updates - 1]) if num_updates > 0 else 0.0

    train_rows = [
        {
            "num_updates": record["update"] + 1,
            "wall": float_field(record, "wall"),
            "tokens": record["scored_tokens"],
            "processed_tokens": record["processed_tokens"],
            "est_sec": float(seconds),
            **{key: float_field(record, key) for key in ("trunc_k", "bias_hat", "beta_hat")},
            "loss": float_field(record, "loss"),
            "ppl": 2.0 ** float_field(record, "loss"),
        }
        for record, seconds in zip(updates, estimate_seconds, strict=True)
    ]
    valid_rows = [
        {
            "num_updates": record["num_updates"],
            "wall": float_field(record, "wall"),
            "tokens": record["scored_tokens"],
            "processed_tokens": record["processed_tokens"],
            "est_sec": seconds_after(record["num_updates"]),
            "valid_loss": float_field(record, "loss"),
            "valid_ppl": 2.0 ** float_field(record, "loss"),
        }
        for record in valid
    ]
    walls = [row["wall"] for row in train_rows + valid_rows if not math.isnan(row["wall"])]
    return ParsedLog(
        train=train_rows,
        valid=valid_rows,
        estimates=[_estimate_row(r) for r in records if r.get("kind") == "k_decision"],
        tokens=int(updates[-1]["scored_tokens"]),
        processed_tokens=float(updates[-1]["processed_tokens"]),
        est_sec=float(estimate_seconds[-1]),
        wall_sec=max(walls, default=math.nan),
        updates=int(updates[-1]["update"]) + 1,
    )


def parse_log(text: str, records: Sequence[dict[str, Any]] = ()) -> ParsedLog:
    """Parse fairseq-train output, possibly several appended attempts of a resumed run.


    A resumed attempt (``Loaded checkpoint ... @ N updates``) drops the records after update N
    that the interrupted attempt logged, and logs them anew. Tokens (``wpb`` x updates per
    train_inner interval) and estimation seconds are cumulated over the train_inner records.
    ``records``: the run's atbptt_metrics.jsonl (:mod:`atbptt.records`), where the decisions on
    K and the exact token counts come from; logs of runs from before it are parsed instead.
    """
    state = _LogState()
    exact_at_stop: dict[str, float] = {}
    for line in text.splitlines():
        stamp = _timestamp(line)
        if line.startswith("# sweep attempt"):
            state.resume = None
            continue
        stop = BUDGET_STOP_LINE.search(line)
        if stop is not None:
            exact_at_stop[stop.group(1)] = float(stop.group(2).replace(",", ""))
            continue
        loaded = LOADED_LINE.search(line)
        if loaded is not None:
            state.rewind(int(loaded.group(1)), stamp)
            continue
        decision = DECISION_LINE.search(line)
        if decision is not None:
            record = json.loads(decision.group(1))
            state.estimates[int(record["update"])] = _estimate_row(record)
            continue
        estimate = ESTIMATE_LINE.search(line)
        if estimate is not None and int(estimate.group(1)) not in state.estimates:
            update, k, bias, beta = estimate.groups()
            state.estimates[int(update)] = {
                "num_updates": int(update),
                "trunc_k": float(k),
                "bias_hat": float(bias),
                "beta_hat": float(beta),
            }
            continue
        parsed = json_record(line)
        if parsed is None or parsed[0] == "train":
            continue
        tag, record = parsed
        if tag == "valid":
            record["_wall"] = state.wall(math.nan, stamp)
            state.valid[int(float_field(record, "valid_num_updates"))] = record
        else:
            record["_wall"] = state.wall(float_field(record, "wall"), stamp)
            state.inner[int(float_field(record, "num_updates"))] = record
            state.last = (record["_wall"], stamp)

    decisions = [record for record in records if record.get("kind") == "k_decision"]
    if records:  # the run's own records replace what its log text said
        state.estimates = {int(record["update"]): _estimate_row(record) for record in decisions}
        last = [record for record in records if record.get("kind") == "update"][-1:]
        if last:
            exact_at_stop = {
                "scored": float(last[0]["scored_tokens"]),
                "processed": float(last[0]["processed_tokens"]),
            }
    tokens, processed, est, previous = {}, {}, {}, 0
    total_tokens = total_processed = total_est = 0.0
    for update in sorted(state.inner):
        record = state.inner[update]
        total_tokens += float_field(record, "wpb") * (update - previous)
        total_processed += float_field(record, "ppb") * (update - previous)
        total_est += np.nan_to_num(float_field(record, "est_sec"))
        tokens[update], est[update], previous = total_tokens, total_est, update
        processed[update] = total_processed
    tokens_at = _interpolate(tokens, extrapolate=True)
    processed_at = _interpolate(processed, extrapolate=True)
    est_at = _interpolate(est, extrapolate=False)

    train_rows = [
        {
            "num_updates": update,
            "wall": record["_wall"],
            "tokens": tokens_at(update),
            "processed_tokens": processed_at(update),
            "est_sec": est_at(update),
            **{key: float_field(record, key) for key in ("trunc_k", "bias_hat", "beta_hat")},
            "loss": float_field(record, "loss"),
            "ppl": float_field(record, "ppl"),
        }
        for update, record in sorted(state.inner.items())
    ]
    _exact_estimates(train_rows, state.estimates)
    valid_rows = [
        {
            "num_updates": update,
            "wall": record["_wall"],
            "tokens": tokens_at(update),
            "processed_tokens": processed_at(update),
            "est_sec": est_at(update),
            "valid_loss": float_field(record, "valid_loss"),
            "valid_ppl": 2.0 ** float_field(record, "valid_loss"),
        }
        for update, record in sorted(state.valid.items())
    ]
    updates = max([*state.inner, *state.valid, 0])
    walls = [row["wall"] for row in train_rows + valid_rows if not math.isnan(row["wall"])]
    return ParsedLog(
        train=train_rows,
        valid=valid_rows,
        estimates=[state.estimates[u] for u in sorted(state.estimates)],
        tokens=round(exact_at_stop.get("scored", tokens_at(updates))),
        processed_tokens=exact_at_stop.get("processed", processed_at(updates)),
        est_sec=est_at(updates),
        wall_sec=max(walls, default=math.nan),
        updates=updates,
    )


def parse_eval(text: str) -> tuple[float, float]:
    """``(loss in base 2, perplexity)`` from fairseq-eval-lm output; ppl = 2 ** loss (precise)."""
    matches = EVAL_LINE.findall(text)
    if not matches:
        raise ValueError("no 'Loss (base 2): X, Perplexity: Y' line in the fairseq-eval-lm output")
    loss = float(matches[-1][0])
    return loss, 2.0**loss


def training_finished(log_path: Path) -> bool:
    """Whether the last fairseq-train attempt logged in ``log_path`` ran to its end (for a sweep
    stopped after fairseq-train exited but before it wrote ``train_done.json``).

    Restarting a finished training would not be a no-op: fairseq would resume from
    checkpoint_last.pt and run one more update before noticing the budget is spent. fairseq's
    "done training" line is the one sign that its last validation and checkpoint were written:
    the metrics records reach the budget before those are.
    """
    if not log_path.is_file():
        return False
    last_attempt = log_path.read_text().rsplit("# sweep attempt ", 1)[-1]
    return DONE_LINE in last_attempt
