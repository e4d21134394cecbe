"""Sweep fixed truncation lengths K against target biases delta, and other gradient estimators,
over seeds, through fairseq.

Details: docs/scripts.md, section scripts/sweep.py.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import ctypes
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import yaml
from atbptt_fairseq.experiments.fairseq_process import PLUGIN_DIR, REPO, child_env, json_record  # noqa: F401  (sweep.child_env: demo)

CONFIG_DIR = REPO / "configs"

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

# options the sweep sets itself for every run; passing them after ``--`` is refused
CONTROLLED_OPTIONS = (
    "--user-dir",
    "--task",
    "--seed",
    "--save-dir",
    "--max-update",
    "--max-train-tokens",
    "--max-processed-tokens",
    "--target-bias",
    "--monitor-bias",
    "--log-format",
    "--log-interval",
    "--tensorboard-logdir",
    "--validate-interval-updates",
    "--save-interval-updates",
    "--validate-interval-processed-tokens",
    "--gradient-estimator",
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
    """Turn a hydra config of ``configs/`` into fairseq-train options."""
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
    """The grid a hydra config of ``configs/`` sweeps with ``-m``
    (``hydra.sweeper.params``)."""
    config = yaml.safe_load(path.read_text())
    return str(config["hydra"]["sweeper"]["params"][key]).replace(" ", "")


def _config_preset(corpus: str) -> Preset:
    fixed, adaptive = CONFIG_DIR / f"{corpus}_fixed.yaml", CONFIG_DIR / f"{corpus}_adaptive.yaml"
    return Preset(
        fixed_args=config_args(fixed, keep_truncation_length=False),
        adaptive_args=config_args(adaptive),
        fixed_grid=config_grid(fixed, "task.truncation_length"),
        delta_grid=config_grid(adaptive, "task.target_bias"),
        description=f"configs/{corpus}_fixed.yaml and _adaptive.yaml",
    )


BIBLE_SMALL_MODEL = [
    "--arch", "tbptt_lstm_lm", "--embed-dim", "128", "--hidden-size", "128", "--num-layers", "1",
    "--tie-embeddings", "--dropout", "0.1", "--criterion", "tbptt_cross_entropy",
    "--optimizer", "tbptt_sgd", "--lr", "10", "--clip-norm", "0.25", "--weight-decay", "1e-7",
    "--batch-size", "32", "--lr-scheduler", "fixed",
    "--estimate-window", "200", "--estimate-interval", "200", "--estimate-sequences", "32",
]  # fmt: skip


def get_preset(name: str) -> Preset:
    """The paper's settings by corpus (copy, ptb, wiki2; bible: the language-model protocol on the
    King James Bible with a 1 x 128 model) or a small CPU model (bible-small)."""
    if name in ("copy", "ptb", "wiki2", "bible"):
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


PRESETS = ("copy", "ptb", "wiki2", "bible", "bible-small")


# ------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: a fixed K, a target bias delta, or a gradient estimator
    (``--gradient-estimator method`` at K, on the sweep's model or on ``arch``), and a seed."""

    mode: str  # "fixed", "adaptive" or "estimator"
    value: float  # K (fixed, estimator) or delta (adaptive)
    seed: int
    method: str = "tbptt"  # the task's --gradient-estimator
    arch: str = ""  # an estimator run's own --arch; empty: the sweep's model

    @property
    def config(self) -> str:
        """The configuration name shared by all seeds, e.g. ``fixed_k10``, ``delta0.1``,
        ``uoro_k15`` or ``tbptt_on_tbptt_lstm_lm_tiny_k15``."""
        if self.mode == "fixed":
            return f"fixed_k{int(self.value)}"
        if self.mode == "estimator":
            on = f"_on_{self.arch}" if self.arch else ""
            return f"{self.method}{on}_k{int(self.value)}"
        return f"delta{self.value:g}"

    @property
    def name(self) -> str:
        return f"{self.config}_s{self.seed}"


@dataclass(frozen=True)
class EstimatorSpec:
    """One ``METHOD[@ARCH]`` of ``--estimators``; ``arch`` empty: the sweep's model."""

    method: str
    arch: str = ""


def plan_runs(
    fixed: Sequence[int],
    deltas: Sequence[float],
    seeds: Sequence[int],
    estimators: Sequence[EstimatorSpec] = (),
    estimator_length: int = 0,
) -> list[RunSpec]:
    """The grid in run order: fixed K ascending, then delta descending, then the estimators as
    given (each at K = ``estimator_length``), each over all seeds."""
    runs = [RunSpec("fixed", float(k), s) for k in sorted(fixed) for s in seeds]
    runs += [RunSpec("adaptive", float(d), s) for d in sorted(deltas, reverse=True) for s in seeds]
    runs += [
        RunSpec("estimator", float(estimator_length), s, spec.method, spec.arch)
        for spec in estimators
        for s in seeds
    ]
    return runs


