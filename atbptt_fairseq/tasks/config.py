"""Options of the ``adaptive_tbptt_lm`` task and the checks of their values, in terms of the
command-line flags.

The method's options are derived from ``atbptt.TbpttConfig`` (names, defaults, help, choices) and
checked by the core's one check; the fields here are fairseq's own. :func:`method_config` hands
the method's options back to the core under the same names.
"""

import dataclasses
import enum
import logging
import typing
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from atbptt import TbpttConfig
from atbptt.config import check_config as check_method_config
from atbptt_fairseq.errors import UserInputError

logger = logging.getLogger(__name__)

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
    method's by the core's one check (:func:`atbptt.config.check_config`), then fairseq's own."""
    check_gradient_estimator(cfg)
    try:
        check_method_config(method_config(cfg), flag=_flag)
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
            raise UserInputError(f"{_flag(name)} must be at least {least} (got {value})")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_config(cfg: AdaptiveTbpttLmConfig) -> TbpttConfig:
    """The core's options from the task's, field by field (the names are the same), as plain
    values: fairseq's choice enums become their strings (checkpoints record these options)."""
    values = {option.name: getattr(cfg, option.name) for option in dataclasses.fields(TbpttConfig)}
    return TbpttConfig(
        **{
            name: value.value if isinstance(value, enum.Enum) else value
            for name, value in values.items()
        }
    )
