"""Sweep fixed truncation lengths K against target biases delta, over seeds, through fairseq.

Every run is a real ``fairseq-train`` (``--user-dir atbptt_fairseq --task adaptive_tbptt_lm``,
JSON logs) followed by ``fairseq-eval-lm`` on valid and test with the run's best checkpoint. All
runs share one budget: a number of updates (``--budget-updates N`` becomes ``--max-update N``) or
of scored training tokens (``--budget-tokens N`` becomes the task's ``--max-train-tokens N``; the
same data for every run, whatever K an adaptive run chooses, at the cost of unequal updates).

Fixed-K runs get ``--monitor-bias``, so delta_hat is logged for them as for adaptive runs.
Validation and a checkpoint happen every ``--valid-interval`` updates, at the end, and at fairseq
epoch ends (the plugin's epoch is one pass at K0, so a fixed-K run's epoch length depends on K;
epoch-end validation drives ``reduce_lr_on_plateau``). The best of these is evaluated.

Training options: ``--preset copy|ptb|wiki2`` takes the paper's settings from
``configs/<corpus>_fixed.yaml`` and ``_adaptive.yaml``, their grids included (the
``hydra.sweeper.params`` of ``-m``; copy: lr = 1.0 * sqrt(K) through ``--lr-scaling-reference 1``);
``bible-small`` is a 1 x 128 tied LSTM (batch 32) that trains in
minutes on 2 CPU cores. Options after ``--`` go to every fairseq-train and override the preset;
without a preset they are the whole setting (defaults: ``--arch tbptt_lstm_lm --criterion
tbptt_cross_entropy --optimizer tbptt_sgd``). A corpus with a ``targets/`` stream (the copy task)
gets ``--target-dir targets`` for training and evaluation. ``--threads 1`` suits small models.

    python scripts/sweep.py --preset copy --data data-bin/copy_var --out sweeps/copy \\
        --fixed 5,10,15,20,30 --deltas 0.9,0.5,0.1 --seeds 1,2,3 --budget-updates 4000
    python scripts/sweep.py --data data-bin/mine --out sweeps/mine --fixed 20,50 --deltas 0.1 \\
        --budget-updates 2000 -- --arch tbptt_lstm_lm_wiki2 --lr 20 --clip-norm 0.25 \\
        --batch-size 16 --estimate-window 200 --max-truncation-length 200

Layout of ``--out``:

    runs/<name>/train.log        fairseq-train output (appended when a run resumes)
    runs/<name>/checkpoints/     checkpoint_best.pt, checkpoint_last.pt (resume point)
    runs/<name>/eval_valid.log   fairseq-eval-lm output, likewise eval_test.log
    runs/<name>/trajectory.csv   per train_inner log line: num_updates, wall, tokens, trunc_k, ...
    runs/<name>/validation.csv   per validation: num_updates, wall, tokens, valid_loss, valid_ppl
    runs/<name>/result.json      written last and atomically: the run is finished and skipped
    results.csv                  one row per finished run (rewritten after every run)

Columns: ``tokens`` are scored target tokens (batch columns x K per update), summed as fairseq's
``wpb`` x updates over the train_inner log intervals (the few updates after the last log line at
the last ``wpb``); with the ``overlap`` style an update also reads K-1 context tokens per column,
not counted. ``wall_sec`` is fairseq's wall clock at the end of training (training, estimation,
validation, checkpoints; for a resumed run the wall at its checkpoint plus the log timestamps
since, as fairseq's meter restarts at 0); ``est_sec`` the estimation time within it (for fixed-K
runs: the cost of monitoring). Perplexities are 2 ** (base-2 loss), from fairseq-eval-lm at the
best validation checkpoint.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "atbptt_fairseq"
CONFIG_DIR = REPO / "configs"

TRAJECTORY_COLUMNS = (
    "num_updates",
    "wall",
    "tokens",
    "est_sec",
    "trunc_k",
    "bias_hat",
    "beta_hat",
    "loss",
    "ppl",
)
VALIDATION_COLUMNS = ("num_updates", "wall", "tokens", "est_sec", "valid_loss", "valid_ppl")
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
    "updates",
)

# options the sweep sets itself for every run; passing them after ``--`` is refused
CONTROLLED_OPTIONS = (
    "--user-dir",
    "--task",
    "--seed",
    "--save-dir",
    "--max-update",
    "--max-train-tokens",
    "--target-bias",
    "--monitor-bias",
    "--log-format",
    "--log-interval",
    "--tensorboard-logdir",
    "--validate-interval-updates",
    "--save-interval-updates",
)
# task options that change evaluation: copied from the training command to fairseq-eval-lm
EVAL_TASK_OPTIONS = ("--target-dir", "--eval-batch-size", "--eval-chunk-length")
EVAL_FLAGS = ("--cpu",)

BASE_TRAIN_ARGS = ["--arch", "tbptt_lstm_lm", "--criterion", "tbptt_cross_entropy"]
BASE_TRAIN_ARGS += ["--optimizer", "tbptt_sgd"]


# ------------------------------------------------------------------------------------ presets


@dataclass
class Preset:
    """Training arguments of one paper setting, for fixed-K and for adaptive runs."""

    fixed_args: list[str]
    adaptive_args: list[str]
    fixed_grid: str
    delta_grid: str
    description: str = ""


# keys of the hydra configs the sweep sets per run (or drops: the budget is the sweep's)
SWEEP_CONFIG_KEYS = {
    "data",
    "user_dir",
    "save_dir",
    "max_epoch",
    "seed",
    "log_format",
    "log_interval",
    "target_bias",
    "monitor_bias",
}
CONFIG_NAME_FLAGS = {
    "model": "--arch",
    "criterion": "--criterion",
    "optimizer": "--optimizer",
    "lr_scheduler": "--lr-scheduler",
}


def config_args(path: Path, keep_truncation_length: bool = True) -> list[str]:
    """Turn a hydra config of ``configs/`` into fairseq-train command-line options."""
    config = yaml.safe_load(path.read_text())
    args: list[str] = []
    for group, values in config.items():
        if group in ("hydra", "common", "checkpoint") or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key == "_name":
                if group in CONFIG_NAME_FLAGS:
                    args += [CONFIG_NAME_FLAGS[group], str(value)]
                continue
            if key in SWEEP_CONFIG_KEYS:
                continue
            if key == "truncation_length" and not keep_truncation_length:
                continue
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list):
                args += [flag, ",".join(str(item) for item in value)]
            else:
                args += [flag, str(value)]
    return args


def config_grid(path: Path, key: str) -> str:
    """The grid a hydra config of ``configs/`` sweeps with ``-m`` (``hydra.sweeper.params``)."""
    config = yaml.safe_load(path.read_text())
    return str(config["hydra"]["sweeper"]["params"][key]).replace(" ", "")


def _config_preset(corpus: str) -> Preset:
    fixed, adaptive = CONFIG_DIR / f"{corpus}_fixed.yaml", CONFIG_DIR / f"{corpus}_adaptive.yaml"
    return Preset(
        fixed_args=config_args(fixed, keep_truncation_length=False),
        adaptive_args=config_args(adaptive),
        fixed_grid=config_grid(fixed, "task.truncation_length"),
        delta_grid=config_grid(adaptive, "task.target_bias"),
        description=f"configs/{corpus}_fixed.yaml and configs/{corpus}_adaptive.yaml",
    )


BIBLE_SMALL_MODEL = [
    "--arch", "tbptt_lstm_lm", "--embed-dim", "128", "--hidden-size", "128", "--num-layers", "1",
    "--tie-embeddings", "--dropout", "0.1", "--criterion", "tbptt_cross_entropy",
    "--optimizer", "tbptt_sgd", "--lr", "10", "--clip-norm", "0.25", "--weight-decay", "1e-7",
    "--batch-size", "32", "--lr-scheduler", "fixed",
    "--estimate-window", "200", "--estimate-interval", "200", "--estimate-sequences", "32",
]  # fmt: skip


def get_preset(name: str) -> Preset:
    """The paper's settings by corpus (copy, ptb, wiki2) or a small CPU model (bible-small)."""
    if name in ("copy", "ptb", "wiki2"):
        return _config_preset(name)
    if name == "bible-small":
        return Preset(
            fixed_args=list(BIBLE_SMALL_MODEL),
            adaptive_args=BIBLE_SMALL_MODEL
            + ["--truncation-length", "35", "--min-truncation-length", "5"]
            + ["--max-truncation-length", "150", "--lr-scaling", "sqrt"],
            fixed_grid="5,10,20,35,70",
            delta_grid="0.9,0.5,0.1",
            description="1 x 128 tied LSTM, batch 32, SGD lr 10 (K0 35, W 200, K in [5, 150])",
        )
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")


