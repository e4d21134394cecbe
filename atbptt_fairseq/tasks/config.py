"""Options of the ``adaptive_tbptt_lm`` task and the checks of their values, in terms of the
command-line flags.

The method's options are derived from ``atbptt.TbpttConfig`` (names, defaults, help, choices) and
checked by the core's one check; the fields here are fairseq's own. :func:`method_config` hands
the method's options back to the core under the same names.
"""

import dataclasses
import enum
import logging
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II, ListConfig
from omegaconf.errors import OmegaConfBaseException

from atbptt import TbpttConfig, lr_factor
from atbptt.config import check_config as check_method_config
from atbptt.estimators import Artbp
from atbptt_fairseq.errors import UserInputError

logger = logging.getLogger(__name__)

METHOD_DEFAULTS = TbpttConfig()  # what an option left out of the command line is

# tbptt: the task's own (adaptive) truncated BPTT; the others are atbptt.estimators' methods
GRADIENT_ESTIMATOR_CHOICES = ChoiceEnum(["tbptt", "artbp", "uoro", "kf-rtrl", "exact-rtrl"])


@dataclass
class FairseqOnlyOptions(FairseqDataclass):
    """The task's options that are fairseq's alone (data, evaluation, budgets of fairseq-train,
    --gradient-estimator); the method's come from ``atbptt.TbpttConfig``."""

    data: Optional[str] = field(
        default=None,
        metadata={
            "help": "path to fairseq-preprocess --only-source output; colon-separated shards are "
            "used in turn, one per epoch, as fairseq's language_modeling task does"
        },
    )
    target_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "subdirectory of the data path holding a token-aligned target stream (same "
            "dict.txt), for tasks such as the copy task; unset: the target is the next token"
        },
    )
    max_train_tokens: int = field(
        default=0,
        metadata={
            "help": "stop training once this many target tokens have been scored (summed over "
            "workers), checked after every update; 0: no limit. Runs with an adaptive K score a "
            "varying number of tokens per update, so equal --max-update is not equal data"
        },
    )
    max_processed_tokens: int = field(
        default=0,
        metadata={
            "help": "stop training once this many tokens have been run through the model (summed "
            "over workers): the inputs of every training window (2K-1 per column in the overlap "
            "style) and of every estimate of an adaptive K (burn-in included; a fixed K's "
            "--monitor-bias estimates observe and are not counted); 0: no limit. Equal compute "
            "for runs of any K, where --max-train-tokens is equal data"
        },
    )
    validate_interval_processed_tokens: int = field(
        default=0,
        metadata={
            "help": "validate and save a checkpoint every this many processed tokens (see "
            "--max-processed-tokens), and not at epoch ends (but the last of --max-epoch); 0: "
            "off. Runs of different K then validate at the same compute, where "
            "--validate-interval-updates would validate a K = 10 run 30 times as often as a "
            "K = 300 run, and epoch ends (a fixed number of update slots) more often the smaller "
            "K falls"
        },
    )
    eval_chunk_length: int = field(
        default=100, metadata={"help": "tokens per column per evaluation batch"}
    )
    eval_batch_size: int = field(
        default=1,
        metadata={
            "help": "evaluation columns per worker; 1 scores the split in one stateful pass from "
            "a zero state (exact), more columns are faster but each column starts from zero"
        },
    )
    gradient_estimator: GRADIENT_ESTIMATOR_CHOICES = field(
        default="tbptt",
        metadata={
            "help": "how the gradient is estimated: tbptt, truncated BPTT at --truncation-length "
            "(adaptive with --target-bias); artbp, random truncation with compensation factors "
            "(segments of geometric length, mean --truncation-length); uoro, rank-one RTRL; "
            "kf-rtrl, Kronecker-factored RTRL (tanh_rnn_lm models only); exact-rtrl, exact RTRL "
            "(elementwise_lstm_lm models only). The RTRL methods update once per disjoint "
            "segment of --truncation-length. All but tbptt are unbiased (exact-rtrl: exact; "
            "docs/alternatives.md), single-worker and fp32 only"
        },
    )
    seed: int = II("common.seed")
    save_dir: str = II("checkpoint.save_dir")  # where atbptt_metrics.jsonl is written
    train_subset: str = II("dataset.train_subset")
    cpu: bool = II("common.cpu")
    fp16: bool = II("common.fp16")
    amp: bool = II("common.amp")
    tpu: bool = II("common.tpu")
    distributed_world_size: int = II("distributed_training.distributed_world_size")
    lr: List[float] = II("optimization.lr")
    valid_subset: str = II("dataset.valid_subset")
    disable_validation: bool = II("dataset.disable_validation")


