"""An in-window estimate of the truncation bias: measure it directly, extrapolate only beyond W.

The paper's estimate (:mod:`atbptt.bias`) bounds the bias of truncating at K by sums of per-lag
norms of state gradients. On a trained real-text LSTM the ground truth
(:mod:`atbptt.ground_truth`, docs/bias_check.md) finds that bound several times too conservative:
the norms of per-sequence gradients add up where the gradient contributions of the lags partly
cancel, in each sequence and across sequences. This estimate measures the bias inside the window
instead, from the parameter gradient itself:

* one forward pass of the S windows with the W steps grouped in buckets of lags, each bucket on
  its own alias of the parameters, and ONE backward pass of the final-step loss, which returns
  each bucket's contribution to the mean parameter gradient and (the same pass) the state-gradient
  profile;
* relative_bias(K) = ||sum of the contributions of lags >= K within W|| / ||gradient through the
  whole window|| + the paper's estimate at K = W (its geometric tail of the state-gradient norms
  is the only part that reaches beyond the window). Between bucket edges the value of the edge
  at or below K is used, which overstates the bias a little (it falls with K).

The result is a :class:`~atbptt.bias.BiasEstimate`, so the controller chooses K from it as from
the paper's. A caveat: a norm of a mean over S sequences is inflated by noise in its numerator
and denominator alike; the ratio is what the ground truth's plain ratio measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bias import BiasEstimate, estimate_bias
from .bucketed_run import BucketedRun
from .gradient_profile import GradientProfile, State

EDGE_GROWTH = 1.25  # bucket edges grow geometrically beyond the first few lags


@dataclass
class InWindowMeasurement:
    """Mean bucket contributions to the final-step loss's parameter gradient, and the profile."""

    profile: GradientProfile  # W lags, lag 0 = h_s
    edges: list[int]  # bucket edges in lags from the end, ascending, the last = W
    readout_gradient: Tensor  # P, mean over sequences
    bucket_gradients: Tensor  # len(edges) x P, mean over sequences


def bucket_edges(window: int, exact_up_to: int = 8, growth: float = EDGE_GROWTH) -> list[int]:
    """Every lag up to ``exact_up_to``, then edges growing by ``growth``, ending at ``window``.

    About 8 + log(W / 8) / log(growth) buckets (24 for W = 200): memory holds one parameter
    gradient per bucket.
    """
    edges = list(range(1, min(exact_up_to, window) + 1))
    while edges[-1] < window:
        edges.append(min(max(edges[-1] + 1, math.ceil(edges[-1] * growth)), window))
    return edges


def measure_in_window(
    model: nn.Module,
    initial_state: State,
    inputs: Tensor,
    final_targets: Tensor,
    batch_dim: int = 0,
    edges: list[int] | None = None,
) -> InWindowMeasurement:
    """Run the S x W ``inputs`` from ``initial_state`` (the burn-in is the caller's) and measure.

    ``model`` needs ``advance`` and ``readout`` and must be the ``nn.Module`` owning their
    parameters. Runs in fp32; leaves every parameter's ``.grad`` alone.
    """
    window = inputs.shape[1]
    edges = bucket_edges(window) if edges is None else edges
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        run = BucketedRun(model, initial_state, inputs, edges, batch_dim)
        readout, buckets, per_lag = run.final_step_contributions(final_targets)
    per_lag_stack = torch.stack(per_lag)  # W x S x D
    profile = GradientProfile(
        norms=per_lag_stack.norm(dim=2).mean(dim=1).detach(),
        mean_gradients=per_lag_stack.mean(dim=1).detach(),
        num_sequences=inputs.shape[0],
    )
    return InWindowMeasurement(profile, list(edges), readout, torch.stack(buckets))


def estimate_bias_in_window(
    measurement: InWindowMeasurement,
    cumulative: str = "approx",
    tail_anchor: int | None = None,
) -> BiasEstimate:
    """relative_bias(K), K = 1..W: measured within the window plus the norm estimate at W.

    ``cumulative`` and ``tail_anchor`` configure the norm estimate whose value at K = W stands in
    for the bias from beyond the window; its decay rate is reported (a rate >= 1 leaves that part
    unbounded, and the controller falls back to K_max as for the paper's estimate).
    """
    tail = estimate_bias(measurement.profile, cumulative, tail_anchor)
    window = tail.relative_bias.numel()
    buckets = measurement.bucket_gradients.double()  # n x P
    full = measurement.readout_gradient.double() + buckets.sum(0)
    full_norm = float(full.norm())
    # bias at an edge e: the contributions of lags >= e, i.e. of the buckets above it
    above = buckets.flip(0).cumsum(0).flip(0)  # row b: sum of buckets b..n-1
    edge_bias = {0: above[0].norm()}
    for index, edge in enumerate(measurement.edges[:-1]):
        edge_bias[edge] = above[index + 1].norm()
    edge_bias[measurement.edges[-1]] = torch.tensor(0.0, dtype=torch.float64)
    lengths = torch.arange(1, window + 1)
    absolute = torch.empty(window, dtype=torch.float64)
    cumulative_norm = torch.empty(window, dtype=torch.float64)
    known = sorted(edge_bias)
    for index, length in enumerate(lengths.tolist()):
        edge = max(e for e in known if e <= length)  # conservative between edges
        absolute[index] = edge_bias[edge]
    kept = measurement.readout_gradient.double() + (buckets.cumsum(0))  # through edge b
    for index, length in enumerate(lengths.tolist()):
        below = [b for b, e in enumerate(measurement.edges) if e <= length]
        cumulative_norm[index] = (
            kept[below[-1]].norm() if below else measurement.readout_gradient.double().norm()
        )
    beyond = float(tail.relative_bias[window - 1])
    if full_norm > 0 and math.isfinite(beyond):
        relative = absolute / full_norm + beyond
    else:
        relative = torch.full((window,), math.inf, dtype=torch.float64)
    return BiasEstimate(
        decay_rate=tail.decay_rate,
        tail_anchor=tail.tail_anchor,
        cumulative_norm=cumulative_norm,
        absolute_bias=absolute + beyond * full_norm,
        gradient_lower_bound=full_norm,
        relative_bias=relative,
    )