PRESETS = ("copy", "ptb", "wiki2", "bible-small")


# ------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: a fixed K or a target bias delta, and a seed."""

    mode: str  # "fixed" or "adaptive"
    value: float  # K (fixed) or delta (adaptive)
    seed: int

    @property
    def config(self) -> str:
        """The configuration name shared by all seeds, e.g. ``fixed_k10`` or ``delta0.1``."""
        if self.mode == "fixed":
            return f"fixed_k{int(self.value)}"
        return f"delta{self.value:g}"

    @property
    def name(self) -> str:
        return f"{self.config}_s{self.seed}"


def plan_runs(fixed: Sequence[int], deltas: Sequence[float], seeds: Sequence[int]) -> list[RunSpec]:
    """The grid in run order: fixed K ascending, then delta descending, each over all seeds."""
    runs = [RunSpec("fixed", float(k), s) for k in sorted(fixed) for s in seeds]
    runs += [RunSpec("adaptive", float(d), s) for d in sorted(deltas, reverse=True) for s in seeds]
    return runs


@dataclass
class SweepSettings:
    """Everything a run needs besides its own K/delta and seed."""

    data: Path
    out: Path
    budget_updates: int  # 0 with a token budget
    valid_interval: int
    log_interval: int
    budget_tokens: int = 0  # 0 with an update budget
    preset: Preset | None = None
    extra_args: list[str] = field(default_factory=list)
    tensorboard_logdir: Path | None = None
    progress_seconds: float = 60.0
    threads: int = 0

    @property
    def budget_label(self) -> str:
        """``"4000 updates"`` or ``"50000000 tokens"``: what every run of the sweep gets."""
        if self.budget_tokens:
            return f"{self.budget_tokens} tokens"
        return f"{self.budget_updates} updates"

    @property
    def budget_args(self) -> list[str]:
        """The fairseq-train option that ends every run at the budget."""
        if self.budget_tokens:
            return ["--max-train-tokens", str(self.budget_tokens)]
        return ["--max-update", str(self.budget_updates)]

    @property
    def updates_of(self) -> str:
        """``"/N"`` after update numbers in progress lines under a budget of N updates; empty
        under a token budget, where the number of updates is not known in advance."""
        return "" if self.budget_tokens else f"/{self.budget_updates}"


