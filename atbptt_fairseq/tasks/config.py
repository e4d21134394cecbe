"""Options of the ``adaptive_tbptt_lm`` task: the config dataclass (the one place their defaults
and help texts live) and the checks of their values, in terms of the command-line flags.

The method's options default as ``atbptt.TbpttConfig`` does (:data:`METHOD_DEFAULTS`), and
:func:`method_config` hands them to the core under the same names.
"""

import dataclasses
import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from atbptt import BIAS_REFERENCES, ESTIMATE_METHODS, LAG_ORIGINS, LR_SCALINGS, TbpttConfig
from atbptt_fairseq.errors import UserInputError

logger = logging.getLogger(__name__)

# the method's options default as in the plain-PyTorch driver: one source of truth
METHOD_DEFAULTS = TbpttConfig()
TBPTT_STYLE_CHOICES = ChoiceEnum(["overlap", "disjoint"])
LR_SCALING_CHOICES = ChoiceEnum(list(LR_SCALINGS))
LAG_ORIGIN_CHOICES = ChoiceEnum(list(LAG_ORIGINS))
ESTIMATE_METHOD_CHOICES = ChoiceEnum(list(ESTIMATE_METHODS))
BUDGET_COUNT_CHOICES = ChoiceEnum(["processed", "scored"])
CUMULATIVE_NORM_CHOICES = ChoiceEnum(["approx", "exact"])
BIAS_REFERENCE_CHOICES = ChoiceEnum(list(BIAS_REFERENCES))
# tbptt: the task's own (adaptive) truncated BPTT; the others are atbptt.estimators' methods
GRADIENT_ESTIMATOR_CHOICES = ChoiceEnum(["tbptt", "artbp", "uoro", "kf-rtrl", "exact-rtrl"])


