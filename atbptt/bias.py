"""Relative bias of truncated gradients and the truncation length that keeps it below a target.

Implements DESIGN.md §3, steps 3-6: fit a geometric decay rate beta to the gradient profile, bound
the gradient mass beyond each truncation length K (the absolute bias), divide by a lower bound on the
full gradient's norm, and pick the smallest K whose relative bias is below the target.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .gradient_profile import GradientProfile

logger = logging.getLogger(__name__)

CUMULATIVE_MODES = ("approx", "exact")
MIN_LOG_NORM = -50.0  # points below this are underflow noise, not decay
# "Strictly below the target" leaves this relative margin, so that a tie (delta_hat(K) equal to the
# target in exact arithmetic, e.g. phi_k = 0.9^k with target 0.9 at K = 1) is not decided by
# rounding. It is far below the statistical noise of the estimate.
TIE_TOLERANCE = 1e-6


@dataclass
class BiasEstimate:
    """Bias estimate for every truncation length K = 1..W (index K - 1)."""

    decay_rate: float  # beta_hat
    tail_anchor: int  # tau
    cumulative_norm: Tensor  # W, G_hat(K)
    absolute_bias: Tensor  # W, E_hat(K)
    gradient_lower_bound: float  # G_low
    relative_bias: Tensor  # W, delta_hat(K)


def fit_decay_rate(norms: Tensor, first_lag: int = 0) -> float:
    """exp(slope) of the least-squares line through (k, log phi_k) for lags k >= ``first_lag``.

    ``first_lag`` 0 fits the whole window (the paper's choice); a later start fits only the tail,
    where a profile that bends (fast early decay, slow late decay) is closer to geometric.
    Points with a log norm below -50 or not finite are dropped; nan if fewer than two remain.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf is dropped below
        log_norms = np.log(norms.detach().double().cpu().numpy())
    lags = np.arange(len(log_norms), dtype=np.float64)
    kept = np.isfinite(log_norms) & (log_norms >= MIN_LOG_NORM) & (lags >= first_lag)
    if kept.sum() < 2:
        return math.nan
    slope, _ = np.polyfit(lags[kept], log_norms[kept], deg=1)
    return float(math.exp(slope))


def default_tail_anchor(window: int) -> int:
    """tau = W - W // 10 - 1: near the window's end, where only the geometric tail is left."""
    return min(max(window - window // 10 - 1, 0), window - 1)


def estimate_bias(
    profile: GradientProfile,
    cumulative: str = "approx",
    tail_anchor: int | None = None,
    fit_first_lag: int = 0,
) -> BiasEstimate:
    """Estimate absolute and relative bias of truncating at every K = 1..W.

    ``cumulative`` selects G_hat(K): "approx" sums the per-lag norms, "exact" takes the norm of the
    summed mean gradients. ``fit_first_lag``: the decay rate is fitted on lags from there on
    (0: the whole window, the paper's estimate). A decay rate that is not in (0, 1) means the bias
    cannot be bounded: the absolute and relative biases are then infinite.
    """
    if cumulative not in CUMULATIVE_MODES:
        raise ValueError(f"cumulative must be one of {CUMULATIVE_MODES}, got {cumulative!r}")
    norms = profile.norms.detach().double().cpu()  # W
    window = norms.numel()
    tau = default_tail_anchor(window) if tail_anchor is None else tail_anchor
    tau = min(max(tau, 0), window - 1)
    beta = fit_decay_rate(norms, fit_first_lag)

    if cumulative == "approx":
        cumulative_norm = norms.cumsum(0)  # W
    else:
        mean_gradients = profile.mean_gradients.detach().double().cpu()  # W x D
        cumulative_norm = mean_gradients.cumsum(0).norm(dim=1)  # W

    truncation_lengths = torch.arange(1, window + 1, dtype=torch.float64)  # W, K = 1..W
    if math.isfinite(beta) and 0.0 < beta < 1.0:
        # E(K) = sum_{k=K}^{tau-1} phi_k + phi_tau * beta^max(K-tau, 0) / (1 - beta).
        # The sum stops before tau because the geometric tail already starts with phi_tau (the
        # DESIGN's inclusive "sum_{k=K}^{tau}" would count it twice); the two branches of step 5
        # then meet at K = tau, and phi_k = beta^k gives E(K) = beta^K / (1 - beta) for all K.
        head_suffix_sums = norms[:tau].flip(0).cumsum(0).flip(0)  # tau, sum_{k=j}^{tau-1} phi_k
        head = torch.zeros(window, dtype=torch.float64)
        head[: max(tau - 1, 0)] = head_suffix_sums[1:]
        tail_exponent = (truncation_lengths - tau).clamp(min=0)
        absolute_bias = head + norms[tau] * beta**tail_exponent / (1.0 - beta)  # W
    else:
        absolute_bias = torch.full((window,), math.inf, dtype=torch.float64)

    margins = cumulative_norm - absolute_bias  # W, lower bounds on the full gradient's norm
    positive_margins = margins[margins > 0]
    gradient_lower_bound = float(positive_margins.max()) if positive_margins.numel() else 0.0
    if gradient_lower_bound > 0:
        relative_bias = absolute_bias / gradient_lower_bound
    else:
        relative_bias = torch.full((window,), math.inf, dtype=torch.float64)

    return BiasEstimate(
        decay_rate=beta,
        tail_anchor=tau,
        cumulative_norm=cumulative_norm,
        absolute_bias=absolute_bias,
        gradient_lower_bound=gradient_lower_bound,
        relative_bias=relative_bias,
    )


def raw_truncation_length(
    estimate: BiasEstimate, target_bias: float, first_length: int = 1
) -> int | None:
    """Smallest K >= ``first_length`` with relative bias strictly below ``target_bias``, W if
    none; not clipped above.

    None when the bias cannot be bounded (decay rate >= 1 or anything not finite). A relative
    bias that falls in K (the paper's) gives the same K from any ``first_length`` below it; one
    that does not (relative to a noisier update at a shorter K) must start at K_min.
    """
    beta = estimate.decay_rate
    relative_bias = estimate.relative_bias
    if not (math.isfinite(beta) and beta < 1.0) or not bool(torch.isfinite(relative_bias).all()):
        return None
    first = min(max(first_length, 1), relative_bias.numel())
    below_target = torch.nonzero(relative_bias[first - 1 :] < target_bias * (1.0 - TIE_TOLERANCE))
    return int(below_target[0]) + first if below_target.numel() else relative_bias.numel()


def unbounded_reason(estimate: BiasEstimate) -> str:
    """Why the bias of ``estimate`` cannot be bounded, in words for a log line or a summary."""
    beta = estimate.decay_rate
    if not (math.isfinite(beta) and beta < 1.0):
        return f"gradient norms do not decay (decay rate {beta:.4g})"
    return (
        "relative bias estimate is not finite "
        f"(gradient lower bound {estimate.gradient_lower_bound:.4g})"
    )


def choose_truncation_length(
    estimate: BiasEstimate, target_bias: float, min_length: int, max_length: int
) -> int:
    """Smallest K with relative bias strictly below ``target_bias`` (W if none), clipped.

    When the bias cannot be bounded (decay rate >= 1 or anything not finite) this returns
    ``max_length`` and warns: truncating as little as allowed is the safe side (the authors'
    code returned K = 1 there).
    """
    length = raw_truncation_length(estimate, target_bias)
    if length is None:
        logger.warning(
            "%s; using the maximum truncation length %d", unbounded_reason(estimate), max_length
        )
        return max_length
    return min(max(length, min_length), max_length)