def option_value(args: Sequence[str], option: str) -> str | None:
    """The last value given for ``option`` in an argument list (``--x v`` or ``--x=v``)."""
    value = None
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def check_extra_args(extra: Sequence[str]) -> None:
    """Refuse pass-through options that the sweep sets per run."""
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in CONTROLLED_OPTIONS:
            raise SystemExit(
                f"error: {name} is set by the sweep for every run; use the sweep's own options "
                "(--budget-updates or --budget-tokens, --seeds, --deltas, --valid-interval, "
                "--log-interval, --tensorboard-logdir, --out) instead"
            )


def target_dir_args(data: Path, args: Sequence[str]) -> list[str]:
    """``--target-dir targets`` when the corpus has a target stream and none was given."""
    if option_value(args, "--target-dir") is None and (data / "targets" / "dict.txt").is_file():
        return ["--target-dir", "targets"]
    return []


def without_option(args: Sequence[str], option: str) -> list[str]:
    """``args`` without any ``option value`` / ``option=value`` pair."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def train_command(spec: RunSpec, settings: SweepSettings, run_dir: Path) -> list[str]:
    """The fairseq-train command of one run: defaults, preset, pass-through, then the run's own
    options (where fairseq sees an option twice, the later one wins)."""
    preset = settings.preset
    args: list[str] = []
    if preset is not None:
        args += preset.fixed_args if spec.mode == "fixed" else preset.adaptive_args
    args += settings.extra_args
    defaults = [
        [option, value]
        for option, value in zip(BASE_TRAIN_ARGS[::2], BASE_TRAIN_ARGS[1::2])
        if option_value(args, option) is None
    ]
    args = [str(settings.data), *sum(defaults, []), *args]
    if spec.mode == "fixed":
        args = without_option(args, "--truncation-length")
        args += ["--truncation-length", str(int(spec.value)), "--monitor-bias"]
    else:
        args += ["--target-bias", f"{spec.value:g}"]
    args += target_dir_args(settings.data, args)
    interval = str(settings.valid_interval)
    args += [
        "--user-dir", str(PLUGIN_DIR),
        "--task", "adaptive_tbptt_lm",
        "--seed", str(spec.seed),
        *settings.budget_args,
        "--save-dir", str(run_dir / "checkpoints"),
        "--log-format", "json",
        "--log-interval", str(settings.log_interval),
        "--no-progress-bar",
        "--validate-interval-updates", interval,
        "--save-interval-updates", interval,
        "--keep-interval-updates", "1",
        "--no-epoch-checkpoints",
    ]  # fmt: skip
    if settings.tensorboard_logdir is not None:
        args += ["--tensorboard-logdir", str(settings.tensorboard_logdir / spec.name)]
    return ["fairseq-train", *args]


def eval_command(train_cmd: Sequence[str], checkpoint: Path, subset: str) -> list[str]:
    """fairseq-eval-lm on ``subset`` with the training command's data and evaluation options."""
    args = ["fairseq-eval-lm", train_cmd[1], "--user-dir", str(PLUGIN_DIR)]
    args += ["--task", "adaptive_tbptt_lm", "--path", str(checkpoint), "--gen-subset", subset]
    for option in EVAL_TASK_OPTIONS:
        value = option_value(train_cmd, option)
        if value is not None:
            args += [option, value]
    args += [flag for flag in EVAL_FLAGS if flag in train_cmd]
    return args


