"""Truncated BPTT at a fixed K, and at the K of an adaptive controller, as gradient estimators."""

from __future__ import annotations

import torch
from torch import Tensor

from ..controller import TruncationController
from ..protocol import RecurrentModel
from .base import Carry, GradientEstimator, add_to_grad, token_loss_sum, trainable

TBPTT_STYLES = ("overlap", "disjoint")


class Truncated(GradientEstimator):
    """Truncated BPTT: backpropagate through the segment only (biased: the history is cut).

    ``disjoint``: the window is the segment, read from the carried state. ``overlap`` (Aicher et
    al.'s): the window also re-reads the K - 1 inputs before the segment, so every scored position
    is backpropagated through at least K steps (the carry keeps those inputs as ``context``).
    """

    def __init__(self, truncation_length: int, style: str = "overlap") -> None:
        super().__init__()
        if truncation_length < 1:
            raise ValueError(f"truncation_length must be at least 1 (got {truncation_length})")
        if style not in TBPTT_STYLES:
            raise ValueError(f"style must be one of {TBPTT_STYLES} (got {style!r})")
        self.fixed_length = truncation_length
        self.style = style

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"tbptt(K={self.truncation_length})"

    @property
    def truncation_length(self) -> int:
        return self.fixed_length

    def segment_length(self, nominal: int) -> int:
        return self.truncation_length

    def accumulate(
        self,
        model: RecurrentModel,
        inputs: Tensor,
        targets: Tensor,
        carry: Carry,
        normaliser: float | None = None,
    ) -> tuple[float, Carry]:
        context = carry.extras.get("context", inputs[:, :0])
        window = torch.cat([context, inputs], 1) if self.style == "overlap" else inputs
        output_start = window.size(1) - inputs.size(1)
        kept = self.truncation_length - 1 if self.style == "overlap" else 0
        carry_offset = max(output_start, window.size(1) - kept)
        logits, carried = model.run_window(window, carry.state, output_start, carry_offset)
        loss = token_loss_sum(logits, targets)
        parameters = [p for _, p in trainable(model)]  # type: ignore[arg-type]
        scale = normaliser if normaliser is not None else targets.numel()
        add_to_grad(parameters, torch.autograd.grad(loss / scale, parameters, allow_unused=True))
        extras = {"context": window[:, carry_offset:]} if self.style == "overlap" else {}
        state = tuple(t.detach() for t in carried)
        return float(loss.detach()) / targets.numel(), Carry(state, extras)


class AdaptiveTruncation(Truncated):
    """Truncated BPTT at the K an adaptive :class:`~atbptt.TruncationController` holds.

    The estimates that move K run on the controller's schedule, outside the estimator (the
    driver calls them); this wrapper only trains at the K in force.
    """

    def __init__(self, controller: TruncationController, style: str = "overlap") -> None:
        super().__init__(controller.truncation_length, style)
        self.controller = controller

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"adaptive(K={self.truncation_length})"

    @property
    def truncation_length(self) -> int:
        return self.controller.truncation_length
