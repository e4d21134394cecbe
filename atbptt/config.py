"""The method's options in one place (:class:`TbpttConfig`), their checks, and the small rules
derived from them (the controller they build, the tokens an estimate budget counts, the learning
rate factor, the options a resume may change)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .controller import TruncationController
from .learning_rate import LR_SCALINGS, learning_rate_factor

TBPTT_STYLES = ("overlap", "disjoint")
# options whose change on resume would give the carried state another meaning: the overlap style
# carries the state after the first K steps of a 2K - 1 window, the disjoint one at its end
RESUME_BREAKING_OPTIONS = ("tbptt_style",)
BUDGET_COUNTS = ("processed", "scored")


@dataclass
class TbpttConfig:
    """Options of the method, named and defaulting as the fairseq task's (a test keeps them equal).

    See ``AdaptiveTbpttLmConfig`` in ``atbptt_fairseq/tasks/config.py`` for the help
    text of each option.
    """

    truncation_length: int = 35  # fixed K, or K0 when target_bias is set
    tbptt_style: str = "overlap"  # overlap (the paper's) or disjoint
    updates_per_epoch: int = 0  # segments per epoch; 0: one pass over the columns at K0
    target_bias: float | None = None  # delta in (0, 1); None: K stays fixed
    min_truncation_length: int = 10
    max_truncation_length: int = 300
    max_truncation_change: float = 0.0  # one decision moves K at most by this factor; 0: free
    estimate_window: int = 400  # W
    estimate_burnin: int = -1  # -1: W // 10
    estimate_sequences: int = 32  # S
    estimate_repeats: int = 5  # R
    estimate_interval: int = 0  # every this many updates; 0: on the token budget below
    estimate_budget: float = 0.03  # share of the training tokens an estimate may cost
    estimate_budget_counts: str = "processed"  # training tokens: processed (inputs) or scored
    estimate_lag_origin: str = "final"  # lag 0: final (the paper's formula) or previous
    estimate_tail_anchor: int = -1  # tau; -1: W - W // 10 - 1
    estimate_method: str = "norms"  # norms (the paper's bound) or in-window (docs/bias_check.md)
    estimate_cumulative: str = "approx"  # approx or exact
    monitor_bias: bool = False  # with a fixed K, still estimate delta_hat at K
    lr_scaling: str = "none"  # none, sqrt or linear in K
    truncation_clip_norm: float = 0.0  # clip the mean loss's gradient norm at this / K; 0: off
    lr_scaling_reference: int = 0  # the K at which the lr applies unscaled; 0: K0
    seed: int = 1  # seeds the estimate windows (with the update number)


def build_controller(config: TbpttConfig) -> TruncationController:
    """The controller for ``config``; a fixed K is not bound by the adaptive range."""
    adaptive = config.target_bias is not None
    window = (
        config.estimate_window
        if adaptive
        else max(config.estimate_window, config.truncation_length)
    )
    return TruncationController(
        initial_length=config.truncation_length,
        min_length=config.min_truncation_length if adaptive else config.truncation_length,
        max_length=config.max_truncation_length if adaptive else config.truncation_length,
        target_bias=config.target_bias,
        window=window,
        burnin=config.estimate_burnin if config.estimate_burnin >= 0 else window // 10,
        num_sequences=config.estimate_sequences,
        num_estimates=config.estimate_repeats,
        interval=config.estimate_interval,
        budget=config.estimate_budget,
        cumulative=config.estimate_cumulative,
        lag_origin=config.estimate_lag_origin,
        tail_anchor=None if config.estimate_tail_anchor < 0 else config.estimate_tail_anchor,
        estimate_method=config.estimate_method,
        max_change=config.max_truncation_change,
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


def check_config(config: TbpttConfig) -> None:
    """Reject the options the controller does not check itself."""
    if config.tbptt_style not in TBPTT_STYLES:
        raise ValueError(f"tbptt_style must be one of {TBPTT_STYLES} (got {config.tbptt_style!r})")
    if config.lr_scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling must be one of {LR_SCALINGS} (got {config.lr_scaling!r})")
    if config.estimate_budget_counts not in BUDGET_COUNTS:
        raise ValueError(
            f"estimate_budget_counts must be one of {BUDGET_COUNTS} "
            f"(got {config.estimate_budget_counts!r})"
        )
    for name in ("truncation_clip_norm", "estimate_budget", "target_bias", "max_truncation_change"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number (got {value})")
    for name, least in (
        ("truncation_length", 1),
        ("updates_per_epoch", 0),
        ("estimate_burnin", -1),
        ("estimate_tail_anchor", -1),
        ("truncation_clip_norm", 0),
        ("lr_scaling_reference", 0),
    ):
        value = getattr(config, name)
        if value < least:
            raise ValueError(f"{name} must be at least {least} (got {value})")