# ------------------------------------------------------------------------------- log parsing

TIMESTAMP = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
ESTIMATE_LINE = re.compile(r"update (\d+): K = (\d+) \(bias_hat ([^,\s]+), beta_hat ([^,\s]+)")
LOADED_LINE = re.compile(r"Loaded checkpoint .* \(epoch \d+ @ (\d+) updates\)")
DONE_LINE = "fairseq_cli.train | done training in "
EVAL_LINE = re.compile(r"Loss \(base 2\): ([0-9.eE+-]+), Perplexity: ([0-9.eE+-]+|inf)")


def json_record(line: str) -> tuple[str, dict[str, Any]] | None:
    """``(tag, record)`` of a fairseq JSON log line (simple or hydra format), else None."""
    for tag in ("train_inner", "valid", "train"):
        for marker in (f"| {tag} | ", f"[{tag}][INFO] - "):
            if marker in line:
                try:
                    return tag, json.loads(line.split(marker, 1)[1])
                except json.JSONDecodeError:
                    return None
    return None


def _float(record: dict[str, Any], key: str) -> float:
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


def parse_log(text: str) -> ParsedLog:
    """Parse fairseq-train output, possibly several appended attempts of a resumed run.

    A resumed attempt (``Loaded checkpoint ... @ N updates``) drops the records after update N
    that the interrupted attempt logged, and logs them anew. Tokens (``wpb`` x updates per
    train_inner interval) and estimation seconds are cumulated over the train_inner records.
    """
    state = _LogState()
    for line in text.splitlines():
        stamp = _timestamp(line)
        if line.startswith("# sweep attempt"):
            state.resume = None
            continue
        loaded = LOADED_LINE.search(line)
        if loaded is not None:
            state.rewind(int(loaded.group(1)), stamp)
            continue
        estimate = ESTIMATE_LINE.search(line)
        if estimate is not None:
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
            state.valid[int(_float(record, "valid_num_updates"))] = record
        else:
            record["_wall"] = state.wall(_float(record, "wall"), stamp)
            state.inner[int(_float(record, "num_updates"))] = record
            state.last = (record["_wall"], stamp)

    tokens, est, previous = {}, {}, 0
    total_tokens = total_est = 0.0
    for update in sorted(state.inner):
        record = state.inner[update]
        total_tokens += _float(record, "wpb") * (update - previous)
        total_est += np.nan_to_num(_float(record, "est_sec"))
        tokens[update], est[update], previous = total_tokens, total_est, update
    tokens_at = _interpolate(tokens, extrapolate=True)
    est_at = _interpolate(est, extrapolate=False)

    train_rows = [
        {
            "num_updates": update,
            "wall": record["_wall"],
            "tokens": tokens_at(update),
            "est_sec": est_at(update),
            **{key: _float(record, key) for key in ("trunc_k", "bias_hat", "beta_hat")},
            "loss": _float(record, "loss"),
            "ppl": _float(record, "ppl"),
        }
        for update, record in sorted(state.inner.items())
    ]
    _exact_estimates(train_rows, state.estimates)
    valid_rows = [
        {
            "num_updates": update,
            "wall": record["_wall"],
            "tokens": tokens_at(update),
            "est_sec": est_at(update),
            "valid_loss": _float(record, "valid_loss"),
            "valid_ppl": 2.0 ** _float(record, "valid_loss"),
        }
        for update, record in sorted(state.valid.items())
    ]
    updates = max([*state.inner, *state.valid, 0])
    walls = [row["wall"] for row in train_rows + valid_rows if not math.isnan(row["wall"])]
    return ParsedLog(
        train=train_rows,
        valid=valid_rows,
        estimates=[state.estimates[u] for u in sorted(state.estimates)],
        tokens=round(tokens_at(updates)),
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


# ------------------------------------------------------------------------------------ writers


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts) with the given columns, atomically; NaN and None become empty."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in columns})
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by :func:`write_csv`, numbers as floats (empty cells NaN)."""
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            converted: dict[str, Any] = {}
            for key, value in row.items():
                try:
                    converted[key] = float(value) if value != "" else math.nan
                except ValueError:
                    converted[key] = value
            rows.append(converted)
    return rows


def write_trajectories(run_dir: Path, parsed: ParsedLog) -> None:
    """``trajectory.csv`` (training log lines) and ``validation.csv`` of one run."""
    write_csv(run_dir / "trajectory.csv", TRAJECTORY_COLUMNS, parsed.train)
    write_csv(run_dir / "validation.csv", VALIDATION_COLUMNS, parsed.valid)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_results(out: Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished run under ``out/runs``, in grid order."""
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    order = {"fixed": 0, "adaptive": 1}
    return sorted(
        results,
        key=lambda r: (
            order.get(r["mode"], 2),
            (r.get("k") or 0) if r["mode"] == "fixed" else -(r.get("delta") or 0),
            r["seed"],
        ),
    )


