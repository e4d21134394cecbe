"""ARTBP: truncated BPTT with random truncation points and compensation factors (Tallec &
Ollivier 2017, "Unbiasing Truncated Backpropagation Through Time").

Between any two steps the backward pass is cut with probability c. Where it is not cut, the
gradient flowing back across that step boundary is multiplied by 1 / (1 - c). A path from a loss
back through k boundaries survives with probability (1 - c)^k and is then scaled by (1 - c)^-k,
so summed over the segments of a sequence the estimate is unbiased for the full BPTT gradient.
The segments themselves are the stretches between cuts: their lengths are geometric with mean
1 / c, drawn by :meth:`Artbp.segment_length`; the state is carried detached across a cut, as in
truncated BPTT.

The paper lets c vary with time (its choice trades compute against variance); here c is a
constant, 1 / mean length. The variance stays bounded only while the backpropagated gradient
shrinks per step faster than 1 - c grows the compensation, so a mean length well above the
model's memory keeps it small.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..protocol import RecurrentModel
from .base import Carry, GradientEstimator, add_to_grad, token_loss_sum, trainable


class Artbp(GradientEstimator):
    """Anticipated reweighted truncated BPTT with truncation probability ``1 / mean_length``
    per step boundary (``mean_length`` None: the caller's nominal segment length)."""

    name = "artbp"

    def __init__(self, mean_length: int | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        if mean_length is not None and mean_length <= 1:
            raise ValueError(f"mean_length must be above 1 (got {mean_length})")
        self.mean_length = mean_length
        self.truncation_probability = None if mean_length is None else 1.0 / mean_length

    def segment_length(self, nominal: int) -> int:
        mean = self.mean_length or nominal
        if mean <= 1:
            raise ValueError(f"ARTBP needs a mean segment length above 1 (got {mean})")
        self.truncation_probability = 1.0 / mean
        uniform = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        # geometric on 1, 2, ...: P(L > l) = (1 - c)^l
        return max(1, math.ceil(math.log1p(-uniform) / math.log1p(-self.truncation_probability)))

    def accumulate(
        self,
        model: RecurrentModel,
        inputs: Tensor,
        targets: Tensor,
        carry: Carry,
        normaliser: float | None = None,
    ) -> tuple[float, Carry]:
        if self.truncation_probability is None:
            raise RuntimeError("call segment_length() before accumulate(): it draws the cut")
        compensation = 1.0 / (1.0 - self.truncation_probability)
        state = carry.state
        loss = inputs.new_zeros((), dtype=torch.float32)
        for position in range(inputs.size(1)):
            if position > 0:  # a boundary that was not cut: scale what crosses it backwards
                state = tuple(_scale_backward(t, compensation) for t in state)
            state = model.advance(inputs[:, position], state)
            loss = loss + token_loss_sum(model.readout(state), targets[:, position])
        parameters = [p for _, p in trainable(model)]  # type: ignore[arg-type]
        scale = normaliser if normaliser is not None else targets.numel()
        add_to_grad(parameters, torch.autograd.grad(loss / scale, parameters, allow_unused=True))
        return float(loss.detach()) / targets.numel(), Carry(tuple(t.detach() for t in state))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "truncation_probability": self.truncation_probability}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.truncation_probability = state["truncation_probability"]


def _scale_backward(tensor: Tensor, factor: float) -> Tensor:
    """``tensor`` unchanged forwards; its gradient multiplied by ``factor`` backwards."""
    if not tensor.requires_grad:
        return tensor
    scaled = tensor.clone()
    scaled.register_hook(lambda gradient: gradient * factor)
    return scaled