@dataclass
class AdaptiveTbpttLmConfig(FairseqDataclass):
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
    truncation_length: int = field(
        default=METHOD_DEFAULTS.truncation_length,
        metadata={
            "help": "truncation length K: fixed K, or the initial K0 when --target-bias is set"
        },
    )
    tbptt_style: TBPTT_STYLE_CHOICES = field(
        default=METHOD_DEFAULTS.tbptt_style,
        metadata={
            "help": "overlap: window 2K-1 from the carried state, loss on the last K positions, "
            "stride K (the paper's); disjoint: window K, loss on all K, stride K"
        },
    )
    updates_per_epoch: int = field(
        default=METHOD_DEFAULTS.updates_per_epoch,
        metadata={
            "help": "update slots in one fairseq epoch; 0: one pass over the training columns at "
            "K0. The stream position carries across epochs and wraps with a state reset"
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
    target_bias: Optional[float] = field(
        default=METHOD_DEFAULTS.target_bias,
        metadata={
            "help": "tolerable relative gradient bias delta in (0, 1); K adapts to keep the "
            "estimated bias below it. Unset: K stays fixed at --truncation-length"
        },
    )
    min_truncation_length: int = field(
        default=METHOD_DEFAULTS.min_truncation_length,
        metadata={"help": "smallest K the adaptive rule may choose (K_min)"},
    )
    max_truncation_length: int = field(
        default=METHOD_DEFAULTS.max_truncation_length,
        metadata={"help": "largest K the adaptive rule may choose (K_max)"},
    )
    max_truncation_change: float = field(
        default=METHOD_DEFAULTS.max_truncation_change,
        metadata={
            "help": "bound on how far one decision moves K: to [K / f, K x f] around the K in "
            "force, before the [K_min, K_max] clip (f > 1); 0: unbounded, as in the paper. A "
            "first estimate on a barely trained model can otherwise cut K tenfold, and with "
            "--lr-scaling and --truncation-clip-norm change the step as much"
        },
    )
    estimate_window: int = field(
        default=METHOD_DEFAULTS.estimate_window,
        metadata={"help": "lags W over which state-gradient norms are measured (>= K_max)"},
    )
    estimate_burnin: int = field(
        default=METHOD_DEFAULTS.estimate_burnin,
        metadata={"help": "steps run without gradient before the window; -1: W // 10"},
    )
    estimate_sequences: int = field(
        default=METHOD_DEFAULTS.estimate_sequences,
        metadata={"help": "sequences S drawn from the training stream per estimate"},
    )
    estimate_repeats: int = field(
        default=METHOD_DEFAULTS.estimate_repeats,
        metadata={"help": "estimates R averaged into one choice of K"},
    )
    estimate_interval: int = field(
        default=METHOD_DEFAULTS.estimate_interval,
        metadata={
            "help": "re-estimate K every this many updates; 0: on the compute budget of "
            "--estimate-budget instead. Counts of updates or tokens, never time, so runs are "
            "reproducible"
        },
    )
    estimate_budget: float = field(
        default=METHOD_DEFAULTS.estimate_budget,
        metadata={
            "help": "with --estimate-interval 0, the share of training compute spent on "
            "estimates, counted in tokens run through the model: one estimate runs R x S x "
            "(burn-in + W) tokens, and the next comes once training has run that many divided "
            "by this budget (the inputs of every training window) since the last one"
        },
    )
    estimate_budget_counts: BUDGET_COUNT_CHOICES = field(
        default=METHOD_DEFAULTS.estimate_budget_counts,
        metadata={
            "help": "what --estimate-budget counts as training: processed, the inputs of every "
            "window (compute); scored, the target tokens (the authors' copy-task schedule of one "
            "estimate per 320k scored tokens)"
        },
    )
    estimate_lag_origin: LAG_ORIGIN_CHOICES = field(
        default=METHOD_DEFAULTS.estimate_lag_origin,
        metadata={
            "help": "lag 0 of the gradient profile: final, the state the final loss reads (the "
            "paper's formula); previous, the state before it (the authors' code, which leaves the "
            "readout gradient out of the bias's denominator and picks a larger K)"
        },
    )
    estimate_tail_anchor: int = field(
        default=METHOD_DEFAULTS.estimate_tail_anchor,
        metadata={
            "help": "lag tau where the geometric tail of the bias starts; -1: W - W // 10 - 1 "
            "(the authors used W - 20 on the copy task)"
        },
    )
    estimate_method: ESTIMATE_METHOD_CHOICES = field(
        default=METHOD_DEFAULTS.estimate_method,
        metadata={
            "help": "norms: the paper's bias bound from state-gradient norms; in-window: the "
            "parameter gradient's bias measured inside the window (one backward, lags in "
            "buckets) plus the norms' geometric tail beyond it (docs/bias_check.md)"
        },
    )
    estimate_cumulative: CUMULATIVE_NORM_CHOICES = field(
        default=METHOD_DEFAULTS.estimate_cumulative,
        metadata={
            "help": "full-gradient norm lower bound: approx sums per-lag norms (the paper's "
            "choice for language models), exact takes the norm of the summed gradients"
        },
    )
    bias_relative_to: BIAS_REFERENCE_CHOICES = field(
        default=METHOD_DEFAULTS.bias_relative_to,
        metadata={
            "help": "what --target-bias is relative to: gradient, the full gradient's norm (the "
            "paper's delta); update, the expected norm of an update's minibatch gradient at K, "
            "signal plus the noise of its columns x K scored tokens, measured from the spread "
            "of the R estimates (needs --estimate-method in-window and --estimate-repeats >= 2; "
            "docs/pays_for_itself)"
        },
    )
    estimate_at_start: bool = field(
        default=METHOD_DEFAULTS.estimate_at_start,
        metadata={
            "help": "also estimate before the first update, so training starts at the K the "
            "estimate chooses; otherwise (the paper) it trains at K0 until the first estimate "
            "is due"
        },
    )
    monitor_bias: bool = field(
        default=METHOD_DEFAULTS.monitor_bias,
        metadata={
            "help": "with a fixed K, still estimate and log the relative bias at K on the "
            "--estimate-interval schedule"
        },
    )
    lr_scaling: LR_SCALING_CHOICES = field(
        default=METHOD_DEFAULTS.lr_scaling,
        metadata={"help": "scale the learning rate with K relative to K0: none, sqrt or linear"},
    )
    truncation_clip_norm: float = field(
        default=METHOD_DEFAULTS.truncation_clip_norm,
        metadata={
            "help": "clip the norm of the per-token mean loss's gradient at this value divided "
            "by the K in force, as the paper did (clip 1.0 means 1/K); 0: off. Use instead of "
            "--clip-norm, which cannot follow K"
        },
    )
    lr_scaling_reference: int = field(
        default=METHOD_DEFAULTS.lr_scaling_reference,
        metadata={
            "help": "the K at which --lr applies unscaled under --lr-scaling; 0: K0. With 1, "
            "--lr 1.0 --lr-scaling sqrt trains at lr 1.0 * sqrt(K), the paper's copy setting"
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
    train_subset: str = II("dataset.train_subset")
    cpu: bool = II("common.cpu")
    fp16: bool = II("common.fp16")
    amp: bool = II("common.amp")
    tpu: bool = II("common.tpu")
    distributed_world_size: int = II("distributed_training.distributed_world_size")


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
    """Reject inconsistent options with a message in terms of the command-line flags."""
    check_gradient_estimator(cfg)
    if cfg.truncation_length < 1:
        raise UserInputError(
            f"--truncation-length must be at least 1 (got {cfg.truncation_length})"
        )
    for name, value, least in (
        ("--eval-batch-size", cfg.eval_batch_size, 1),
        ("--eval-chunk-length", cfg.eval_chunk_length, 1),
        ("--updates-per-epoch", cfg.updates_per_epoch, 0),
        ("--max-train-tokens", cfg.max_train_tokens, 0),
        ("--max-processed-tokens", cfg.max_processed_tokens, 0),
        ("--validate-interval-processed-tokens", cfg.validate_interval_processed_tokens, 0),
        ("--estimate-tail-anchor", cfg.estimate_tail_anchor, -1),
        ("--estimate-sequences", cfg.estimate_sequences, 1),
        ("--estimate-repeats", cfg.estimate_repeats, 1),
        ("--estimate-interval", cfg.estimate_interval, 0),
        ("--estimate-burnin", cfg.estimate_burnin, -1),
        ("--lr-scaling-reference", cfg.lr_scaling_reference, 0),
    ):
        if value < least:
            raise UserInputError(f"{name} must be at least {least} (got {value})")
    for name, value in (
        ("--truncation-clip-norm", cfg.truncation_clip_norm),
        ("--estimate-budget", cfg.estimate_budget),
        ("--target-bias", cfg.target_bias),
        ("--max-truncation-change", cfg.max_truncation_change),
    ):
        if value is not None and not math.isfinite(value):
            raise UserInputError(f"{name} must be a finite number (got {value})")
    if cfg.truncation_clip_norm < 0:
        raise UserInputError(
            f"--truncation-clip-norm must be at least 0 (got {cfg.truncation_clip_norm})"
        )
    if not (cfg.max_truncation_change == 0 or cfg.max_truncation_change > 1):
        raise UserInputError(
            "--max-truncation-change must be 0 (K moves freely) or a factor above 1 "
            f"(got {cfg.max_truncation_change})"
        )
    if cfg.estimate_method == "in-window" and cfg.estimate_lag_origin != "final":
        raise UserInputError(
            "--estimate-method in-window measures the bias at K steps directly and has no lag "
            "origin to choose: leave out --estimate-lag-origin previous"
        )
    if cfg.estimate_interval == 0 and not 0.0 < cfg.estimate_budget <= 1.0:
        raise UserInputError(
            f"--estimate-budget (the share of training compute spent on estimates) must lie in "
            f"(0, 1] (got {cfg.estimate_budget}); or set --estimate-interval N to estimate every "
            "N updates"
        )
    if cfg.target_bias is None:
        return
    if not 0.0 < cfg.target_bias < 1.0:
        raise UserInputError(
            f"--target-bias (the tolerated relative gradient bias delta) must lie strictly between "
            f"0 and 1 (got {cfg.target_bias}); omit it to train with a fixed --truncation-length"
        )
    k_min, k0, k_max = cfg.min_truncation_length, cfg.truncation_length, cfg.max_truncation_length
    if k_min < 1:
        raise UserInputError(f"--min-truncation-length must be at least 1 (got {k_min})")
    if k_min > k_max:
        raise UserInputError(
            f"--min-truncation-length ({k_min}) is larger than --max-truncation-length ({k_max}); "
            "swap or fix them"
        )
    if not k_min <= k0 <= k_max:
        raise UserInputError(
            f"--truncation-length (the initial K0 = {k0}) lies outside [--min-truncation-length, "
            f"--max-truncation-length] = [{k_min}, {k_max}]; choose K0 inside that range"
        )
    if cfg.estimate_window < k_max:
        raise UserInputError(
            f"--estimate-window ({cfg.estimate_window}) is shorter than --max-truncation-length "
            f"({k_max}): the bias can only be estimated for K up to the window; raise "
            "--estimate-window or lower --max-truncation-length"
        )


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