def write_results(out: Path) -> Path:
    """Rewrite ``out/results.csv`` from the finished runs; return its path."""
    path = out / "results.csv"
    write_csv(path, RESULT_COLUMNS, load_results(out))
    return path


def summarize_run(
    spec: RunSpec, parsed: ParsedLog, valid: tuple[float, float], test: tuple[float, float]
) -> dict[str, Any]:
    """The result record of a finished run (one row of results.csv)."""
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
        "k": int(spec.value) if spec.mode == "fixed" else None,
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
        "updates": parsed.updates,
    }


# ------------------------------------------------------------------------------------ running


def say(message: str) -> None:
    """One progress line on stdout."""
    print(message, flush=True)


def fmt_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def child_env(threads: int = 0) -> dict[str, str]:
    """Environment of the fairseq subprocesses: this interpreter's bin first on PATH and, if
    ``threads`` > 0, that many intra-op threads (OMP/MKL_NUM_THREADS)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


class RunFailed(RuntimeError):
    """A fairseq subprocess of a run exited with an error."""


def _progress_line(
    name: str, tag: str, record: dict[str, Any], of: str, train: dict[str, Any]
) -> str:
    """A short progress line from a valid or train_inner record (``train``: the last one;
    ``of``: ``"/N"`` after the update number under a budget of N updates, else empty)."""
    parts = [f"K {train.get('trunc_k', '?')}"]
    if "bias_hat" in train:
        parts.append(f"delta_hat {train['bias_hat']}")
    if tag == "valid":
        loss = _float(record, "valid_loss")
        head = f"valid @ {record.get('valid_num_updates')}{of}: ppl {2.0**loss:.4g}"
    else:
        head = f"update {record.get('num_updates')}{of}: train loss {record.get('loss')}"
        parts.append(f"wall {fmt_seconds(_float(record, 'wall'))}")
    return f"    [{name}] {head} ({', '.join(parts)})"


def run_train(
    cmd: Sequence[str],
    log_path: Path,
    name: str,
    of: str,
    progress_seconds: float,
    threads: int = 0,
) -> None:
    """Run fairseq-train, appending its output to ``log_path``; print validations as they come
    and at most one training line every ``progress_seconds``."""
    last_shown = time.monotonic()
    last_train: dict[str, Any] = {}
    with log_path.open("a") as log:
        stamp = datetime.now().isoformat(timespec="seconds")
        log.write(f"# sweep attempt {stamp}: {' '.join(cmd)}\n")
        log.flush()
        process = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(threads),
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log.write(line)
                parsed = json_record(line)
                if parsed is None:
                    continue
                tag, record = parsed
                now = time.monotonic()
                if tag == "train_inner":
                    last_train = record
                    if now - last_shown < progress_seconds:
                        continue
                if tag in ("train_inner", "valid"):
                    say(_progress_line(name, tag, record, of, last_train))
                    last_shown = now
        except BaseException:
            process.terminate()
            process.wait()
            raise
        code = process.wait()
    if code != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise RunFailed(f"fairseq-train exited {code}; end of {log_path}:\n" + "\n".join(tail))


def run_evals(cmds: dict[str, list[str]], run_dir: Path) -> dict[str, tuple[float, float]]:
    """Run the fairseq-eval-lm commands side by side, sharing the cores; parse their results."""
    env = child_env(max(1, (os.cpu_count() or 2) // len(cmds)))
    processes = {}
    for subset, cmd in cmds.items():
        log = (run_dir / f"eval_{subset}.log").open("w")
        log.write(f"# {' '.join(cmd)}\n")
        log.flush()
        processes[subset] = (
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env),
            log,
        )
    results = {}
    for subset, (process, log) in processes.items():
        code = process.wait()
        log.close()
        text = (run_dir / f"eval_{subset}.log").read_text()
        if code != 0:
            tail = "\n".join(text.splitlines()[-15:])
            raise RunFailed(f"fairseq-eval-lm on {subset} exited {code}:\n{tail}")
        results[subset] = parse_eval(text)
    return results


def training_finished(log_path: Path) -> bool:
    """Whether the last fairseq-train attempt logged in ``log_path`` ran to its end.

    Restarting a finished training would not be a no-op: fairseq would resume from
    checkpoint_last.pt and run one more update before noticing the budget is spent.
    """
    if not log_path.is_file():
        return False
    last_attempt = log_path.read_text().rsplit("# sweep attempt ", 1)[-1]
    return DONE_LINE in last_attempt


def run_one(spec: RunSpec, settings: SweepSettings) -> tuple[dict[str, Any], bool]:
    """Train, evaluate and summarize one run; ``(result, skipped)``.

    A run with a ``result.json`` is skipped. Otherwise fairseq-train resumes from the run's
    ``checkpoint_last.pt`` if an earlier attempt left one (it starts afresh if not); a
    ``train_done.json`` marks training as complete so that only the evaluation is redone.
    """
    run_dir = settings.out / "runs" / spec.name
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text()), True
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(spec, settings, run_dir)
    done_path = run_dir / "train_done.json"
    if not done_path.is_file() and not training_finished(run_dir / "train.log"):
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        run_train(
            cmd,
            run_dir / "train.log",
            spec.name,
            settings.updates_of,
            settings.progress_seconds,
            settings.threads,
        )
        write_json(done_path, {"command": cmd})
    parsed = parse_log((run_dir / "train.log").read_text())
    write_trajectories(run_dir, parsed)
    best = run_dir / "checkpoints" / "checkpoint_best.pt"
    if not best.is_file():
        raise RunFailed(f"{best} is missing: training saved no checkpoint")
    scores = run_evals({s: eval_command(cmd, best, s) for s in ("valid", "test")}, run_dir)
    result = summarize_run(spec, parsed, scores["valid"], scores["test"])
    result["budget"] = settings.budget_label
    write_json(result_path, result)
    return result, False


def run_sweep(specs: Sequence[RunSpec], settings: SweepSettings, keep_going: bool = False) -> int:
    """Run the grid in order with start/finish lines and an ETA; return the number of failures."""
    settings.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    durations: list[float] = []
    failures = 0
    for index, spec in enumerate(specs, 1):
        head = f"run {index}/{len(specs)} {spec.name}"
        remaining = len(specs) - index + 1
        eta = np.mean(durations) * remaining if durations else math.nan
        run_start = time.monotonic()
        if not (settings.out / "runs" / spec.name / "result.json").is_file():
            say(
                f"{head}: start (elapsed {fmt_seconds(run_start - started)}, "
                f"ETA {fmt_seconds(eta)})"
            )
        try:
            result, skipped = run_one(spec, settings)
        except RunFailed as error:
            failures += 1
            say(f"{head}: FAILED after {fmt_seconds(time.monotonic() - run_start)}\n{error}")
            if not keep_going:
                break
            continue
        if skipped:
            say(f"{head}: finished earlier, skipped (test ppl {result['test_ppl']:.4g})")
            budget = result.get("budget") or f"{result.get('budget_updates')} updates"
            if budget != settings.budget_label:
                say(
                    f"    warning: {spec.name} was run with a budget of {budget}, not "
                    f"{settings.budget_label}; use another --out to compare budgets"
                )
            continue
        durations.append(time.monotonic() - run_start)
        write_results(settings.out)
        eta = np.mean(durations) * (len(specs) - index)
        say(
            f"{head}: done in {fmt_seconds(durations[-1])}: valid ppl {result['valid_ppl']:.4g}, "
            f"test ppl {result['test_ppl']:.4g}, final K {result['final_k']:g}, "
            f"delta_hat {result['final_bias_hat']:.3g} "
            f"(elapsed {fmt_seconds(time.monotonic() - started)}, ETA {fmt_seconds(eta)})"
        )
    path = write_results(settings.out)
    say(f"results: {path} ({len(load_results(settings.out))} finished runs)")
    return failures


# ---------------------------------------------------------------------------------------- CLI


def parse_numbers(text: str, kind: Callable[[str], Any]) -> list[Any]:
    """``"5,10,15"`` -> ``[5, 10, 15]``; an empty string or ``none`` -> ``[]``."""
    if text.strip().lower() in ("", "none"):
        return []
    return [kind(item) for item in text.split(",") if item.strip()]


def default_log_interval(valid_interval: int, budget: int) -> int:
    """About 5 log lines per validation interval, at a divisor of both the validation interval
    and the budget, so that every validation and the end of training fall on a log line."""
    step = math.gcd(valid_interval, budget)
    target = max(1, valid_interval // 5)
    return max(d for d in range(1, min(target, step) + 1) if step % d == 0)


def token_count(text: str) -> int:
    """A whole number of tokens, also written as ``5e7``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"not a whole number of tokens: {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Options after -- go to every fairseq-train (model, optimizer, lr, batch size, "
        "estimate options ...); they override the preset.",
    )
    parser.add_argument("--data", type=Path, required=True, help="binarized corpus directory")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (resumable)")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="training settings: copy, ptb, wiki2 (the paper's, from configs/*.yaml) or "
        "bible-small (1 x 128 tied LSTM that trains in minutes on 2 CPU cores)",
    )
    parser.add_argument(
        "--fixed",
        default=None,
        help="fixed K values, comma-separated; none: no fixed-K runs (default: the preset's)",
    )
    parser.add_argument(
        "--deltas",
        default=None,
        help="target biases delta, comma-separated; none: no adaptive runs (default: the "
        "preset's, 0.9,0.5,0.1)",
    )
    parser.add_argument("--seeds", default="1", help="seeds, comma-separated (default 1)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-updates",
        type=int,
        default=0,
        help="updates per run, the same for every run (fairseq --max-update)",
    )
    budget.add_argument(
        "--budget-tokens",
        type=token_count,
        default=0,
        help="scored training tokens per run, the same for every run (the task's "
        "--max-train-tokens): equal data whatever K the runs use; needs --valid-interval",
    )
    parser.add_argument(
        "--valid-interval",
        type=int,
        default=0,
        help="validate and checkpoint every this many updates (default with --budget-updates: "
        "budget / 10)",
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=0,
        help="fairseq train_inner log interval in updates (default: about valid interval / 5)",
    )
    parser.add_argument(
        "--tensorboard-logdir",
        type=Path,
        default=None,
        help="also write TensorBoard logs, one subdirectory per run",
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=60.0,
        help="print a run's training progress at most this often (validations always)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of each fairseq-train (OMP_NUM_THREADS); 0: leave as is. Small "
        "models such as the copy task's run fastest with 1",
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="go on with the next run when one fails"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and their commands, run nothing"
    )
    return parser