def _method_field(option: dataclasses.Field, hints: dict) -> tuple:
    """The task's field of a ``TbpttConfig`` option: its default and help, its choices as a
    fairseq ChoiceEnum (argparse choices), ``X | None`` as ``Optional[X]``."""
    kind = hints[option.name]
    if option.metadata.get("choices") is not None:
        kind = ChoiceEnum(list(option.metadata["choices"]))
    elif type(None) in typing.get_args(kind):
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        kind = Optional[inner]
    return (
        option.name,
        kind,
        field(default=option.default, metadata={"help": option.metadata["help"]}),
    )


# the method's options, derived from the core's config: one source of names, defaults and help
AdaptiveTbpttLmConfig = dataclasses.make_dataclass(
    "AdaptiveTbpttLmConfig",
    [
        _method_field(option, typing.get_type_hints(TbpttConfig))
        for option in dataclasses.fields(TbpttConfig)
        if option.name != "seed"  # fairseq's --seed (common.seed)
    ],
    bases=(FairseqOnlyOptions,),
)
AdaptiveTbpttLmConfig.__module__ = __name__
AdaptiveTbpttLmConfig.__doc__ = "Options of the adaptive_tbptt_lm task: the method's and fairseq's."


def check_precision(cfg: AdaptiveTbpttLmConfig) -> None:
    """fp16 and amp need a CUDA device; fairseq-train's --bf16 means a TPU (fairseq's rule)."""

    def flag(name: str) -> bool:  # unresolved ("${common.fp16}") outside a fairseq config: False
        return getattr(cfg, name, False) is True

    on_gpu = torch.cuda.is_available() and not flag("cpu")
    if flag("fp16") and not on_gpu:
        raise UserInputError(
            "--fp16 needs a CUDA GPU; on CPU train in fp32 (drop --fp16), or in bfloat16 with "
            "fairseq-hydra-train ... common.bf16=true"
        )
    if flag("tpu"):
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            raise UserInputError(
                "fairseq-train's --bf16 (and --tpu) runs on a TPU, and torch_xla is not installed; "
                "for bfloat16 on a CPU or GPU use fairseq-hydra-train ... common.bf16=true"
            ) from None
    if flag("amp") and not on_gpu:
        logger.warning("--amp without a CUDA GPU trains in fp32: fairseq's autocast is CUDA-only")


def check_gradient_estimator(cfg: AdaptiveTbpttLmConfig) -> None:
    """Refuse what --gradient-estimator artbp, uoro, kf-rtrl and exact-rtrl cannot do (tbptt:
    nothing to check); the task's ``check_estimator_model`` checks the model once built."""
    method = getattr(cfg, "gradient_estimator", "tbptt")
    if method == "tbptt":
        return
    option = f"--gradient-estimator {method}"
    if cfg.target_bias is not None:
        raise UserInputError(
            f"{option} does not take --target-bias: adaptive K is its own estimator "
            "(--gradient-estimator tbptt); drop one of them"
        )
    if cfg.monitor_bias:
        raise UserInputError(
            f"{option} does not take --monitor-bias: it estimates the bias of truncated BPTT, "
            f"which {method} does not train with; drop one of them"
        )
    if method == "artbp":
        try:
            Artbp(mean_length=cfg.truncation_length)
        except ValueError:
            raise UserInputError(
                f"{option} cuts the backward pass after each step with probability 1 / "
                f"--truncation-length (its mean segment length), so --truncation-length must be "
                f"at least 2 (got {cfg.truncation_length})"
            ) from None
    for flag in ("fp16", "amp"):
        if getattr(cfg, flag, False) is True:
            raise UserInputError(
                f"{option} trains in fp32 only: it writes .grad itself, outside fairseq's loss "
                f"scaling; drop --{flag}"
            )
    world_size = getattr(cfg, "distributed_world_size", 1)
    if isinstance(world_size, int) and world_size > 1:
        raise UserInputError(
            f"{option} trains on one worker only: it writes .grad directly, outside the "
            f"hooks through which DistributedDataParallel averages gradients, so {world_size} "
            "workers would each step on their own gradient; train on one worker"
        )


