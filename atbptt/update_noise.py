"""The truncation bias relative to the training update's gradient noise, from R in-window estimates.

The paper's delta is the bias relative to the full gradient. An SGD update does not see the full
gradient: it sees a minibatch mean over (columns x K) scored tokens, whose noise on real text is
many times the full gradient (docs/bias_check.md: a signal share of 0.06 at 256 windows). A bias
far below that noise changes the step little, while every extra step of K costs compute. This
module measures, from the R independent in-window measurements of one decision:

* the squared norm of the full gradient G and of the bias b(K) inside the window, each debiased
  of the measurement's own noise by the cross products of independent repeats
  (E <x_r, x_s> = ||E x||^2 for r != s), and the per-token gradient variance sigma^2 from the
  spread of the repeats (each is a mean over S windows' final-step losses);
* the expected squared norm of an update's gradient at K, ||G||^2 + sigma^2 / (columns x K),
  counting the scored tokens of an update as independent (optimistic about the noise, so it
  errs towards the paper's longer K);
* relative_bias(K) = (||b(K)|| + the norm tail beyond W) / sqrt(||G||^2 + sigma^2 / (columns x K)).

Memory: one float32 copy of the parameter gradient per bucket of lags (about 24 for W = 400).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .bias import BiasEstimate
from .in_window import InWindowMeasurement


@dataclass
class UpdateNoise:
    """What R in-window measurements say about the signal, the bias and the noise."""

    signal_square: float  # ||G||^2, debiased (>= 0)
    token_variance: float  # sigma^2: trace of the covariance of one window's final-step gradient
    edges: list[int]  # bucket edges, in lags
    bias_square: Tensor  # len(edges), ||b(edge)||^2 inside the window, debiased (>= 0)

    def update_square(self, scored_tokens: int) -> float:
        """Expected squared norm of a minibatch mean gradient over ``scored_tokens`` tokens."""
        return self.signal_square + self.token_variance / max(scored_tokens, 1)

    def signal_share(self, scored_tokens: int) -> float:
        """The full gradient's share of that expected squared norm."""
        total = self.update_square(scored_tokens)
        return self.signal_square / total if total > 0 else math.nan

    def relative_to_update(
        self, window: int, update_columns: int, beyond_window: float, decay_rate: float
    ) -> BiasEstimate:
        """Bias relative to the update at every K = 1..``window``.

        ``beyond_window`` is the norm estimate's relative bias at K = W (the only part measured
        from norms, as in :func:`atbptt.estimate_bias_in_window`); it scales with ||G||.
        Between bucket edges the edge at or below K is used (conservative: the bias falls in K).
        """
        lengths = torch.arange(1, window + 1)
        edges = torch.tensor(self.edges)
        below = torch.searchsorted(edges, lengths, right=True) - 1  # last edge <= K
        inside = self.bias_square.double().clamp(min=0).sqrt()[below.clamp(min=0)]
        signal = math.sqrt(self.signal_square)
        absolute = inside + beyond_window * signal
        scored = lengths.double() * update_columns
        update_norm = (self.signal_square + self.token_variance / scored).sqrt()
        relative = absolute / update_norm
        if not math.isfinite(beyond_window) or not bool(torch.isfinite(relative).all()):
            relative = torch.full((window,), math.inf, dtype=torch.float64)
        return BiasEstimate(
            decay_rate=decay_rate,
            tail_anchor=window - 1,
            cumulative_norm=torch.full((window,), signal, dtype=torch.float64),
            absolute_bias=absolute,
            gradient_lower_bound=signal,
            relative_bias=relative,
        )


class UpdateNoiseAccumulator:
    """Collects R in-window measurements (``add``) and returns their :class:`UpdateNoise`."""

    def __init__(self) -> None:
        self._count = 0
        self._edges: list[int] | None = None
        self._sequences = 0
        self._gradient_sum: Tensor | None = None  # P
        self._gradient_square_sum = 0.0
        self._bias_sum: Tensor | None = None  # len(edges) x P
        self._bias_square_sum: Tensor | None = None  # len(edges)

    def add(self, measurement: InWindowMeasurement, sequences: int) -> None:
        """Add one measurement, a mean over ``sequences`` windows."""
        buckets = measurement.bucket_gradients.float()  # n x P
        gradient = measurement.readout_gradient.float() + buckets.sum(0)
        # the bias at edge i: the contributions of the buckets above it; none at the last edge
        above = buckets.flip(0).cumsum(0).flip(0)  # row i: sum of buckets i..n-1
        bias = torch.cat([above[1:], torch.zeros_like(above[:1])])
        if self._edges is None:
            self._edges, self._sequences = list(measurement.edges), sequences
            self._gradient_sum = torch.zeros_like(gradient)
            self._bias_sum = torch.zeros_like(bias)
            self._bias_square_sum = torch.zeros(bias.size(0), dtype=torch.float64)
        elif self._edges != list(measurement.edges) or self._sequences != sequences:
            raise ValueError("the R measurements of one decision must share edges and windows")
        self._count += 1
        self._gradient_sum += gradient
        self._gradient_square_sum += float(gradient.double().square().sum())
        self._bias_sum += bias
        self._bias_square_sum += bias.double().square().sum(1)

    def result(self) -> UpdateNoise:
        """Debiased squared norms and the per-token variance; needs at least two measurements."""
        count = self._count
        if count < 2:
            raise ValueError(f"the noise needs at least 2 measurements (got {count})")
        # sum over r != s of <x_r, x_s> = ||sum x_r||^2 - sum ||x_r||^2, over R (R - 1) pairs
        pairs = count * (count - 1)
        total_square = float(self._gradient_sum.double().square().sum())
        signal_square = (total_square - self._gradient_square_sum) / pairs
        # the spread of the repeats: sum ||x_r - mean||^2 / (R - 1) estimates sigma^2 / S
        spread = (self._gradient_square_sum - total_square / count) / (count - 1)
        bias_square = (self._bias_sum.double().square().sum(1) - self._bias_square_sum) / pairs
        return UpdateNoise(
            signal_square=max(signal_square, 0.0),
            token_variance=max(spread, 0.0) * self._sequences,
            edges=list(self._edges),
            bias_square=bias_square.clamp(min=0),
        )