def check_out_dir(path: Path, option: str = "--out", create: bool = True) -> None:
    """End with one ``error:`` line unless files can be written into the directory ``path``.

    With ``create`` the directory is made (parents too) and an unnamed probe file is written and
    dropped in it, which also catches a read-only file system; without, only a file in the way is
    caught (a dry run writes nothing).
    """
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise SystemExit(f"error: {option} {path} {where}; choose another {option}")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise SystemExit(
            f"error: cannot write into {option} {path}: {error.strerror or error}; choose "
            f"another {option}"
        ) from None


def settings_from_args(args: argparse.Namespace, extra: list[str]) -> SweepSettings:
    """Check the options and build the shared run settings."""
    if (
        args.budget_updates < 0
        or args.budget_tokens < 0
        or not (args.budget_updates or args.budget_tokens)
    ):
        raise SystemExit(
            "error: the budget (--budget-updates or --budget-tokens) must be at least 1"
        )
    if args.budget_tokens and not args.valid_interval:
        raise SystemExit(
            "error: --budget-tokens needs --valid-interval (updates between validations): the "
            "number of updates a run takes depends on its K"
        )
    if not (args.data / "dict.txt").is_file():
        raise SystemExit(f"error: {args.data} holds no dict.txt; give a fairseq-preprocess output")
    check_extra_args(extra)
    valid_interval = args.valid_interval or max(1, args.budget_updates // 10)
    # a token budget ends at an update no one knows in advance: log lines divide the interval
    log_span = args.budget_updates or valid_interval
    return SweepSettings(
        data=args.data.resolve(),
        out=args.out.resolve(),
        budget_updates=args.budget_updates,
        budget_tokens=args.budget_tokens,
        valid_interval=valid_interval,
        log_interval=args.log_interval or default_log_interval(valid_interval, log_span),
        preset=get_preset(args.preset) if args.preset else None,
        extra_args=extra,
        tensorboard_logdir=args.tensorboard_logdir.resolve() if args.tensorboard_logdir else None,
        progress_seconds=args.progress_seconds,
        threads=args.threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the sweep; exit status 1 if a run failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args, extra)
    preset = settings.preset
    fixed_text = args.fixed if args.fixed is not None else preset.fixed_grid if preset else ""
    delta_text = args.deltas if args.deltas is not None else preset.delta_grid if preset else ""
    fixed, deltas = parse_numbers(fixed_text, int), parse_numbers(delta_text, float)
    if any(not 0 < d < 1 for d in deltas) or any(k < 1 for k in fixed):
        raise SystemExit("error: deltas must lie in (0, 1) and fixed K values be at least 1")
    specs = plan_runs(fixed, deltas, parse_numbers(args.seeds, int))
    if not specs:
        raise SystemExit("error: nothing to run; give --fixed and/or --deltas (or a --preset)")
    say(
        f"sweep: {len(specs)} runs ({len(fixed)} fixed K, {len(deltas)} deltas, seeds "
        f"{args.seeds}), {settings.budget_label} each, validation every "
        f"{settings.valid_interval}, into {settings.out}"
    )
    if preset is not None:
        say(f"preset {args.preset}: {preset.description}")
    check_out_dir(settings.out, create=not args.dry_run)
    if args.dry_run:
        for spec in specs:
            say(" ".join(train_command(spec, settings, settings.out / "runs" / spec.name)))
        return 0
    # SIGTERM ends the sweep like Ctrl-C: the running fairseq child is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return 1 if run_sweep(specs, settings, keep_going=args.keep_going) else 0


if __name__ == "__main__":
    sys.exit(main())
