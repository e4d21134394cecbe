"""Run specs and their commands: the grid of a sweep (fixed K, target biases delta, gradient
estimators, seeds), the settings every run shares, and the fairseq-train / fairseq-eval-lm
command lines of one run."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fairseq_process import PLUGIN_DIR
from .presets import Preset

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
    return [*(arg for pair in defaults for arg in pair), *args]


def sweep_arch(settings: SweepSettings) -> str:
    """The ``--arch`` of the sweep's model (fixed-K config: estimator runs train with it)."""
    return str(option_value(setting_args(settings, adaptive=False), "--arch"))


def initial_truncation_length(settings: SweepSettings) -> int:
    """K0: the ``--truncation-length`` the sweep's adaptive runs start at (the preset's adaptive
    config, or after ``--``), else the task's default (the default ``--estimator-length``)."""
    value = option_value(setting_args(settings, adaptive=True), "--truncation-length")
    if value is not None:
        return int(value)
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
