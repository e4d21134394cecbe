"""One interface for every way of estimating the gradient of a recurrent model's loss.

A :class:`GradientEstimator` trains a stream segment by segment. For each segment it adds to the
parameters' ``.grad`` its estimate of the gradient of the segment's summed cross-entropy (divided
by a normaliser) with respect to the parameters, *through the whole history of the stream*, and
returns what it carries to the next segment (:class:`Carry`): the detached recurrent state, and
whatever the method needs besides (forward-mode sensitivities, the last input tokens).

Truncated BPTT ignores the history before its window (biased); ARTBP, UORO and KF-RTRL estimate
it without bias; exact RTRL computes it. Summed over the segments of a sequence at fixed
parameters, an unbiased estimator's gradients average to the full-BPTT gradient of the sequence
(:func:`full_gradient`), which is what ``tests/test_estimators.py`` checks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gradient_profile import State
from ..protocol import RecurrentModel


@dataclass
class Carry:
    """What an estimator hands from one segment to the next (all detached).

    ``state``: the recurrent state after the segment's last carried step. ``extras``: the
    estimator's own tensors (sensitivities, input context), keyed by name, batch first.
    """

    state: State
    extras: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Carry:
        """The carry on ``device`` (floating tensors also in ``dtype`` if given)."""

        def move(tensor: Tensor) -> Tensor:
            target = dtype if dtype is not None and tensor.is_floating_point() else None
            return tensor.to(device=device, dtype=target)

        return Carry(
            tuple(move(t) for t in self.state), {k: move(v) for k, v in self.extras.items()}
        )

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and plain containers, loadable with ``torch.load(weights_only=True)``."""
        return {
            "state": [t.detach().cpu() for t in self.state],
            "extras": {k: v.detach().cpu() for k, v in self.extras.items()},
        }

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> Carry:
        return cls(tuple(saved["state"]), dict(saved["extras"]))


