"""One interface for every way of estimating the gradient of a recurrent model's loss.

A :class:`GradientEstimator` trains a stream segment by segment. For each segment it adds to the
parameters' ``.grad`` its estimate of the gradient of the segment's summed cross-entropy (divided
by a normaliser) with respect to the parameters, *through the whole history of the stream*, and
returns what it carries to the next segment (:class:`Carry`): the detached recurrent state, and
whatever the method needs besides (forward-mode sensitivities, the last input tokens).

Truncated BPTT (fixed or adaptive K, :mod:`atbptt.estimators.truncated`) ignores the history
before its window (biased); ARTBP, UORO and KF-RTRL estimate it without bias; exact RTRL computes
it. Every one of them trains through :meth:`GradientEstimator.train_segment` on the segments that
:func:`next_segment` cuts, in :class:`atbptt.TbpttLoop` and in :func:`run_segments` alike. Summed
over the segments of a sequence at fixed parameters, an unbiased estimator's gradients average to the full-BPTT gradient of the sequence
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
from ..token_stream import Segment, StreamCursor, plan_segment


@dataclass
class LoopSegment:
    """One update's window over the columns, as :meth:`GradientEstimator.train_segment` trains it.

    Read ``inputs`` from ``state``, score the positions from ``output_start`` on against
    ``targets``, carry the state after ``carry_offset`` steps. ``normaliser``: the divisor of the
    summed cross-entropy whose gradient is written (:meth:`GradientEstimator.normaliser`).
    """

    inputs: Tensor  # B x T, on the model's device
    targets: Tensor  # B x (T - output_start)
    state: State  # the carried state (detached), or a zero state at the start of a pass
    output_start: int
    carry_offset: int
    truncation_length: int  # K in force for this update (capped at the column length)
    trained_length: int  # what trunc_k logs: K, or an estimator's segment length (ARTBP: random)
    new_pass: bool  # the state was reset: a pass over the data begins
    normaliser: float


# truncated BPTT's forward of a segment: its summed cross-entropy and the state after carry_offset
WindowForward = Callable[[LoopSegment], tuple[Tensor, State]]


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


def trained_module(model: RecurrentModel) -> RecurrentModel:
    """The module an estimator takes the gradient of: the core recurrence a model hands over with
    ``gradient_estimation_model()`` (whose parameters are the model's), else the model itself."""
    handed_over = getattr(model, "gradient_estimation_model", None)
    return model if handed_over is None else handed_over()


class GradientEstimator(ABC):
    """Accumulates a gradient estimate into ``.grad``, one segment of a stream at a time.

    ``name`` identifies the method in logs and tables. Random estimators draw from their own CPU
    generator (seeded at construction), so runs are reproducible on any device and the global RNG
    is untouched; :meth:`state_dict` saves the generator for an exact resume.
    """

    name: str = "estimator"
    # how the loop cuts segments for it (plan_segment): truncated BPTT may overlap its windows
    style: str = "disjoint"
    # whether it has a checkpoint part of its own (generator, carry with history); truncated
    # BPTT's carry is the bare recurrent state, which the checkpoints hold as ``carried_state``
    checkpointed: bool = True
    # whether a segment's gradient is the backward of the window's loss, which a caller may run
    # itself (the plain-PyTorch driver's ``segment.loss``): truncated BPTT only
    differentiable_loss: bool = False

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

    def normaliser(self, batch_size: int, nominal: int, scored: int) -> float:
        """The divisor of a segment's summed cross-entropy in training: B x the nominal K, so
        that a random segment length (ARTBP) does not rescale the step."""
        return float(batch_size * nominal)

    def trained_module(self, model: RecurrentModel) -> RecurrentModel:
        """The module the gradient is taken of (:func:`trained_module`)."""
        return trained_module(model)

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
        """Add the gradient estimate of the segment's summed cross-entropy / ``scale`` to
        ``.grad``; return that sum (detached) and the carry for the next segment.

        ``forward`` and ``backward`` are truncated BPTT's (a front end's own forward and
        backward of the window's loss); this estimator writes ``.grad`` itself. ``ignore_grad``:
        leave ``.grad`` as it was (fairseq's dummy batches); the carry still advances.
        """
        parameters = [p for p in model.parameters() if p.requires_grad]  # type: ignore
        kept = (
            [None if p.grad is None else p.grad.clone() for p in parameters] if ignore_grad else []
        )
        mean_loss, carry = self.accumulate(model, segment.inputs, segment.targets, carry, scale)
        if ignore_grad:
            for parameter, grad in zip(parameters, kept):
                parameter.grad = grad
        return torch.tensor(mean_loss * segment.targets.numel(), dtype=torch.float64), carry

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

    def state_dict(self) -> dict[str, Any] | None:
        """Its checkpoint part (None: nothing to save, see ``checkpointed``)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.generator.set_state(state["generator"])  # type: ignore[index]

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
    """Feed a ``B x T`` sequence to ``estimator`` segment by segment, as the loop does (the
    segments of :func:`atbptt.plan_segment`, trained by :meth:`GradientEstimator.train_segment`)
    but without joining a short remainder to the last segment (so that ARTBP's cuts stay its
    own); yield each segment's mean loss. ``normaliser`` defaults to each segment's scored
    tokens (its mean loss). ``on_segment(start, end)``: the scored positions, before each.

    Gradients accumulate in ``.grad`` (the caller zeroes and steps).
    """
    cursor, carry = StreamCursor(), None
    while cursor.position < inputs.size(1):
        segment, carry = next_segment(
            estimator, model, (inputs, targets), cursor, carry, nominal_length, join_remainder=False
        )
        if on_segment is not None:
            on_segment(cursor.position - segment.targets.size(1), cursor.position)
        scale = float(segment.targets.numel()) if normaliser is None else normaliser
        loss, carry = estimator.train_segment(model, segment, carry, scale)
        yield float(loss) / segment.targets.numel()


def next_segment(
    estimator: GradientEstimator,
    model: RecurrentModel,
    columns: tuple[Tensor, Tensor],
    cursor: StreamCursor,
    carry: Carry | None,
    nominal_length: int,
    join_remainder: bool = True,
) -> tuple[LoopSegment, Carry]:
    """The next segment of ``columns`` (B x n inputs and targets) for ``estimator`` at the
    nominal K, on the device and in the precision of ``model``, and the carry it starts from
    (the estimator's fresh one at the start of a pass); advances ``cursor`` past it.

    The one place that cuts segments and hands the carry on: :meth:`atbptt.TbpttLoop.next_segment`
    and :func:`run_segments` call it. ``join_remainder``: see :func:`atbptt.plan_segment`.
    """
    length = estimator.segment_length(nominal_length)
    plan = plan_segment(cursor, length, estimator.style, columns[0].size(1), join_remainder)
    device, dtype = placement(model)
    inputs, targets = cut_segment(columns, plan, device)
    if plan.new_pass or carry is None:
        carry = estimator.start(model, inputs.size(0))
    else:  # a carry restored from a checkpoint lives on the CPU, maybe in another dtype
        carry = carry.to(device, dtype)
    segment = LoopSegment(
        inputs=inputs,
        targets=targets,
        state=carry.state,
        output_start=plan.output_start,
        carry_offset=plan.carry_offset,
        truncation_length=nominal_length,
        trained_length=length,
        new_pass=plan.new_pass,
        normaliser=estimator.normaliser(inputs.size(0), nominal_length, targets.numel()),
    )
    return segment, carry


def cut_segment(
    columns: tuple[Tensor, Tensor], plan: Segment, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The inputs of a planned window and the targets of its scored positions, on ``device``."""
    inputs, targets = columns
    window = slice(plan.window_start, plan.window_end)
    scored = slice(plan.window_start + plan.output_start, plan.window_end)
    return inputs[:, window].to(device), targets[:, scored].to(device)


def placement(model: RecurrentModel) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's state (from its parameters when it has any)."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
    reference = model.zero_state(1)[0]
    return reference.device, reference.dtype


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