def plugin_choices() -> tuple[list[str], list[str]]:
    """The task's ``--gradient-estimator`` values and the plugin's registered ``--arch`` names,
    read from the plugin the runs train with (``--user-dir``: this checkout's, as fairseq puts
    it first on the path). Imports fairseq: only called to check ``--estimators``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from fairseq.models import ARCH_MODEL_REGISTRY

    import atbptt_fairseq  # noqa: F401  (registers the plugin's models with fairseq)
    from atbptt_fairseq.tasks.config import GRADIENT_ESTIMATOR_CHOICES

    archs = sorted(
        name
        for name, model in ARCH_MODEL_REGISTRY.items()
        if model.__module__.startswith("atbptt_fairseq.")
    )
    return [str(choice) for choice in GRADIENT_ESTIMATOR_CHOICES], archs


def parse_estimators(
    text: str, methods: Sequence[str], archs: Sequence[str], default_arch: str
) -> list[EstimatorSpec]:
    """``"uoro,tbptt@tbptt_lstm_copy"`` -> the estimator specs, checked; one ``error:`` line for
    an empty spec, an unknown method or architecture, ``@`` without an architecture, two specs
    that train the same runs, or ``tbptt`` on the sweep's model (a ``--fixed`` run). An
    ``@ARCH`` naming the sweep's model (``default_arch``) is dropped: the spec without it."""
    if text.strip().lower() in ("", "none"):
        return []
    specs: dict[EstimatorSpec, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise SystemExit(
                f"error: --estimators {text!r} holds an empty spec; give METHOD[@ARCH] between "
                "the commas"
            )
        method, at, arch = item.partition("@")
        if method not in methods:
            raise SystemExit(
                f"error: unknown gradient estimator {method!r} in --estimators spec {item!r}; "
                f"choose from {', '.join(methods)}"
            )
        if at and not arch:
            raise SystemExit(
                f"error: --estimators spec {item!r} has '@' but no architecture; give "
                f"{method}@ARCH (a fairseq --arch) or {method} alone for the sweep's model "
                f"({default_arch})"
            )
        if arch and arch not in archs:
            raise SystemExit(
                f"error: unknown architecture {arch!r} in --estimators spec {item!r}; the "
                f"plugin's are {', '.join(archs)}"
            )
        spec = EstimatorSpec(method, "" if arch == default_arch else arch)
        if spec.method == "tbptt" and not spec.arch:
            raise SystemExit(
                f"error: --estimators spec {item!r} is fixed-K TBPTT on the sweep's model "
                f"({default_arch}), which --fixed runs; give --fixed K, or tbptt@ARCH for another "
                "architecture"
            )
        if spec in specs:
            raise SystemExit(
                f"error: --estimators specs {specs[spec]!r} and {item!r} train the same runs (the "
                f"sweep's model is {default_arch}); give each once"
            )
        specs[spec] = item
    return list(specs)


@dataclass
class SweepSettings:
    """Everything a run needs besides its own K/delta and seed."""

    data: Path
    out: Path
    budget_updates: int  # 0 with a token budget
    valid_interval: int
    log_interval: int
    budget_tokens: int = 0  # 0 with an update budget
    budget_processed_tokens: int = 0  # tokens run through the model, estimates included
    valid_processed_tokens: int = 0  # validate every this many processed tokens instead
    preset: Preset | None = None
    extra_args: list[str] = field(default_factory=list)
    tensorboard_logdir: Path | None = None
    progress_seconds: float = 60.0
    threads: int = 0
    jobs: int = 1  # runs trained at once
    rerun_changed: bool = False  # train runs recorded with another configuration again

    @property
    def budget_label(self) -> str:
        """``"4000 updates"`` or ``"50000000 tokens"``: what every run of the sweep gets."""
        if self.budget_tokens:
            return f"{self.budget_tokens} tokens"
        if self.budget_processed_tokens:
            return f"{self.budget_processed_tokens} processed tokens"
        return f"{self.budget_updates} updates"

    @property
    def budget_args(self) -> list[str]:
        """The fairseq-train option that ends every run at the budget."""
        if self.budget_tokens:
            return ["--max-train-tokens", str(self.budget_tokens)]
        if self.budget_processed_tokens:
            return ["--max-processed-tokens", str(self.budget_processed_tokens)]
        return ["--max-update", str(self.budget_updates)]

    @property
    def updates_of(self) -> str:
        """``"/N"`` after update numbers in progress lines under a budget of N updates; empty
        under a token budget, where the number of updates is not known in advance."""
        return f"/{self.budget_updates}" if self.budget_updates else ""


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
                "(--budget-updates or --budget-tokens, --seeds, --deltas, --estimators, "
                "--valid-interval, --log-interval, --tensorboard-logdir, --out) instead"
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


def once_each(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--option`` once, at its last place with its last value (what fairseq's
    parser does with a repeated option), so a recorded command reads as what ran. An option's
    values are the arguments after it up to the next ``--option``; leading positionals stay."""
    items: list[tuple[str | None, list[str]]] = []
    for arg in args:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            items = [item for item in items if item[0] != name]
            items.append((name, [arg]))
        elif items and items[-1][0] is not None:
            items[-1][1].append(arg)
        else:
            items.append((None, [arg]))
    return [arg for _, group in items for arg in group]


def setting_args(settings: SweepSettings, adaptive: bool) -> list[str]:
    """The preset's fixed-K or adaptive options, then the pass-through ones, then the defaults of
    what neither gives (``BASE_TRAIN_ARGS``)."""
    args: list[str] = []
    if settings.preset is not None:
        args += settings.preset.adaptive_args if adaptive else settings.preset.fixed_args
    args += settings.extra_args
    defaults = [
        [option, value]
        for option, value in zip(BASE_TRAIN_ARGS[::2], BASE_TRAIN_ARGS[1::2])
        if option_value(args, option) is None
    ]
    return [*sum(defaults, []), *args]


def sweep_arch(settings: SweepSettings) -> str:
    """The ``--arch`` of the sweep's model (fixed-K config: estimator runs train with it)."""
    return str(option_value(setting_args(settings, adaptive=False), "--arch"))


def initial_truncation_length(settings: SweepSettings) -> int:
    """K0: the ``--truncation-length`` the sweep's adaptive runs start at (the preset's adaptive
    config, or after ``--``), else the task's default (the default ``--estimator-length``)."""
    value = option_value(setting_args(settings, adaptive=True), "--truncation-length")
    if value is not None:
        return int(value)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from atbptt import TbpttConfig  # the task's options default as the core's

    return TbpttConfig().truncation_length


def train_command(spec: RunSpec, settings: SweepSettings, run_dir: Path) -> list[str]:
    """The fairseq-train command of one run: defaults, preset, pass-through, then the run's own
    options, each once (a later one replaces an earlier one, :func:`once_each`). Estimator runs
    take the preset's fixed-K options (no adaptive estimate: fairseq refuses --target-bias with
    them)."""
    args = [str(settings.data), *setting_args(settings, adaptive=spec.mode == "adaptive")]
    if spec.mode == "adaptive":
        args += ["--target-bias", f"{spec.value:g}"]
    else:
        args = without_option(args, "--truncation-length")
        args += ["--truncation-length", str(int(spec.value))]
    if spec.mode == "fixed":
        args += ["--monitor-bias"]
    if spec.mode == "estimator":
        if spec.arch:
            args = [*without_option(args, "--arch"), "--arch", spec.arch]
        args += ["--gradient-estimator", spec.method]
    args += target_dir_args(settings.data, args)
    interval = str(settings.valid_interval)
    if settings.valid_processed_tokens:
        validation = [
            "--validate-interval-processed-tokens", str(settings.valid_processed_tokens),
        ]  # fmt: skip
    else:
        validation = [
            "--validate-interval-updates", interval, "--save-interval-updates", interval,
        ]  # fmt: skip
    args += [
        "--user-dir", str(PLUGIN_DIR),
        "--task", "adaptive_tbptt_lm",
        "--seed", str(spec.seed),
        *settings.budget_args,
        "--save-dir", str(run_dir / "checkpoints"),
        "--log-format", "json",
        "--log-interval", str(settings.log_interval),
        "--no-progress-bar",
        *validation,
        "--keep-interval-updates", "1",
        "--no-epoch-checkpoints",
    ]  # fmt: skip
    if settings.tensorboard_logdir is not None:
        args += ["--tensorboard-logdir", str(settings.tensorboard_logdir / spec.name)]
    return ["fairseq-train", *once_each(args)]


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


# ------------------------------------------------------------------------------- run records

# the packages whose source is the code a run trains with
SOURCE_PACKAGES = ("atbptt", "atbptt_fairseq")
# options that only say where files go: a sweep directory moved elsewhere is the same sweep
LOCATION_OPTIONS = ("--save-dir", "--user-dir", "--tensorboard-logdir")


def code_version(repo: Path = REPO) -> dict[str, str | None]:
    """The code a run trains with: a sha256 over the plugin's and the method's Python sources
    (what decides whether runs are comparable) and, for people, the git commit if there is one."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"source_sha256": digest.hexdigest(), "git_commit": commit}


def data_identity(data: Path) -> dict[str, Any]:
    """What a data-bin holds, by content: a sha256 over its dictionaries and index files
    (``dict.txt`` and ``*.idx``, the target stream's under ``targets/`` too), so that a data-bin
    rebuilt in place with other text or another dictionary is not taken for the one a run was
    trained on. The ``.bin`` token files are left out (large); their ``.idx`` holds every
    sentence's size and offset."""
    digest = hashlib.sha256()
    files = sorted(
        path for path in data.rglob("*") if path.name == "dict.txt" or path.suffix == ".idx"
    )
    for path in files:
        digest.update(str(path.relative_to(data)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"sha256": digest.hexdigest(), "files": len(files)}


def command_options(cmd: Sequence[str]) -> dict[str, str]:
    """A fairseq-train command as ``{option: value}`` (the last value where an option repeats, as
    fairseq reads it; ``"set"`` for a flag), the data path under ``data``; locations left out."""
    options = {"data": cmd[1]}
    args = list(cmd[2:])
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, _, inline = arg.partition("=")
        if inline:
            options[name] = inline
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            options[name] = args[index + 1]
        else:
            options[name] = "set"
    for option in LOCATION_OPTIONS:
        options.pop(option, None)
    return options


def record_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two run records (``{"command": [...], "code": {...}, "data":
    {...}}``), e.g. ``--lr 1.0 -> 0.5``; a record without code or data identity (an older
    sweep's) is compared on what it has."""
    old, new = command_options(recorded["command"]), command_options(current["command"])
    differences = [
        f"{name} {old.get(name, 'unset')} -> {new.get(name, 'unset')}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]
    old_code, new_code = recorded.get("code"), current["code"]
    if old_code and old_code["source_sha256"] != new_code["source_sha256"]:
        differences.append(
            f"code {old_code['source_sha256'][:12]} -> {new_code['source_sha256'][:12]} "
            f"(commit {old_code.get('git_commit') or '?'} -> {new_code.get('git_commit') or '?'})"
        )
    old_data, new_data = recorded.get("data"), current.get("data")
    if old_data and new_data and old_data["sha256"] != new_data["sha256"]:
        differences.append(
            f"data content {old_data['sha256'][:12]} -> {new_data['sha256'][:12]} (the data-bin "
            "was rebuilt)"
        )
    return differences


def recorded_run(run_dir: Path) -> dict[str, Any] | None:
    """The record of what a run directory was trained with: ``run.json``, or for a run of an
    older sweep the ``command.txt`` it wrote (command only); None for a run not started."""
    if (run_dir / "run.json").is_file():
        return json.loads((run_dir / "run.json").read_text())
    if (run_dir / "command.txt").is_file():
        return {"command": (run_dir / "command.txt").read_text().split(), "code": None}
    return None


def changed_runs(
    specs: Sequence[RunSpec],
    settings: SweepSettings,
    code: dict[str, Any],
    data: dict[str, Any],
) -> dict[str, list[str]]:
    """The runs under ``--out`` recorded with another command, code or data, with what
    differs."""
    changed = {}
    for spec in specs:
        run_dir = settings.out / "runs" / spec.name
        recorded = recorded_run(run_dir)
        if recorded is None:
            continue
        current = {"command": train_command(spec, settings, run_dir), "code": code, "data": data}
        differences = record_differences(recorded, current)
        if differences:
            changed[spec.name] = differences
    return changed


def refuse_changed_runs(changed: dict[str, list[str]], out: Path) -> None:
    """One error line naming the first changed run, what differs, and how to go on."""
    first, differences = next(iter(changed.items()))
    others = f" (and {len(changed) - 1} more runs)" if len(changed) > 1 else ""
    raise SystemExit(
        f"error: run {first} in {out} was trained with another configuration{others}: "
        f"{'; '.join(differences)}; use another --out, or --rerun-changed to train such runs "
        f"again in fresh directories (the old ones move to {out / 'replaced'})"
    )


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[int | None]:
    """Hold the run's lock (``run_dir/lock``) while the block runs and yield its file descriptor,
    or None if another process holds it (a sweep, or a trainer of the run whose sweep is gone).

    The lock (``flock``) belongs to the open file, not to this process: the subprocesses of the
    run inherit the descriptor (``ChildProcesses.start(keep_fds=...)``), so the lock stays held
    for as long as anything trains or evaluates the run, and a rerun cannot train it twice."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield handle.fileno()


def move_aside(run_dir: Path, out: Path) -> Path:
    """Move a run directory to ``out/replaced/<name>-<time>``, out of results.csv's way."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    destination = out / "replaced" / f"{run_dir.name}-{stamp}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(destination))
    return destination


# ------------------------------------------------------------------------------- log parsing

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
    """:func:`parse_log` of a run directory's train.log and its metrics records."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from atbptt.records import METRICS_FILE, read_records

    records = read_records(run_dir / "checkpoints" / METRICS_FILE)
    return parse_log((run_dir / "train.log").read_text(), records)


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
            state.estimates[int(record["update"])] = {
                "num_updates": int(record["update"]),
                "trunc_k": float(record["truncation_length"]),
                "bias_hat": float(record["relative_bias"]),
                "beta_hat": float(record["decay_rate"]),
                "fallback": record.get("fallback", ""),
            }
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
            state.valid[int(_float(record, "valid_num_updates"))] = record
        else:
            record["_wall"] = state.wall(_float(record, "wall"), stamp)
            state.inner[int(_float(record, "num_updates"))] = record
            state.last = (record["_wall"], stamp)

    decisions = [record for record in records if record.get("kind") == "k_decision"]
    if records:  # the run's own records replace what its log text said
        state.estimates = {
            int(record["update"]): {
                "num_updates": int(record["update"]),
                "trunc_k": float(record["truncation_length"]),
                "bias_hat": float(record["relative_bias"]),
                "beta_hat": float(record["decay_rate"]),
                "fallback": record.get("fallback", ""),
            }
            for record in decisions
        }
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
        total_tokens += _float(record, "wpb") * (update - previous)
        total_processed += _float(record, "ppb") * (update - previous)
        total_est += np.nan_to_num(_float(record, "est_sec"))
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
            "processed_tokens": processed_at(update),
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


# ------------------------------------------------------------------------------------ writers


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts) with the given columns, atomically; NaN and None become empty."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_results(out: Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished run under ``out/runs``, in grid order (estimator
    runs last, by configuration name)."""
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    order = {"fixed": 0, "adaptive": 1, "estimator": 2}

    def position(result: dict[str, Any]) -> tuple[Any, ...]:
        if result["mode"] == "fixed":
            within: Any = result.get("k") or 0
        elif result["mode"] == "adaptive":
            within = -(result.get("delta") or 0)
        else:
            within = result["config"]
        return order.get(result["mode"], 3), within, result["seed"]

    return sorted(results, key=position)


def write_results(out: Path) -> Path:
    """Rewrite ``out/results.csv`` from the finished runs; return its path."""
    path = out / "results.csv"
    write_csv(path, RESULT_COLUMNS, load_results(out))
    return path


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


# ------------------------------------------------------------------------------------ running


_SAY_LOCK = threading.Lock()  # whole lines, whichever of the --jobs threads prints them


def say(message: str) -> None:
    """One progress line (or block of lines) on stdout, never interleaved with another."""
    with _SAY_LOCK:
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


class RunFailed(RuntimeError):
    """A fairseq subprocess of a run exited with an error."""


PR_SET_DEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread that started it
    ends (Linux's PR_SET_DEATHSIG; elsewhere nothing), so that ``kill -9`` of the sweep does not
    leave its fairseq-train running; a child whose parent is already gone exits at once."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return lambda: None

    def set_death_signal() -> None:
        prctl(PR_SET_DEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)

    return set_death_signal


class ChildProcesses:
    """The fairseq subprocesses the sweep has running (one run's, or ``--jobs`` runs'), so that
    stopping the sweep (Ctrl-C, SIGTERM) stops every one of them, not only the main thread's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(
        self, cmd: Sequence[str], keep_fds: Sequence[int] = (), **popen_args: Any
    ) -> subprocess.Popen:
        """Start ``cmd`` in a process group of its own that dies with the thread that starts it
        (:func:`die_with_parent`); ``keep_fds`` stay open in it (the run's lock)."""
        with self._lock:
            if self.stopping:
                raise RunFailed("the sweep is stopping")
            process = subprocess.Popen(
                list(cmd),
                process_group=0,
                # only prctl and getppid run between fork and exec (no locks, no imports)
                preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509
                pass_fds=tuple(keep_fds),
                **popen_args,
            )
            self._running.add(process)
        return process

    def wait(self, process: subprocess.Popen) -> int:
        code = process.wait()
        with self._lock:
            self._running.discard(process)
        return code

    def stop_all(self) -> None:
        """Terminate every running subprocess and start no more."""
        with self._lock:
            self.stopping = True
            for process in self._running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)


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
    children: ChildProcesses | None = None,
    lock_fd: int | None = None,
) -> None:
    """Run fairseq-train, appending its output to ``log_path``; print validations as they come
    and at most one training line every ``progress_seconds``. ``lock_fd``: the run's lock, which
    the trainer holds too (:func:`run_lock`)."""
    children = children or ChildProcesses()
    last_shown = time.monotonic()
    last_train: dict[str, Any] = {}
    with log_path.open("a") as log:
        stamp = datetime.now().isoformat(timespec="seconds")
        log.write(f"# sweep attempt {stamp}: {' '.join(cmd)}\n")
        log.flush()
        process = children.start(
            cmd,
            keep_fds=() if lock_fd is None else (lock_fd,),
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
            children.wait(process)
            raise
        code = children.wait(process)
    if code != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise RunFailed(f"fairseq-train exited {code}; end of {log_path}:\n" + "\n".join(tail))


def run_evals(
    cmds: dict[str, list[str]],
    run_dir: Path,
    cores: int = 0,
    children: ChildProcesses | None = None,
    lock_fd: int | None = None,
) -> dict[str, tuple[float, float]]:
    """Run the fairseq-eval-lm commands side by side, sharing ``cores`` (0: all of the
    machine's); parse their results."""
    children = children or ChildProcesses()
    env = child_env(max(1, (cores or os.cpu_count() or 2) // len(cmds)))
    processes = {}
    for subset, cmd in cmds.items():
        log = (run_dir / f"eval_{subset}.log").open("w")
        log.write(f"# {' '.join(cmd)}\n")
        log.flush()
        processes[subset] = (
            children.start(
                cmd,
                keep_fds=() if lock_fd is None else (lock_fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            ),
            log,
        )
    results = {}
    for subset, (process, log) in processes.items():
        code = children.wait(process)
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


def run_one(
    spec: RunSpec,
    settings: SweepSettings,
    code: dict[str, Any] | None = None,
    children: ChildProcesses | None = None,
    on_start: Callable[[], None] = lambda: None,
    data: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, str]:
    """Train, evaluate and summarize one run; ``(result, status)``, status ``"done"``,
    ``"skipped"`` (finished earlier) or ``"locked"`` (another sweep process is at it: result None).

    The run's lock is held throughout, by its subprocesses too. ``run.json`` records the
    command, ``code`` (default: :func:`code_version`) and ``data`` (default:
    :func:`data_identity`) before training starts; a run recorded with another configuration is
    refused, or with ``settings.rerun_changed`` moved aside and trained afresh. A run with a
    ``result.json`` is skipped. Otherwise fairseq-train resumes from the run's
    ``checkpoint_last.pt`` if an earlier attempt left one (it starts afresh if not); a
    ``train_done.json`` marks training as complete so that only the evaluation is redone.
    ``on_start`` is called before anything is trained or evaluated.
    """
    code = code or code_version()
    data = data or data_identity(settings.data)
    run_dir = settings.out / "runs" / spec.name
    with run_lock(run_dir) as lock_fd:
        if lock_fd is None:
            return None, "locked"
        cmd = train_command(spec, settings, run_dir)
        arch = option_value(cmd, "--arch") or ""
        # method and arch for people and plots; changes show in the command, which is compared
        record = {"command": cmd, "code": code, "data": data, "method": spec.method, "arch": arch}
        recorded = recorded_run(run_dir)
        differences = record_differences(recorded, record) if recorded is not None else []
        if differences and not settings.rerun_changed:
            raise RunFailed(
                f"{run_dir} was trained with another configuration: {'; '.join(differences)}"
            )
        if differences:
            moved = move_aside(run_dir, settings.out)
            say(f"    [{spec.name}] trained with another configuration: moved to {moved}")
            return run_one(spec, settings, code, children, on_start, data)
        result_path = run_dir / "result.json"
        if result_path.is_file():
            return json.loads(result_path.read_text()), "skipped"
        on_start()
        if not (run_dir / "run.json").is_file():
            write_json(run_dir / "run.json", record)
        done_path = run_dir / "train_done.json"
        if not done_path.is_file() and not training_finished(run_dir / "train.log"):
            run_train(
                cmd,
                run_dir / "train.log",
                spec.name,
                settings.updates_of,
                settings.progress_seconds,
                settings.threads,
                children,
                lock_fd,
            )
            write_json(done_path, {"command": cmd})
        parsed = parse_run(run_dir)
        write_trajectories(run_dir, parsed)
        best = run_dir / "checkpoints" / "checkpoint_best.pt"
        if not best.is_file():
            raise RunFailed(f"{best} is missing: training saved no checkpoint")
        evals = {subset: eval_command(cmd, best, subset) for subset in ("valid", "test")}
        cores = max(1, (os.cpu_count() or 2) // settings.jobs)
        scores = run_evals(evals, run_dir, cores, children, lock_fd)
        result = summarize_run(spec, parsed, scores["valid"], scores["test"], arch)
        result["budget"] = settings.budget_label
        write_json(result_path, result)
        return result, "done"


class SweepProgress:
    """Elapsed time, durations and failures of a sweep's runs, shared by its ``--jobs`` threads."""

    def __init__(self, total: int, jobs: int) -> None:
        self.total, self.jobs = total, jobs
        self.started = time.monotonic()
        self.durations: list[float] = []
        self.failures = 0
        self._lock = threading.Lock()

    def elapsed(self) -> str:
        return fmt_seconds(time.monotonic() - self.started)

    def eta(self, remaining: int) -> str:
        """Time for ``remaining`` runs at the mean duration so far, ``jobs`` at a time."""
        with self._lock:
            mean = np.mean(self.durations) if self.durations else math.nan
        return fmt_seconds(mean * remaining / self.jobs)

    def finished(self, seconds: float) -> None:
        with self._lock:
            self.durations.append(seconds)

    def failed(self) -> None:
        with self._lock:
            self.failures += 1


def run_sweep(specs: Sequence[RunSpec], settings: SweepSettings, keep_going: bool = False) -> int:
    """Run the grid in order, ``settings.jobs`` runs at a time, with start/finish lines and an
    ETA; return the number of failures.

    Refuses (one line, nothing started) if a run under ``--out`` was recorded with another
    configuration, unless ``settings.rerun_changed``. A run that another sweep process holds
    (its lock) is left to that process. After a failure no new run starts unless ``keep_going``.
    """
    settings.out.mkdir(parents=True, exist_ok=True)
    code, data = code_version(), data_identity(settings.data)
    changed = changed_runs(specs, settings, code, data)
    if changed and not settings.rerun_changed:
        refuse_changed_runs(changed, settings.out)
    progress = SweepProgress(len(specs), settings.jobs)
    children = ChildProcesses()
    stop = threading.Event()

    def work(index: int, spec: RunSpec) -> None:
        if stop.is_set():
            return
        head = f"run {index}/{len(specs)} {spec.name}"
        run_start = time.monotonic()

        def announce() -> None:
            say(
                f"{head}: start (elapsed {progress.elapsed()}, "
                f"ETA {progress.eta(len(specs) - index + 1)})"
            )

        try:
            result, status = run_one(spec, settings, code, children, announce, data)
        except RunFailed as error:
            if children.stopping:
                return
            progress.failed()
            say(f"{head}: FAILED after {fmt_seconds(time.monotonic() - run_start)}\n{error}")
            if not keep_going:
                stop.set()
            return
        if status == "locked":
            say(f"{head}: another sweep process is running it (its lock is held), skipped")
        elif status == "skipped":
            say(f"{head}: finished earlier, skipped (test ppl {result['test_ppl']:.4g})")
        else:
            duration = time.monotonic() - run_start
            progress.finished(duration)
            write_results(settings.out)
            bias = result["final_bias_hat"]  # none without an estimate (estimator runs)
            say(
                f"{head}: done in {fmt_seconds(duration)}: valid ppl "
                f"{result['valid_ppl']:.4g}, test ppl {result['test_ppl']:.4g}, final K "
                f"{result['final_k']:g}"
                + ("" if math.isnan(bias) else f", delta_hat {bias:.3g}")
                + f" (elapsed {progress.elapsed()}, ETA {progress.eta(len(specs) - index)})"
            )

    with ThreadPoolExecutor(max_workers=settings.jobs, thread_name_prefix="run") as pool:
        futures = [pool.submit(work, index, spec) for index, spec in enumerate(specs, 1)]
        try:
            for future in futures:
                future.result()
        except BaseException:  # Ctrl-C, SIGTERM: stop every run's fairseq process too
            stop.set()
            children.stop_all()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    path = write_results(settings.out)
    say(f"results: {path} ({len(load_results(settings.out))} finished runs)")
    return progress.failures


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
        help="training settings: copy, ptb, wiki2 (the paper's, from "
        "configs/*.yaml) or "
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
    parser.add_argument(
        "--estimators",
        default="none",
        metavar="SPEC[,SPEC...]",
        help="gradient estimators to train too, SPEC = METHOD[@ARCH]: a --gradient-estimator "
        "of the task (artbp, uoro, ...) on the sweep's model, or on the fairseq --arch ARCH; "
        "tbptt@ARCH is fixed-K TBPTT on ARCH (an anchor for methods tied to an architecture). "
        "Each at K = --estimator-length with the preset's fixed-K options, the same budget and "
        "validations (default: none)",
    )
    parser.add_argument(
        "--estimator-length",
        type=int,
        default=0,
        help="the --truncation-length of the --estimators runs (ARTBP: the mean segment length) "
        "(default: K0, the truncation length the adaptive runs start at: the preset's adaptive "
        "config, or the one given after --)",
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
    budget.add_argument(
        "--budget-processed-tokens",
        type=token_count,
        default=0,
        help="tokens run through the model per run, training windows and estimates included, "
        "the same for every run (the task's --max-processed-tokens): equal compute whatever K "
        "the runs use; validation every --valid-tokens",
    )
    parser.add_argument(
        "--valid-tokens",
        type=token_count,
        default=0,
        help="with --budget-processed-tokens: validate and checkpoint every this many processed "
        "tokens, so runs of every K validate at the same compute (default: budget / 20)",
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
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each a fairseq-train of --threads threads (e.g. --jobs 2 "
        "--threads 1 on 2 cores). Several sweep processes may also share one --out: a run "
        "one of them is training is locked, and the others move on",
    )
    parser.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train again, in a fresh run directory, every run that --out holds with another "
        "command (data, options, budget) or code; the old directory moves to <out>/replaced/. "
        "Without it such a sweep is refused",
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
    budgets = (args.budget_updates, args.budget_tokens, args.budget_processed_tokens)
    if min(budgets) < 0 or not any(budgets):
        raise SystemExit(
            "error: the budget (--budget-updates, --budget-tokens or --budget-processed-tokens) "
            "must be at least 1"
        )
    if args.budget_tokens and not args.valid_interval:
        raise SystemExit(
            "error: --budget-tokens needs --valid-interval (updates between validations): the "
            "number of updates a run takes depends on its K"
        )
    if args.valid_tokens and not args.budget_processed_tokens:
        raise SystemExit("error: --valid-tokens goes with --budget-processed-tokens")
    valid_tokens = args.valid_tokens or max(1, args.budget_processed_tokens // 20)
    if not (args.data / "dict.txt").is_file():
        raise SystemExit(f"error: {args.data} holds no dict.txt; give a fairseq-preprocess output")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1 (got {args.jobs})")
    check_extra_args(extra)
    valid_interval = args.valid_interval or max(1, args.budget_updates // 10)
    # a token budget ends at an update no one knows in advance: log lines divide the interval
    log_span = args.budget_updates or valid_interval
    return SweepSettings(
        data=args.data.resolve(),
        out=args.out.resolve(),
        budget_updates=args.budget_updates,
        budget_tokens=args.budget_tokens,
        budget_processed_tokens=args.budget_processed_tokens,
        valid_processed_tokens=valid_tokens if args.budget_processed_tokens else 0,
        valid_interval=valid_interval,
        log_interval=args.log_interval
        or (20 if args.budget_processed_tokens else default_log_interval(valid_interval, log_span)),
        preset=get_preset(args.preset) if args.preset else None,
        extra_args=extra,
        tensorboard_logdir=args.tensorboard_logdir.resolve() if args.tensorboard_logdir else None,
        progress_seconds=args.progress_seconds,
        threads=args.threads,
        jobs=args.jobs,
        rerun_changed=args.rerun_changed,
    )


def estimator_specs(text: str, settings: SweepSettings) -> list[EstimatorSpec]:
    """``--estimators`` checked against the plugin's methods and architectures (which imports
    fairseq, so only when there are any)."""
    if text.strip().lower() in ("", "none"):
        return []
    methods, archs = plugin_choices()
    return parse_estimators(text, methods, archs, sweep_arch(settings))


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
    estimators = estimator_specs(args.estimators, settings)
    if args.estimator_length and not estimators:
        raise SystemExit("error: --estimator-length goes with --estimators")
    if args.estimator_length < 0:
        raise SystemExit(
            f"error: --estimator-length must be at least 1 (got {args.estimator_length})"
        )
    length = args.estimator_length or (initial_truncation_length(settings) if estimators else 0)
    specs = plan_runs(fixed, deltas, parse_numbers(args.seeds, int), estimators, length)
    if not specs:
        raise SystemExit(
            "error: nothing to run; give --fixed, --deltas and/or --estimators (or a --preset)"
        )
    methods = f", {len(estimators)} estimators at K {length}" if estimators else ""
    say(
        f"sweep: {len(specs)} runs ({len(fixed)} fixed K, {len(deltas)} deltas{methods}, seeds "
        f"{args.seeds}), {settings.budget_label} each, validation every "
        + (
            f"{settings.valid_processed_tokens} processed tokens"
            if settings.valid_processed_tokens
            else f"{settings.valid_interval} updates"
        )
        + f", into {settings.out}"
    )
    if preset is not None:
        say(f"preset {args.preset}: {preset.description}")
    check_out_dir(settings.out, create=not args.dry_run)
    if args.dry_run:
        for spec in specs:
            say(" ".join(train_command(spec, settings, settings.out / "runs" / spec.name)))
        return 0
    # SIGTERM ends the sweep like Ctrl-C: the running fairseq children are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return 1 if run_sweep(specs, settings, keep_going=args.keep_going) else 0


if __name__ == "__main__":
    sys.exit(main())