def check_config(cfg: AdaptiveTbpttLmConfig) -> None:
    """Reject inconsistent options with a message in terms of the command-line flags: the
    method's by the core's one check (:func:`atbptt.config.check_config`), then fairseq's own;
    warn in one line about options the combination leaves without effect."""
    check_gradient_estimator(cfg)
    try:
        check_method_config(method_config(cfg), flag=option_flag)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    for name in (
        "eval_batch_size",
        "eval_chunk_length",
        "max_train_tokens",
        "max_processed_tokens",
        "validate_interval_processed_tokens",
    ):
        value, least = getattr(cfg, name), 1 if name.startswith("eval") else 0
        if value < least:
            raise UserInputError(f"{option_flag(name)} must be at least {least} (got {value})")
    check_learning_rates(cfg)
    check_validation_subsets(cfg)
    check_option_combinations(cfg)


def option_flag(name: str) -> str:
    """An option's command-line flag: ``estimate_window`` -> ``--estimate-window``."""
    return "--" + name.replace("_", "-")


# the options of the bias estimate, which only an adaptive K or --monitor-bias runs
ESTIMATE_OPTIONS = (
    "estimate_window",
    "estimate_burnin",
    "estimate_sequences",
    "estimate_repeats",
    "estimate_interval",
    "estimate_budget",
    "estimate_budget_counts",
    "estimate_lag_origin",
    "estimate_tail_anchor",
    "estimate_method",
    "estimate_cumulative",
    "bias_relative_to",
    "first_estimate",
)
# the options that bound the choices of an adaptive K
ADAPTIVE_OPTIONS = ("min_truncation_length", "max_truncation_length", "max_truncation_change")


def options_without_effect(cfg: AdaptiveTbpttLmConfig) -> Dict[str, Tuple[Any, str]]:
    """The method options that this combination of options ignores, each with the value that
    applies instead (None: none, the option is unused) and why, in terms of the flags."""
    method = getattr(cfg, "gradient_estimator", "tbptt")
    ignored: Dict[str, Tuple[Any, str]] = {}
    if method != "tbptt":
        reason = f"--gradient-estimator {method} runs no bias estimate"
        ignored.update({name: (None, reason) for name in ESTIMATE_OPTIONS + ADAPTIVE_OPTIONS})
        ignored["tbptt_style"] = (
            "disjoint",
            f"--gradient-estimator {method} trains disjoint segments",
        )
    elif cfg.target_bias is None:
        reason = "K stays fixed without --target-bias"
        ignored.update({name: (None, reason) for name in ADAPTIVE_OPTIONS})
        if not cfg.monitor_bias:
            reason = "a fixed K without --monitor-bias runs no bias estimate"
            ignored.update({name: (None, reason) for name in ESTIMATE_OPTIONS})
    elif cfg.monitor_bias:
        ignored["monitor_bias"] = (None, "an adaptive K estimates the bias anyway")
    if cfg.estimate_interval > 0:
        reason = "--estimate-interval schedules the estimates by updates"
        for name in ("estimate_budget", "estimate_budget_counts"):
            ignored.setdefault(name, (None, reason))
    if _plain(cfg.lr_scaling) == "none":
        ignored["lr_scaling_reference"] = (None, "--lr-scaling none scales nothing")
    elif cfg.lr_scaling_reference == 0 and (method != "tbptt" or cfg.target_bias is None):
        reason = "K stays at K0, where --lr-scaling-reference 0 applies --lr unscaled"
        ignored["lr_scaling"] = ("none", reason)
    return ignored


