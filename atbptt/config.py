"""The method's options in one place (:class:`TbpttConfig`), their checks (:func:`check_config`,
the one place they are written: the controller and the fairseq task call it), and the small rules
derived from them (the tokens an estimate budget counts, the learning rate factor, the options a
resume may change). The controller the options build: :func:`atbptt.build_controller`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .bias import CUMULATIVE_MODES
from .learning_rate import LR_SCALINGS, learning_rate_factor

TBPTT_STYLES = ("overlap", "disjoint")
# options whose change on resume would give the carried state another meaning: the overlap style
# carries the state after the first K steps of a 2K - 1 window, the disjoint one at its end
RESUME_BREAKING_OPTIONS = ("tbptt_style",)
BUDGET_COUNTS = ("processed", "scored")

LAG_ORIGINS = ("final", "previous")
"""Where lag 0 of the profile lies: ``final``, the state the final loss reads (the paper's
formula, phi_0 the readout gradient); ``previous``, the state before it (the authors' code)."""

BIAS_REFERENCES = ("gradient", "update")
"""What the estimated bias is relative to: ``gradient``, the norm of the full (untruncated)
gradient (the paper's delta); ``update``, the expected norm of the training update's gradient at
K, the full gradient plus the noise of a minibatch of (columns x K) scored tokens, measured from
the spread of the R in-window estimates (docs/pays_for_itself). A bias far below that noise does
not change what an SGD step does."""

ESTIMATE_METHODS = ("norms", "in-window")
"""How the bias is estimated: ``norms``, the paper's bound from state-gradient norms
(:func:`atbptt.estimate_bias`); ``in-window``, the parameter-gradient bias measured inside the
window plus the norm tail beyond it (:mod:`atbptt.in_window`), whose ``measure`` returns an
:class:`~atbptt.in_window.InWindowMeasurement`."""

FIRST_ESTIMATES = ("start", "scheduled")
"""When an adaptive run first estimates K: ``start``, before the first update, so training starts
at the K the estimate chooses; ``scheduled``, when the schedule first calls for it, training at K0
until then (the paper's)."""


@dataclass
class TbpttConfig:
    """The method's options: the one place of their names, defaults, help texts (``help`` in
    each field's metadata; ``choices`` where the value is one of a few) and, in
    :func:`check_config`, checks. The fairseq task's ``AdaptiveTbpttLmConfig`` is derived from
    it (``atbptt_fairseq/tasks/config.py``), so a default or a check cannot diverge."""

    truncation_length: int = field(
        default=35,
        metadata={
            "help": ("truncation length K: fixed K, or the initial K0 when --target-bias is set"),
        },
    )
    tbptt_style: str = field(
        default="overlap",
        metadata={
            "help": (
                "overlap: window 2K-1 from the carried state, loss on the last K positions, stride K "
                "(the paper's); disjoint: window K, loss on all K, stride K"
            ),
            "choices": TBPTT_STYLES,
        },
    )
    updates_per_epoch: int = field(
        default=0,
        metadata={
            "help": (
                "update slots in one fairseq epoch; 0: one pass over the training columns at K0. The "
                "stream position carries across epochs and wraps with a state reset"
            ),
        },
    )
    target_bias: float | None = field(
        default=None,
        metadata={
            "help": (
                "tolerable relative gradient bias delta in (0, 1); K adapts to keep the estimated "
                "bias below it. Unset: K stays fixed at --truncation-length"
            ),
        },
    )
    min_truncation_length: int = field(
        default=10,
        metadata={
            "help": ("smallest K the adaptive rule may choose (K_min)"),
        },
    )
    max_truncation_length: int = field(
        default=300,
        metadata={
            "help": ("largest K the adaptive rule may choose (K_max)"),
        },
    )
    max_truncation_change: float = field(
        default=0.0,
        metadata={
            "help": (
                "bound on how far one decision moves K: to [K / f, K x f] around the K in force, "
                "before the [K_min, K_max] clip (f > 1); 0: unbounded, as in the paper. A first "
                "estimate on a barely trained model can otherwise cut K tenfold, and with --lr- "
                "scaling and --truncation-clip-norm change the step as much"
            ),
        },
    )
    estimate_window: int = field(
        default=400,
        metadata={
            "help": ("lags W over which state-gradient norms are measured (>= K_max)"),
        },
    )
    estimate_burnin: int = field(
        default=-1,
        metadata={
            "help": ("steps run without gradient before the window; -1: W // 10"),
        },
    )
    estimate_sequences: int = field(
        default=32,
        metadata={
            "help": ("sequences S drawn from the training stream per estimate"),
        },
    )
    estimate_repeats: int = field(
        default=5,
        metadata={
            "help": ("estimates R averaged into one choice of K"),
        },
    )
    estimate_interval: int = field(
        default=0,
        metadata={
            "help": (
                "re-estimate K every this many updates; 0: on the compute budget of --estimate-budget "
                "instead. Counts of updates or tokens, never time, so runs are reproducible"
            ),
        },
    )
    estimate_budget: float = field(
        default=0.03,
        metadata={
            "help": (
                "with --estimate-interval 0, the share of training compute spent on estimates, "
                "counted in tokens run through the model: one estimate runs R x S x (burn-in + W) "
                "tokens, and the next comes once training has run that many divided by this budget "
                "(the inputs of every training window) since the last one"
            ),
        },
    )
    estimate_budget_counts: str = field(
        default="processed",
        metadata={
            "help": (
                "what --estimate-budget counts as training: processed, the inputs of every window "
                "(compute); scored, the target tokens (the authors' copy-task schedule of one "
                "estimate per 320k scored tokens)"
            ),
            "choices": BUDGET_COUNTS,
        },
    )
    estimate_lag_origin: str = field(
        default="final",
        metadata={
            "help": (
                "lag 0 of the gradient profile: final, the state the final loss reads (the paper's "
                "formula); previous, the state before it (the authors' code, which leaves the readout "
                "gradient out of the bias's denominator and picks a larger K)"
            ),
            "choices": LAG_ORIGINS,
        },
    )
    estimate_tail_anchor: int = field(
        default=-1,
        metadata={
            "help": (
                "lag tau where the geometric tail of the bias starts; -1: W - W // 10 - 1 (the "
                "authors used W - 20 on the copy task)"
            ),
        },
    )
    estimate_method: str = field(
        default="in-window",
        metadata={
            "help": (
                "in-window: the parameter gradient's bias measured inside the window (one "
                "backward, lags in buckets) plus the norms' geometric tail beyond it "
                "(docs/bias_check.md; the default, chosen by docs/pays_for_itself); norms: the "
                "paper's bias bound from state-gradient norms"
            ),
            "choices": ESTIMATE_METHODS,
        },
    )
    estimate_cumulative: str = field(
        default="approx",
        metadata={
            "help": (
                "full-gradient norm lower bound: approx sums per-lag norms (the paper's choice for "
                "language models), exact takes the norm of the summed gradients"
            ),
            "choices": CUMULATIVE_MODES,
        },
    )
    bias_relative_to: str = field(
        default="gradient",
        metadata={
            "help": (
                "what --target-bias is relative to: gradient, the full gradient's norm (the "
                "paper's delta); update, the expected norm of an update's minibatch gradient at "
                "K, signal plus the noise of its columns x K scored tokens, measured from the "
                "spread of the R estimates (needs --estimate-method in-window and "
                "--estimate-repeats >= 2; docs/pays_for_itself)"
            ),
            "choices": BIAS_REFERENCES,
        },
    )
    first_estimate: str = field(
        default="start",
        metadata={
            "help": (
                "start: estimate before the first update too, so training starts at the K the "
                "estimate chooses (the default, chosen by docs/pays_for_itself); scheduled: train "
                "at K0 until the schedule's first estimate (the paper's)"
            ),
            "choices": FIRST_ESTIMATES,
        },
    )
    monitor_bias: bool = field(
        default=False,
        metadata={
            "help": (
                "with a fixed K, still estimate and log the relative bias at K on the --estimate- "
                "interval schedule"
            ),
        },
    )
    lr_scaling: str = field(
        default="none",
        metadata={
            "help": ("scale the learning rate with K relative to K0: none, sqrt or linear"),
            "choices": LR_SCALINGS,
        },
    )
    truncation_clip_norm: float = field(
        default=0.0,
        metadata={
            "help": (
                "clip the norm of the per-token mean loss's gradient at this value divided by the K "
                "in force, as the paper did (clip 1.0 means 1/K); 0: off. Use instead of --clip-norm, "
                "which cannot follow K"
            ),
        },
    )
    lr_scaling_reference: int = field(
        default=0,
        metadata={
            "help": (
                "the K at which --lr applies unscaled under --lr-scaling; 0: K0. With 1, --lr 1.0 "
                "--lr-scaling sqrt trains at lr 1.0 * sqrt(K), the paper's copy setting"
            ),
        },
    )
    seed: int = field(
        default=1, metadata={"help": "seeds the estimate windows (with the update number)"}
    )


def budget_tokens(config: TbpttConfig, processed: int, scored: int) -> int:
    """The tokens of a training segment that count towards the estimate budget:
    ``estimate_budget_counts`` says whether the inputs run (processed) or the targets scored."""
    return scored if config.estimate_budget_counts == "scored" else processed


def lr_factor(
    config: TbpttConfig, truncation_length: int, initial_length: int | None = None
) -> float:
    """The paper's scaling of the learning rate for a segment of ``truncation_length``, relative
    to ``lr_scaling_reference``, or else K0 (``initial_length`` where K0 as applied differs from
    ``config.truncation_length``, e.g. capped by a short column)."""
    reference = config.lr_scaling_reference or initial_length or config.truncation_length
    return learning_rate_factor(truncation_length, reference, config.lr_scaling)


def resume_changes(saved: dict[str, Any] | None, config: TbpttConfig) -> list[tuple[str, Any, Any]]:
    """The method options that differ between a checkpoint's recorded ``saved`` options and
    ``config``, as (name, saved value, current value); none for a checkpoint that recorded none."""
    if not saved:
        return []
    current = dataclasses.asdict(config)
    return [
        (name, saved[name], value)
        for name, value in current.items()
        if name in saved and saved[name] != value
    ]


def describe_changes(changes: list[tuple[str, Any, Any]], flag: Callable[[str], str]) -> str:
    """``--target-bias 0.1 -> 0.2, ...``: :func:`resume_changes`'s list, named by ``flag``."""
    return ", ".join(f"{flag(name)} {old!r} -> {new!r}" for name, old, new in changes)


def check_config(config: TbpttConfig, flag: Callable[[str], str] = str) -> None:
    """Refuse inconsistent options with a ``ValueError`` of one line, naming each option by
    ``flag(name)`` (the fairseq task passes its command-line flags)."""
    for option in dataclasses.fields(config):
        choices = option.metadata.get("choices")
        value = getattr(config, option.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{flag(option.name)} must be one of {choices} (got {value!r})")
    for name in ("truncation_clip_norm", "estimate_budget", "target_bias", "max_truncation_change"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag(name)} must be a finite number (got {value})")
    for name, least in (
        ("truncation_length", 1),
        ("updates_per_epoch", 0),
        ("estimate_tail_anchor", -1),
        ("estimate_sequences", 1),
        ("estimate_repeats", 1),
        ("estimate_interval", 0),
        ("estimate_burnin", -1),
        ("lr_scaling_reference", 0),
        ("truncation_clip_norm", 0),
    ):
        value = getattr(config, name)
        if value < least:
            raise ValueError(f"{flag(name)} must be at least {least} (got {value})")
    anchor, window = config.estimate_tail_anchor, config.estimate_window
    if anchor >= window:
        raise ValueError(
            f"{flag('estimate_tail_anchor')} must lie in [0, {flag('estimate_window')}) = "
            f"[0, {window}) (got {anchor}); -1: W - W // 10 - 1"
        )
    change = config.max_truncation_change
    if not (change == 0 or change > 1):
        raise ValueError(
            f"{flag('max_truncation_change')} must be 0 (K moves freely) or a factor above 1 "
            f"(got {change})"
        )
    if config.estimate_method == "in-window" and config.estimate_lag_origin != "final":
        raise ValueError(
            f"{flag('estimate_method')} in-window (the default) measures the bias at K steps "
            f"directly and has no lag origin to choose: leave out "
            f"{flag('estimate_lag_origin')} previous, or set {flag('estimate_method')} norms "
            "(the paper's bound)"
        )
    if config.bias_relative_to == "update" and config.estimate_method != "in-window":
        raise ValueError(
            f"{flag('bias_relative_to')} update needs the parameter gradients of the in-window "
            f"estimate: set {flag('estimate_method')} in-window"
        )
    if config.bias_relative_to == "update" and config.estimate_repeats < 2:
        raise ValueError(
            f"{flag('bias_relative_to')} update measures the gradient noise from the spread of "
            f"the R estimates: {flag('estimate_repeats')} must be at least 2 "
            f"(got {config.estimate_repeats})"
        )
    if config.estimate_interval == 0 and not 0.0 < config.estimate_budget <= 1.0:
        raise ValueError(
            f"{flag('estimate_budget')} (the share of training compute spent on estimates) must "
            f"lie in (0, 1] (got {config.estimate_budget}); or set {flag('estimate_interval')} N "
            "to estimate every N updates"
        )
    if config.target_bias is None:
        return
    if not 0.0 < config.target_bias < 1.0:
        raise ValueError(
            f"{flag('target_bias')} (the tolerated relative gradient bias delta) must lie strictly "
            f"between 0 and 1 (got {config.target_bias}); omit it to train with a fixed "
            f"{flag('truncation_length')}"
        )
    k_min, k0, k_max = (
        config.min_truncation_length,
        config.truncation_length,
        config.max_truncation_length,
    )
    low, high = flag("min_truncation_length"), flag("max_truncation_length")
    if k_min < 1:
        raise ValueError(f"{low} must be at least 1 (got {k_min})")
    if k_min > k_max:
        raise ValueError(f"{low} ({k_min}) is larger than {high} ({k_max}); swap or fix them")
    if not k_min <= k0 <= k_max:
        raise ValueError(
            f"{flag('truncation_length')} (the initial K0 = {k0}) lies outside [{low}, {high}] = "
            f"[{k_min}, {k_max}]; choose K0 inside that range"
        )
    if config.estimate_window < k_max:
        raise ValueError(
            f"{flag('estimate_window')} ({config.estimate_window}) is shorter than {high} "
            f"({k_max}): the bias can only be estimated for K up to the window; raise "
            f"{flag('estimate_window')} or lower {high}"
        )
