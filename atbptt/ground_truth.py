"""Ground truth for the bias estimate: the true relative bias of truncated parameter gradients.

The estimator (DESIGN.md §3) bounds the bias of truncated BPTT from the norms of state gradients.
This module measures the quantity it stands for, on a stateful model and random windows of a token
stream. S windows of burn-in + L tokens are drawn (:func:`atbptt.sample_windows`); the burn-in runs
without gradient from a zero state, then the L steps of the window run with gradient. The forward
pass is computed once: truncating changes only which steps' parameter contributions a gradient
collects, never a forward value. Two losses:

(a) Final-step loss: the cross-entropy of the last step's prediction (read out from the last state
    h_s), the loss whose state gradients the estimator measures. g is its parameter gradient
    through all L steps; g_K the gradient through only the last K recurrent steps (the state
    h_{s-K} detached; the readout is always included). True relative bias:
    ||mean_S (g - g_K)|| / ||mean_S g||.
(b) Training-window loss, overlap style (the paper's training, DESIGN.md §3): the mean
    cross-entropy of the last K positions of the window. Truncated: back to a state detached
    2K - 1 steps before the end, so that every scored position has at least K steps; full: the
    same loss through all L steps. True relative bias: ||mean_S (f_K - f_K^trunc)|| /
    ||mean_S f_K|| (both the loss and the denominator depend on K here).

How: the L steps are split into buckets at the lags the grid needs (K and 2K - 1 for each K); each
bucket runs on its own alias of the parameters (``torch.func.functional_call`` with fresh leaves
sharing the parameters' storage), so one backward pass returns each bucket's contribution to the
parameter gradient. For loss (a) one backward gives g and g_K for every K of the grid (suffix sums
of the bucket contributions); loss (b) differs with K, so it takes one backward per K. No parameter
``.grad`` is touched.

Uncertainty: the S windows run in G groups of equal size (one batch each). A norm of a mean over
S windows is biased upward by noise, so besides the plain ratio this reports a debiased ratio
(squared norms of the means estimated without the noise term, from the G group means), the noise
floor (the standard error of the numerator's mean, relative to the denominator: true biases near it
are not resolved) and, for loss (a), a bootstrap over the groups.

The model needs ``zero_state(batch_size)``, ``advance(tokens, state)`` (one step, no readout) and
``readout(state)`` (logits), and must be an ``nn.Module`` whose parameters these use. Dropout and
other train/eval switches are the caller's business (the estimator runs in eval mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from .bias import BiasEstimate, estimate_bias
from .bucketed_run import BucketedRun
from .gradient_profile import GradientProfile, State, measure_gradient_profile, sample_windows


class StatefulModel(Protocol):
    """What the ground truth needs of a model (besides being an ``nn.Module``)."""

    def zero_state(self, batch_size: int) -> State: ...

    def advance(self, tokens: Tensor, state: State) -> State: ...

    def readout(self, state: State) -> Tensor: ...


@dataclass
class TrueBias:
    """True relative bias of the truncated gradient at each K of a grid (index as the grid)."""

    truncation_lengths: list[int]
    relative_bias: Tensor  # ||mean (g - g_K)|| / ||mean g||
    debiased: Tensor  # the same with both squared norms debiased for noise; nan if not estimable
    noise_floor: Tensor  # standard error of mean (g - g_K), over ||mean g||
    bootstrap_std: Tensor  # std of the ratio over bootstrap resamples of the groups; nan if none
    bootstrap_low: Tensor  # 2.5% quantile
    bootstrap_high: Tensor  # 97.5% quantile
    gradient_norm: Tensor  # ||mean g|| (per K for the training-window loss)
    # sqrt(unbiased ||E g||^2) / ||mean g||: the share of the mean gradient's norm that is not
    # noise (1: resolved; near 0: the S windows do not resolve the gradient, nor the ratio)
    gradient_signal: Tensor


@dataclass
class GroundTruth:
    """True biases of both losses and the gradient profile, from the same S windows."""

    window: int  # L
    num_sequences: int  # S
    num_groups: int  # G
    final_step: TrueBias
    training_window: TrueBias | None  # None when not measured
    profile: GradientProfile  # L + 1 lags, lag 0 = h_s (the state the final loss reads)


def measure_true_bias(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    truncation_lengths: list[int],
    window: int,
    burnin: int,
    num_sequences: int,
    generator: torch.Generator,
    num_groups: int = 8,
    batch_dim: int = 0,
    bootstrap_samples: int = 1000,
    training_window: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> GroundTruth:
    """Measure the true relative bias of both losses at each K of ``truncation_lengths``.

    ``inputs``/``targets``: aligned 1-D token streams (``targets[t]`` follows ``inputs[t]``).
    ``window``: L, at least 2 K_max - 1 (the overlap loss of K_max backpropagates that far when
    truncated); ``burnin`` >= 1 (the profile measures one step more than L, lag L being the
    state before the window, for the "previous" lag convention). ``num_sequences`` S must be a
    multiple of ``num_groups`` G. ``batch_dim``: the batch dimension of the state tensors.
    ``training_window`` False skips loss (b), which costs one backward per K and a readout of K
    positions (the final-step loss alone allows many more windows). ``progress(done, G)`` is
    called after each group of windows (a measurement can take minutes).
    """
    lengths = sorted({int(length) for length in truncation_lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError("truncation lengths must be positive integers")
    if window < 2 * lengths[-1] - 1:
        raise ValueError(
            f"window {window} is shorter than 2 K_max - 1 = {2 * lengths[-1] - 1}: the truncated "
            "overlap loss of K_max reaches that far; lengthen the window or lower K_max"
        )
    if burnin < 1:
        raise ValueError(f"burnin must be >= 1 (got {burnin}): the profile needs one step more")
    if num_groups < 1 or num_sequences % num_groups:
        raise ValueError(
            f"num_sequences ({num_sequences}) must be a positive multiple of num_groups "
            f"({num_groups})"
        )
    positions, _ = sample_windows(
        torch.arange(inputs.numel()),
        torch.arange(targets.numel()),
        num_sequences,
        burnin + window,
        generator,
    )  # S x (burnin + L), drawn like the estimator's windows
    device = next(model.parameters()).device
    # bucket edges in lags from the end: the truncated gradients need K and 2K - 1 steps
    edges = sorted({*lengths, *(2 * length - 1 for length in lengths), window})
    group_size = num_sequences // num_groups
    final_sums = _GroupVectors(keep_groups=True)
    final_bias = {length: _GroupVectors(keep_groups=True) for length in lengths}
    window_sums = {length: _GroupVectors(keep_groups=False) for length in lengths}
    window_bias = {length: _GroupVectors(keep_groups=False) for length in lengths}
    profiles = []
    for group in range(num_groups):
        rows = positions[group * group_size : (group + 1) * group_size]
        tokens = inputs[rows].to(device)  # m x (burnin + L)
        window_targets = targets[rows[:, burnin:]].to(device)  # m x L
        with torch.autocast(device_type=device.type, enabled=False):  # fp32 like the estimator
            state = model.zero_state(group_size)
            with torch.no_grad():
                for position in range(burnin):
                    state = model.advance(tokens[:, position], state)
            run = BucketedRun(model, state, tokens[:, burnin:], edges, batch_dim)
            final_gradient, final_truncated = run.final_step_gradients(
                window_targets[:, -1], lengths
            )
            final_sums.add(final_gradient)
            for length in lengths:
                final_bias[length].add(final_gradient - final_truncated[length])
            for length in lengths if training_window else []:
                full, truncated = run.training_window_gradients(window_targets, length)
                window_sums[length].add(full)
                window_bias[length].add(full - truncated)
            del run
            profiles.append(
                measure_gradient_profile(
                    lambda tokens, state: (None, model.advance(tokens, state)),
                    model.zero_state(group_size),
                    tokens,
                    window_targets[:, -1],
                    burnin=burnin - 1,
                    batch_dim=batch_dim,
                    readout=model.readout,
                )
            )
        if progress is not None:
            progress(group + 1, num_groups)
    final_step = _true_bias(
        lengths,
        [final_bias[length] for length in lengths],
        [final_sums] * len(lengths),
        bootstrap_samples,
        generator,
    )
    window_truth = None
    if training_window:
        window_truth = _true_bias(
            lengths,
            [window_bias[length] for length in lengths],
            [window_sums[length] for length in lengths],
            0,
            generator,
        )
    profile = GradientProfile(
        norms=torch.stack([p.norms for p in profiles]).mean(0),
        mean_gradients=torch.stack([p.mean_gradients for p in profiles]).mean(0),
        num_sequences=num_sequences,
    )
    return GroundTruth(window, num_sequences, num_groups, final_step, window_truth, profile)


def first_lags(profile: GradientProfile, window: int) -> GradientProfile:
    """The profile of the first ``window`` lags: what a measurement of W steps would give.

    The gradient with respect to a state does not depend on how far back the window started, so
    the first W lags of a longer measurement are exactly a W-step measurement's profile.
    """
    if not 1 <= window <= profile.norms.numel():
        raise ValueError(f"window {window} must lie in [1, {profile.norms.numel()}]")
    return GradientProfile(
        profile.norms[:window], profile.mean_gradients[:window], profile.num_sequences
    )


def delta_hat_on_grid(
    profile: GradientProfile,
    truncation_lengths: list[int],
    cumulative: str = "approx",
    tail_anchor: int | None = None,
    fit_first_lag: int = 0,
) -> tuple[Tensor, BiasEstimate]:
    """The estimator's delta_hat(K) at each K of a grid, and its whole estimate.

    For K beyond the profile's W the estimate's geometric tail is continued: delta_hat(W) times
    beta_hat^(K - W), the formula's own branch for K >= tau.
    """
    estimate = estimate_bias(profile, cumulative, tail_anchor, fit_first_lag)
    window = estimate.relative_bias.numel()
    values = []
    for length in truncation_lengths:
        if length <= window:
            values.append(float(estimate.relative_bias[length - 1]))
        elif math.isfinite(estimate.decay_rate) and 0.0 < estimate.decay_rate < 1.0:
            tail = estimate.decay_rate ** (length - window)
            values.append(float(estimate.relative_bias[window - 1]) * tail)
        else:
            values.append(math.inf)
    return torch.tensor(values, dtype=torch.float64), estimate


def smallest_length_below(
    truncation_lengths: list[int], relative_bias: Tensor, target_bias: float
) -> int | None:
    """The smallest K of the grid whose relative bias is below ``target_bias``; None if none."""
    for length, value in zip(truncation_lengths, relative_bias.tolist()):
        if value < target_bias:
            return length
    return None


# ----------------------------------------------------------------------------------- internals


class _GroupVectors:
    """The G group means of one gradient quantity: their sum, squared norms and (optionally)
    the vectors themselves for a bootstrap."""

    def __init__(self, keep_groups: bool) -> None:
        self.keep_groups = keep_groups
        self.total: Tensor | None = None
        self.square_norms: list[float] = []
        self.vectors: list[Tensor] = []

    def add(self, vector: Tensor) -> None:
        self.total = vector.clone() if self.total is None else self.total + vector
        self.square_norms.append(float(vector.square().sum()))
        if self.keep_groups:
            self.vectors.append(vector.float())

    @property
    def count(self) -> int:
        return len(self.square_norms)

    def mean_norm(self) -> float:
        return float(self.total.norm()) / self.count

    def unbiased_square_norm(self) -> float:
        """Unbiased estimate of ||E mean||^2: the cross terms of the group means only."""
        count = self.count
        if count < 2:
            return math.nan
        return (float(self.total.square().sum()) - sum(self.square_norms)) / (count * (count - 1))

    def standard_error(self) -> float:
        """sqrt(trace of the covariance of the mean over groups)."""
        count = self.count
        if count < 2:
            return math.nan
        spread = sum(self.square_norms) - float(self.total.square().sum()) / count
        return math.sqrt(max(spread, 0.0) / (count * (count - 1)))

    def gram(self) -> Tensor:
        stacked = torch.stack(self.vectors).double()  # G x P
        return stacked @ stacked.t()


def _true_bias(
    lengths: list[int],
    biases: list[_GroupVectors],
    gradients: list[_GroupVectors],
    bootstrap_samples: int,
    generator: torch.Generator,
) -> TrueBias:
    relative, debiased, floor, spread, low, high, norms, signal = [], [], [], [], [], [], [], []
    for bias, gradient in zip(biases, gradients):
        gradient_norm = gradient.mean_norm()
        norms.append(gradient_norm)
        relative.append(bias.mean_norm() / gradient_norm)
        denominator = gradient.unbiased_square_norm()
        signal.append(math.sqrt(max(denominator, 0.0)) / gradient_norm)
        numerator = bias.unbiased_square_norm()
        debiased.append(
            math.sqrt(max(numerator, 0.0) / denominator) if denominator > 0 else math.nan
        )
        floor.append(bias.standard_error() / gradient_norm)
        if bootstrap_samples > 0 and bias.count > 1 and bias.keep_groups:
            ratios = _bootstrap_ratios(bias.gram(), gradient.gram(), bootstrap_samples, generator)
            spread.append(float(ratios.std()))
            low.append(float(ratios.quantile(0.025)))
            high.append(float(ratios.quantile(0.975)))
        else:
            spread.append(math.nan)
            low.append(math.nan)
            high.append(math.nan)

    def tensor(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float64)

    return TrueBias(
        truncation_lengths=lengths,
        relative_bias=tensor(relative),
        debiased=tensor(debiased),
        noise_floor=tensor(floor),
        bootstrap_std=tensor(spread),
        bootstrap_low=tensor(low),
        bootstrap_high=tensor(high),
        gradient_norm=tensor(norms),
        gradient_signal=tensor(signal),
    )


def _bootstrap_ratios(
    bias_gram: Tensor, gradient_gram: Tensor, samples: int, generator: torch.Generator
) -> Tensor:
    """||resampled mean bias|| / ||resampled mean gradient|| for resamples of the G groups.

    With the Gram matrices of the group means, a resample with counts w gives squared norms
    w^T Gram w / G^2, so no vector is touched.
    """
    count = bias_gram.shape[0]
    picks = torch.randint(0, count, (samples, count), generator=generator)
    weights = torch.zeros(samples, count, dtype=torch.float64)
    weights.scatter_add_(1, picks, torch.ones(samples, count, dtype=torch.float64))
    numerator = ((weights @ bias_gram) * weights).sum(1).clamp(min=0).sqrt()
    denominator = ((weights @ gradient_gram) * weights).sum(1).clamp(min=0).sqrt()
    return numerator / denominator
