"""The controller that holds the truncation length K and re-estimates it on a schedule."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .bias import (
    BiasEstimate,
    estimate_bias,
    raw_truncation_length,
    unbounded_reason,
)
from .config import (  # noqa: F401  (re-exported: the controller's module was their home)
    BIAS_REFERENCES,
    ESTIMATE_METHODS,
    FIRST_ESTIMATES,
    LAG_ORIGINS,
    TbpttConfig,
    check_config,
)
from .gradient_profile import GradientProfile
from .in_window import InWindowMeasurement, estimate_bias_in_window
from .update_noise import UpdateNoiseAccumulator

logger = logging.getLogger(__name__)


@dataclass
class TruncationDecision:
    """Outcome of one re-estimation of K."""

    truncation_length: int  # K in use after the decision
    relative_bias: float  # delta_hat at that K, mean over the R estimates
    decay_rate: float  # mean beta_hat over the R estimates
    seconds: float  # wall time of the whole estimate
    changed: bool
    # why the estimate could not bound the bias in some of the R repeats (K_max stood in for
    # them), or why the profile was unusable (K kept); empty when every repeat bounded it
    fallback: str = ""
    # the mean of the R raw choices, before the change bound and the [K_min, K_max] clip;
    # 0 in monitor mode or when no estimate was usable (defaults: older records still load)
    raw_choice: int = 0
    # why K is what it is after this decision, in words (the log's record of each decision)
    reason: str = ""
    # with bias_relative_to "update": the bias at K relative to the expected norm of the update's
    # gradient, and the full gradient's share of that update's squared norm (None otherwise)
    update_bias: float | None = None
    signal_share: float | None = None


class TruncationController:
    """Holds K and decides when and how to re-estimate it.

    Adaptive mode (``target_bias`` set) moves K to the mean of R independent choices of the
    smallest K whose estimated relative bias is below the target. Monitor mode (``target_bias``
    None) keeps K fixed and only reports the estimated relative bias at it. The gradient profiles
    come from a ``measure`` callable, so this class knows nothing about models or data.

    ``max_change`` f > 1 bounds how far one decision moves K: to [ceil(K / f), floor(K x f)]
    around the K in force, before the [K_min, K_max] clip (0: unbounded, as in the paper). A first
    estimate on a barely trained model that drops K from 100 to 10 would otherwise change the
    update's scale at once (the lr and clip scale with K).

    Its option defaults are :class:`TbpttConfig`'s (the one place of the defaults).

    Schedule: with ``first_estimate`` start, once before the first update (``scheduled``, the
    paper's: train at K0 until the first estimate is due). Then, with ``interval`` > 0, every
    ``interval`` updates. With ``interval`` 0, a compute
    budget counted in tokens: an estimate runs R x S x (burn-in + W) tokens through the model, and
    the next one is due once the training tokens recorded since the last one (``record_tokens``)
    reach that number divided by ``budget``. Counting tokens rather than updates keeps the share
    of compute spent on estimation near ``budget`` whatever K is (an update at K = 300 costs 30
    times one at K = 10), and unlike wall time it makes runs reproducible.
    """

    def __init__(
        self,
        initial_length: int,
        min_length: int,
        max_length: int,
        target_bias: float | None,
        window: int,
        burnin: int,
        num_sequences: int,
        num_estimates: int,
        interval: int,
        budget: float = 0.0,
        cumulative: str = TbpttConfig.estimate_cumulative,
        lag_origin: str = TbpttConfig.estimate_lag_origin,
        tail_anchor: int | None = None,
        estimate_method: str = TbpttConfig.estimate_method,
        max_change: float = TbpttConfig.max_truncation_change,
        bias_relative_to: str = TbpttConfig.bias_relative_to,
        first_estimate: str = TbpttConfig.first_estimate,
    ) -> None:
        options = TbpttConfig(
            truncation_length=initial_length,
            target_bias=target_bias,
            min_truncation_length=min_length,
            max_truncation_length=max_length,
            max_truncation_change=max_change,
            estimate_window=window,
            estimate_burnin=burnin,
            estimate_sequences=num_sequences,
            estimate_repeats=num_estimates,
            estimate_interval=interval,
            estimate_budget=budget,
            estimate_lag_origin=lag_origin,
            estimate_tail_anchor=-1 if tail_anchor is None else tail_anchor,
            estimate_method=estimate_method,
            estimate_cumulative=cumulative,
            bias_relative_to=bias_relative_to,
            first_estimate=first_estimate,
        )
        check_config(options, flag=lambda name: _ARGUMENTS.get(name, name))
        if burnin < 0:  # the options' -1 (W // 10) is resolved by now
            raise ValueError(f"burnin must be >= 0 (got {burnin})")
        self.min_length = min_length
        self.max_length = max_length
        self.target_bias = target_bias
        self.window = window
        self.burnin = burnin
        self.num_sequences = num_sequences
        self.num_estimates = num_estimates
        self.interval = interval
        self.budget = budget
        self.cumulative = cumulative
        self.lag_origin = lag_origin
        self.tail_anchor = tail_anchor
        self.estimate_method = estimate_method
        self.max_change = max_change
        self.bias_relative_to = bias_relative_to
        self.first_estimate = first_estimate
        self._truncation_length = initial_length
        self._last_estimate_update: int | None = None
        self._tokens_since_estimate = 0
        self.last_decision: TruncationDecision | None = None

    @property
    def truncation_length(self) -> int:
        """K currently in use."""
        return self._truncation_length

    @property
    def adaptive(self) -> bool:
        """Whether K follows the estimates (otherwise they are only monitored)."""
        return self.target_bias is not None

    @property
    def measured_steps(self) -> int:
        """Steps a measurement keeps after its burn-in: W, one more when lag 0 is h_{s-1}."""
        return self.window + (self.lag_origin == "previous")

    @property
    def estimate_tokens(self) -> int:
        """Tokens one decision runs through the model: R x S x (burn-in + W)."""
        return self.num_estimates * self.num_sequences * (self.burnin + self.measured_steps)

    @property
    def tokens_between_estimates(self) -> int | None:
        """Training tokens between two estimates under the budget; None on an update schedule."""
        if self.interval > 0:
            return None
        return math.ceil(self.estimate_tokens / self.budget)

    def record_tokens(self, num_tokens: int) -> None:
        """Count tokens the training steps ran through the model (inputs of every window)."""
        self._tokens_since_estimate += int(num_tokens)

    def is_due(self, num_updates: int) -> bool:
        """Whether to estimate before this update (at most once per update); before the first
        (update 0) only with ``first_estimate`` start."""
        if num_updates == self._last_estimate_update:
            return False
        if num_updates <= 0:
            return self.first_estimate == "start" and self._last_estimate_update is None
        if self.interval > 0:
            return num_updates % self.interval == 0
        return self._tokens_since_estimate >= self.tokens_between_estimates

    def estimate(
        self,
        measure: Callable[[], GradientProfile | InWindowMeasurement],
        num_updates: int,
        update_columns: int = 0,
        workers: int = 1,
    ) -> TruncationDecision:
        """Run R measurements, estimate the bias of each and update K (adaptive mode only).

        ``measure`` must draw fresh sequences on each call and keep ``measured_steps`` steps.
        K = clip(int(mean of the R raw choices)), clipped once after averaging as the authors
        did; a repeat whose bias cannot be bounded counts as K_max. A profile that is not finite
        (e.g. a NaN loss of a diverging model) leaves K as it is and reports nan: it says nothing
        about how fast gradients decay, and K_max would multiply the cost of the next updates.

        With ``bias_relative_to`` "update" the R measurements decide together: K is the smallest
        whose bias relative to the expected norm of an update's gradient (``update_columns``
        columns of all ``workers`` together, K scored tokens each) is below the target
        (:mod:`atbptt.update_noise`).
        """
        if self.bias_relative_to == "update" and (update_columns < 1 or workers < 1):
            raise ValueError(
                "the bias relative to the update needs the columns of an update (all workers "
                f"together) and the workers (got {update_columns} and {workers})"
            )
        start = time.perf_counter()
        self._last_estimate_update = num_updates
        self._tokens_since_estimate = 0
        previous_length = self._truncation_length
        estimates = []
        accumulator = UpdateNoiseAccumulator() if self.bias_relative_to == "update" else None
        for _ in range(self.num_estimates):
            measurement = measure()
            in_window = isinstance(measurement, InWindowMeasurement)
            if in_window != (self.estimate_method == "in-window"):
                raise TypeError(
                    f"estimate_method {self.estimate_method!r} got a {type(measurement).__name__}"
                )
            profile = measurement.profile if in_window else measurement
            if profile.norms.numel() != self.measured_steps:
                raise ValueError(
                    f"measured {profile.norms.numel()} lags; measure windows of "
                    f"{self.measured_steps} steps after the burn-in"
                )
            if self.lag_origin == "previous":
                profile = profile.without_readout_lag()
            if not bool(torch.isfinite(profile.norms).all()):
                reason = "gradient profile is not finite (NaN or infinite loss)"
                logger.warning(
                    "%s at update %d; keeping truncation length %d",
                    reason,
                    num_updates,
                    previous_length,
                )
                return self._decide(
                    previous_length, math.nan, math.nan, start, reason, reason=f"{reason}: K kept"
                )
            if in_window:
                estimates.append(
                    estimate_bias_in_window(measurement, self.cumulative, self.tail_anchor)
                )
                if accumulator is not None:
                    accumulator.add(measurement, self.num_sequences * workers)
            else:
                estimates.append(estimate_bias(profile, self.cumulative, self.tail_anchor))

        noise = against_update = None
        if accumulator is not None:  # one choice from the R measurements together
            noise = accumulator.result()
            against_update = noise.relative_to_update(
                self.window,
                update_columns,
                beyond_window=_mean([float(e.relative_bias[-1]) for e in estimates]),
                decay_rate=_mean([e.decay_rate for e in estimates]),
            )
        deciding = estimates if against_update is None else [against_update]
        fallbacks = [unbounded_reason(e) for e in deciding if self._raw_choice(e) is None]
        raw_choice, reason = 0, "fixed K: bias monitored only"
        if self.adaptive:
            choices = [self._raw_choice(e) or self.max_length for e in deciding]
            raw_choice = int(sum(choices) / len(choices))
            self._truncation_length, reason = self._bounded(raw_choice, previous_length)
        fallback = ""
        if fallbacks:
            fallback = f"{len(fallbacks)} of {len(deciding)} estimates: {fallbacks[0]}"
            if self.adaptive:
                fallback += f"; K_max {self.max_length} stood in for them"
            logger.warning("update %d: %s", num_updates, fallback)

        length = self._truncation_length
        relative_bias = _mean([float(estimate.relative_bias[length - 1]) for estimate in estimates])
        update_bias = signal_share = None
        if noise is not None and against_update is not None:
            update_bias = float(against_update.relative_bias[length - 1])
            signal_share = noise.signal_share(length * update_columns)
            if self.adaptive:
                reason += f" (signal share of the update at K: {signal_share:.3g})"
        decay_rate = _mean([estimate.decay_rate for estimate in estimates])
        return self._decide(
            previous_length,
            relative_bias,
            decay_rate,
            start,
            fallback,
            raw_choice,
            reason,
            update_bias,
            signal_share,
        )

    def _bounded(self, choice: int, previous_length: int) -> tuple[int, str]:
        """K from the mean choice: bounded around ``previous_length``, then clipped; and why."""
        measure = "bias_hat" if self.bias_relative_to == "gradient" else "bias_hat/update"
        target = f"smallest K with {measure} < {self.target_bias:g}"
        if self.bias_relative_to == "gradient":
            target = f"mean of {self.num_estimates} {target}"
        length, reason = choice, target
        if self.max_change:
            low = math.ceil(previous_length / self.max_change)
            high = math.floor(previous_length * self.max_change)
            if not low <= choice <= high:
                length = min(max(choice, low), high)
                reason = f"{target} was {choice}: moved at most x{self.max_change:g} from K"
        if length < self.min_length:
            return self.min_length, f"{target} was {choice}: raised to K_min"
        if length > self.max_length:
            return self.max_length, f"{target} was {choice}: lowered to K_max"
        return length, reason

    def _raw_choice(self, estimate: BiasEstimate) -> int | None:
        # the bias relative to the update is not monotone in K (a short K's update is noisier,
        # so its bias looks smaller): search from K_min, where the choice must hold
        first = self.min_length if self.bias_relative_to == "update" else 1
        return raw_truncation_length(estimate, self.target_bias or 0.0, first)

    def _decide(
        self,
        previous_length: int,
        relative_bias: float,
        decay_rate: float,
        start: float,
        fallback: str = "",
        raw_choice: int = 0,
        reason: str = "",
        update_bias: float | None = None,
        signal_share: float | None = None,
    ) -> TruncationDecision:
        self.last_decision = TruncationDecision(
            truncation_length=self._truncation_length,
            relative_bias=relative_bias,
            decay_rate=decay_rate,
            seconds=time.perf_counter() - start,
            changed=self._truncation_length != previous_length,
            fallback=fallback,
            raw_choice=raw_choice,
            reason=reason or fallback,
            update_bias=update_bias,
            signal_share=signal_share,
        )
        return self.last_decision

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only, so checkpoints load with ``torch.load(weights_only=True)``."""
        decision = self.last_decision
        return {
            "truncation_length": int(self._truncation_length),
            "last_estimate_update": self._last_estimate_update,
            "tokens_since_estimate": int(self._tokens_since_estimate),
            "last_decision": None if decision is None else dataclasses.asdict(decision),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule and the last decision; K only in adaptive mode.

        In monitor mode the configured K wins, so a resumed fixed-K run can change it. A restored
        K is clipped to the current bounds.
        """
        self._last_estimate_update = state["last_estimate_update"]
        self._tokens_since_estimate = int(state.get("tokens_since_estimate", 0))
        decision = state["last_decision"]
        self.last_decision = None if decision is None else TruncationDecision(**decision)
        if self.adaptive:
            length = int(state["truncation_length"])
            self._truncation_length = min(max(length, self.min_length), self.max_length)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


# the controller's argument for each option of TbpttConfig it takes (messages name the argument)
_ARGUMENTS = {
    "truncation_length": "initial_length",
    "min_truncation_length": "min_length",
    "max_truncation_length": "max_length",
    "max_truncation_change": "max_change",
    "estimate_window": "window",
    "estimate_burnin": "burnin",
    "estimate_sequences": "num_sequences",
    "estimate_repeats": "num_estimates",
    "estimate_interval": "interval",
    "estimate_budget": "budget",
    "estimate_lag_origin": "lag_origin",
    "estimate_tail_anchor": "tail_anchor",
    "estimate_cumulative": "cumulative",
}


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
        bias_relative_to=config.bias_relative_to,
        first_estimate=config.first_estimate,
    )