class GradientEstimator(ABC):
    """Accumulates a gradient estimate into ``.grad``, one segment of a stream at a time.

    ``name`` identifies the method in logs and tables. Random estimators draw from their own CPU
    generator (seeded at construction), so runs are reproducible on any device and the global RNG
    is untouched; :meth:`state_dict` saves the generator for an exact resume.
    """

    name: str = "estimator"

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def segment_length(self, nominal: int) -> int:
        """How many positions the next segment should cover; ``nominal`` is the caller's K.

        Most estimators take ``nominal``; ARTBP draws its random truncation points here.
        """
        return nominal

    def start(self, model: RecurrentModel, batch_size: int) -> Carry:
        """The carry at the start of a stream: the zero state and no history."""
        return Carry(tuple(model.zero_state(batch_size)))

    @abstractmethod
    def accumulate(
        self,
        model: RecurrentModel,
        inputs: Tensor,
        targets: Tensor,
        carry: Carry,
        normaliser: float | None = None,
    ) -> tuple[float, Carry]:
        """Add the estimate of d (sum of the segment's cross-entropies / normaliser) / d params
        to every parameter's ``.grad``; return the segment's mean cross-entropy and the carry.

        ``inputs`` and ``targets`` are ``B x T``: input t predicts target t, every position is
        scored. ``normaliser`` defaults to ``B x T`` (the segment's mean loss).
        """

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------------- helpers

    def random_signs(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Independent +-1 entries drawn on the CPU generator, placed like ``like``."""
        signs = torch.randint(0, 2, shape, generator=self.generator).mul_(2).sub_(1)
        return signs.to(device=like.device, dtype=like.dtype)


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of ``... x V`` logits against ``...`` targets, in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
    )


def add_to_grad(parameters: list[Tensor], gradients: list[Tensor | None]) -> None:
    """``p.grad += g`` for every parameter (creating ``.grad`` where there is none)."""
    for parameter, gradient in zip(parameters, gradients):
        if gradient is None:
            continue
        if parameter.grad is None:
            parameter.grad = gradient.detach().to(parameter.dtype).clone()
        else:
            parameter.grad.add_(gradient.detach().to(parameter.dtype))


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's named parameters that require gradients, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def full_gradient(model: nn.Module, inputs: Tensor, targets: Tensor, normaliser: float) -> Tensor:
    """Full BPTT: the flattened gradient of (summed cross-entropy / normaliser) over a whole
    ``B x T`` sequence read from the zero state, every step in one graph. ``.grad`` untouched."""
    logits, _ = model.run_window(inputs, model.zero_state(inputs.size(0)), 0, inputs.size(1))
    loss = token_loss_sum(logits, targets) / normaliser
    parameters = [p for _, p in trainable(model)]
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return flatten(gradients, parameters)


def sequence_gradient(
    estimator: GradientEstimator,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    nominal_length: int,
    normaliser: float,
) -> Tensor:
    """One estimate of the full gradient: the estimator's gradients summed over the segments
    of a ``B x T`` sequence (from the zero state, parameters fixed). Leaves ``.grad`` zeroed."""
    parameters = [p for _, p in trainable(model)]
    for parameter in parameters:
        parameter.grad = None
    for _ in run_segments(estimator, model, inputs, targets, nominal_length, normaliser):
        pass
    gradient = flatten([p.grad for p in parameters], parameters)
    for parameter in parameters:
        parameter.grad = None
    return gradient


def run_segments(
    estimator: GradientEstimator,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    nominal_length: int,
    normaliser: float | None = None,
    on_segment: Callable[[int, int], None] | None = None,
) -> Iterator[float]:
    """Feed a ``B x T`` sequence to ``estimator`` segment by segment; yield each segment's loss.

    Gradients accumulate in ``.grad`` (the caller zeroes and steps).
    """
    carry = estimator.start(model, inputs.size(0))
    position = 0
    while position < inputs.size(1):
        length = estimator.segment_length(nominal_length)
        end = min(position + length, inputs.size(1))
        if on_segment is not None:
            on_segment(position, end)
        loss, carry = estimator.accumulate(
            model, inputs[:, position:end], targets[:, position:end], carry, normaliser
        )
        position = end
        yield loss


def flatten(gradients: list[Tensor | None] | tuple, parameters: list[Tensor]) -> Tensor:
    """One vector of all gradients (zeros for a parameter without one), in fp32."""
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(gradients, parameters)
        ]
    )


# ------------------------------------------------------------------ forward-mode methods

StepFunction = Callable[[dict[str, Tensor], Tensor, State], State]


class _Advance(nn.Module):
    """``forward`` is the wrapped model's ``advance``, for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, state: State) -> State:
        return self.model.advance(tokens, state)


def functional_step(model: nn.Module) -> tuple[dict[str, nn.Parameter], StepFunction]:
    """The parameters a model's recurrence reads and its step as a pure function of them.

    Models with ``recurrent_parameters()`` and ``step(params, tokens, state)`` (those of
    :mod:`atbptt.estimators.models`) give theirs; any other ``nn.Module`` model is stepped by
    calling its ``advance`` with every trainable parameter swapped in (``functional_call``), so
    those parameters all get sensitivities, including the readout's (whose stay zero).
    """
    if hasattr(model, "recurrent_parameters") and hasattr(model, "step"):
        return dict(model.recurrent_parameters()), model.step
    wrapper = _Advance(model)
    parameters = {f"model.{name}": p for name, p in trainable(model)}

    def step(params: dict[str, Tensor], tokens: Tensor, state: State) -> State:
        return torch.func.functional_call(wrapper, params, (tokens, state), strict=False)

    return parameters, step


def immediate_step(
    model: nn.Module,
    step: StepFunction,
    params: dict[str, nn.Parameter],
    tokens: Tensor,
    previous: State,
    targets: Tensor,
    scale: float,
) -> tuple[Tensor, State, tuple[Tensor, ...]]:
    """One step from a detached state, backpropagated through that step only.

    Adds to ``.grad`` the exact gradient of this step's loss / ``scale`` with the previous state
    held fixed (the readout's gradient and the step's immediate dependence on the parameters);
    returns the summed loss, the new state (detached) and the loss gradient with respect to it,
    which the caller contracts with its sensitivities for the part through the history.
    """
    state = step(params, tokens, tuple(t.detach() for t in previous))
    loss = token_loss_sum(model.readout(state), targets)
    parameters = [p for _, p in trainable(model)]
    gradients = torch.autograd.grad(loss / scale, [*parameters, *state], allow_unused=True)
    add_to_grad(parameters, list(gradients[: len(parameters)]))
    state_gradients = tuple(
        torch.zeros_like(t) if g is None else g for g, t in zip(gradients[len(parameters) :], state)
    )
    return loss.detach(), tuple(t.detach() for t in state), state_gradients


def per_example(tensor: Tensor, batch_dim: int) -> Tensor:
    """``B x D``: the tensor's entries per sequence, flattened."""
    return tensor.movedim(batch_dim, 0).reshape(tensor.size(batch_dim), -1)
