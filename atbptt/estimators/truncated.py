"""Truncated BPTT as a gradient estimator: at the loop's K (fixed or adaptive), at a fixed K,
and at the K of an adaptive controller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..config import TBPTT_STYLES
from ..controller import TruncationController
from ..gradient_profile import State
from ..protocol import RecurrentModel
from .base import (
    Carry,
    GradientEstimator,
    LoopSegment,
    WindowForward,
    add_to_grad,
    token_loss_sum,
    trainable,
)


class Truncation(GradientEstimator):
    """Truncated BPTT at the K it is handed (the loop's K in force, fixed or adaptive):
    backpropagate through the window only (biased: the history is cut).

    ``disjoint``: the window is the segment, read from the carried state. ``overlap`` (Aicher et
    al.'s): the window also re-reads the K - 1 inputs before the segment, so every scored position
    is backpropagated through at least K steps. The loop plans those windows
    (:func:`atbptt.plan_segment`); :meth:`accumulate`, fed disjoint segments, keeps the inputs to
    re-read in the carry as ``context``.
    """

    name = "tbptt"
    checkpointed = False
    differentiable_loss = True

    def __init__(self, style: str = "overlap") -> None:
        super().__init__()
        if style not in TBPTT_STYLES:
            raise ValueError(f"style must be one of {TBPTT_STYLES} (got {style!r})")
        self.style = style

    def normaliser(self, batch_size: int, nominal: int, scored: int) -> float:
        """The scored tokens: the gradient of the mean loss (the paper's)."""
        return float(scored)

    def trained_module(self, model: RecurrentModel) -> RecurrentModel:
        """The model itself (its whole forward, e.g. a fairseq model's)."""
        return model

    def train_segment(
        self,
        model: RecurrentModel,
        segment: LoopSegment,
        carry: Carry,
        scale: float,
        forward: WindowForward | None = None,
        backward: Callable[[Tensor], Any] | None = None,
        ignore_grad: bool = False,
    ) -> tuple[Tensor, Carry]:
        """Run ``forward`` (default: the model's ``run_window`` and the summed cross-entropy)
        and ``backward`` (default ``Tensor.backward``) on the summed loss / ``scale``."""
        loss, carried = (forward or window_loss(model))(segment)
        if ignore_grad:
            loss *= 0
        (backward or Tensor.backward)(loss if scale == 1.0 else loss / scale)
        return loss.detach(), Carry(tuple(tensor.detach() for tensor in carried))

    def accumulate(
        self,
        model: RecurrentModel,
        inputs: Tensor,
        targets: Tensor,
        carry: Carry,
        normaliser: float | None = None,
    ) -> tuple[float, Carry]:
        """One segment fed on its own (not a planned window): in the overlap style it re-reads
        the K - 1 inputs kept in the carry, K the fixed one or else the segment's length."""
        truncation_length = (
            inputs.size(1) if self.truncation_length is None else self.truncation_length
        )
        context = carry.extras.get("context", inputs[:, :0])
        window = torch.cat([context, inputs], 1) if self.style == "overlap" else inputs
        output_start = window.size(1) - inputs.size(1)
        kept = truncation_length - 1 if self.style == "overlap" else 0
        carry_offset = max(output_start, window.size(1) - kept)
        logits, carried = model.run_window(window, carry.state, output_start, carry_offset)
        loss = token_loss_sum(logits, targets)
        parameters = [p for _, p in trainable(model)]  # type: ignore[arg-type]
        scale = normaliser if normaliser is not None else targets.numel()
        add_to_grad(parameters, torch.autograd.grad(loss / scale, parameters, allow_unused=True))
        extras = {"context": window[:, carry_offset:]} if self.style == "overlap" else {}
        state = tuple(t.detach() for t in carried)
        return float(loss.detach()) / targets.numel(), Carry(state, extras)

    @property
    def truncation_length(self) -> int | None:
        """The K it trains at whatever it is handed; None: the K handed (the loop's)."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        return None  # deterministic: nothing of its own to save

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class Truncated(Truncation):
    """Truncated BPTT at a fixed K, whatever nominal length the caller asks for."""

    def __init__(self, truncation_length: int, style: str = "overlap") -> None:
        super().__init__(style)
        if truncation_length < 1:
            raise ValueError(f"truncation_length must be at least 1 (got {truncation_length})")
        self.fixed_length = truncation_length

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"tbptt(K={self.truncation_length})"

    @property
    def truncation_length(self) -> int:
        return self.fixed_length

    def segment_length(self, nominal: int) -> int:
        return self.truncation_length


class AdaptiveTruncation(Truncated):
    """Truncated BPTT at the K an adaptive :class:`~atbptt.TruncationController` holds.

    The estimates that move K run on the controller's schedule, outside the estimator (the
    loop calls them); this wrapper only trains at the K in force.
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


def window_loss(model: RecurrentModel) -> WindowForward:
    """Truncated BPTT's forward: the summed cross-entropy of the scored positions (fp32) and
    the state after ``carry_offset`` steps."""

    def forward(segment: LoopSegment) -> tuple[Tensor, State]:
        logits, carried = model.run_window(
            segment.inputs, segment.state, segment.output_start, segment.carry_offset
        )
        return token_loss_sum(logits, segment.targets), carried

    return forward