def check_option_combinations(cfg: AdaptiveTbpttLmConfig) -> None:
    """Warn in one line about the options this combination ignores (:func:`options_without_effect`)
    that were given another value than the one that applies (their default, when none does)."""
    ignored: Dict[str, List[str]] = {}
    for name, (applied, reason) in options_without_effect(cfg).items():
        value = _plain(getattr(cfg, name))
        if value != (getattr(METHOD_DEFAULTS, name) if applied is None else applied):
            ignored.setdefault(reason, []).append(_given(name, value))
    if ignored:
        logger.warning(
            "options without effect in this combination: "
            + "; ".join(f"{', '.join(flags)} ({reason})" for reason, flags in ignored.items())
        )


def check_learning_rates(cfg: AdaptiveTbpttLmConfig) -> None:
    """Refuse a negative --lr, or one that float32 parameters cannot take at the largest K of the
    run (torch fails converting it in the step); fairseq's argument parser refuses nan and inf."""
    rates = _resolved(cfg, "lr")
    if not isinstance(rates, (list, tuple, ListConfig)):
        return  # outside a fairseq config
    largest_k = cfg.truncation_length if cfg.target_bias is None else cfg.max_truncation_length
    factor = lr_factor(method_config(cfg), largest_k)
    largest = torch.finfo(torch.float32).max
    for rate in rates:
        if rate < 0:
            raise UserInputError(f"--lr must be at least 0 (got {_shown(rate)})")
        if not math.isfinite(rate * factor) or rate * factor > largest:
            scaled = f" x {factor:.3g} (--lr-scaling at K = {largest_k})" if factor != 1 else ""
            raise UserInputError(
                f"--lr {_shown(rate)}{scaled} is beyond the largest float32 number "
                f"({largest:.3g}): the parameters cannot take such a step; lower --lr"
            )


def check_validation_subsets(cfg: AdaptiveTbpttLmConfig) -> None:
    """Refuse to validate on the training split (fairseq-train or fairseq-validate
    ``--valid-subset``): the task lays that split out as update slots, which it fills with
    segments only while training (fairseq-train failed at its first validation, after training up to
    it); fairseq-eval-lm scores every split, the training split included."""
    subsets, train_subset = _resolved(cfg, "valid_subset"), _resolved(cfg, "train_subset")
    if not isinstance(subsets, str) or not isinstance(train_subset, str):
        return  # outside a fairseq config
    if _resolved(cfg, "disable_validation") is True:
        return
    if train_subset in subsets.split(","):
        raise UserInputError(
            f"--valid-subset {subsets} names the training split {train_subset}, which this task "
            "lays out for training, not for validation; score it with fairseq-eval-lm "
            f"--gen-subset {train_subset}"
        )


def _resolved(cfg: AdaptiveTbpttLmConfig, name: str) -> Any:
    """A fairseq option the task's config refers to (``II``); None where it cannot be resolved
    (a stored config of an older version); the ``${...}`` text outside a fairseq config."""
    try:
        return getattr(cfg, name)
    except (AttributeError, OmegaConfBaseException):
        return None


def _plain(value: Any) -> Any:
    """An option's value without fairseq's choice enum around it."""
    return value.value if isinstance(value, enum.Enum) else value


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _given(name: str, value: Any) -> str:
    """An option as given on the command line: ``--monitor-bias``, ``--estimate-window 100``."""
    return option_flag(name) if isinstance(value, bool) else f"{option_flag(name)} {_shown(value)}"


def method_config(cfg: AdaptiveTbpttLmConfig) -> TbpttConfig:
    """The core's options from the task's, field by field (the names are the same), as plain
    values: fairseq's choice enums become their strings (checkpoints record these options)."""
    values = {option.name: getattr(cfg, option.name) for option in dataclasses.fields(TbpttConfig)}
    return TbpttConfig(**{name: _plain(value) for name, value in values.items()})
