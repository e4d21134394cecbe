"""Per-lag norms of the loss gradient with respect to the recurrent state (DESIGN.md §3, steps 1-3).

The profile phi_k = E || d L_s / d state_{s-k} || is what the bias estimate and the choice of the
truncation length K are built on. It is measured on random windows of the training stream with the
model as it is, without touching any parameter's ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

State = tuple[Tensor, ...]
"""Full recurrent state (e.g. an LSTM's ``(h, c)``), batch along ``batch_dim``."""

StepFn = Callable[[Tensor, State], tuple[Tensor, State]]
"""One recurrent step: tokens ``(B,)`` long and a state -> ``(logits B x V, next state)``.

The logits must be computed from the returned state, so that the loss reaches the last state
(lag 0) through the readout. Dropout and other train/eval switches are the caller's business.
"""


Readout = Callable[[State], Tensor]
"""Logits B x V from a state. When given to the measurement, the step's own logits are ignored
(a step may return None for them) and only the final state is read out: the output layer of a
large vocabulary then runs once per window instead of once per step."""


@dataclass
class GradientProfile:
    """Gradient of the final-step loss with respect to the state at every lag of a window."""

    norms: Tensor  # W, mean over sequences of || d loss / d state_{s-k} ||, lag k = 0..W-1
    mean_gradients: Tensor  # W x D, mean over sequences of the flattened d loss / d state_{s-k}
    num_sequences: int

    def without_readout_lag(self) -> GradientProfile:
        """The profile with lags counted from the state before the one the loss reads.

        The paper writes phi_k = || dL_s / dh_{s-k} || from k = 0, the state the final loss reads
        (phi_0 is then the readout's gradient); the authors' code starts its lag 0 at h_{s-1}.
        Dropping lag 0 turns the first convention into the second.
        """
        return GradientProfile(self.norms[1:], self.mean_gradients[1:], self.num_sequences)


def sample_windows(
    inputs: Tensor,
    targets: Tensor,
    num_sequences: int,
    length: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Cut ``num_sequences`` windows of ``length`` tokens at uniform random offsets of a stream.

    ``inputs`` and ``targets`` are aligned 1-D streams: ``targets[t]`` is the token predicted after
    reading ``inputs[t]``. Offsets are drawn on CPU with ``generator`` so that every rank given the
    same seed draws the same windows. Returns the S x length input windows and the S targets of
    their final steps.
    """
    if inputs.dim() != 1 or inputs.shape != targets.shape:
        raise ValueError("inputs and targets must be aligned 1-D token streams of the same length")
    stream_length = inputs.numel()
    if not 1 <= length <= stream_length:
        raise ValueError(
            f"window length {length} does not fit in a stream of {stream_length} tokens; "
            "use a shorter window or burn-in, or a longer stream"
        )
    offsets = torch.randint(
        0, stream_length - length + 1, (num_sequences,), generator=generator, device="cpu"
    )  # S
    positions = offsets[:, None] + torch.arange(length)  # S x length
    positions = positions.to(inputs.device)
    return inputs[positions], targets[positions[:, -1]]


def measure_gradient_profile(
    step: StepFn,
    initial_state: State,
    inputs: Tensor,
    final_targets: Tensor,
    burnin: int,
    batch_dim: int = 0,
    readout: Readout | None = None,
) -> GradientProfile:
    """Measure the gradient profile with ONE backward pass through the whole window.

    ``inputs`` is S x (burnin + W). The burn-in runs without gradient from ``initial_state``; the
    next W steps keep their output states, and the gradients of the final step's loss with respect
    to all of them come from a single ``torch.autograd.grad`` call, which leaves ``.grad`` of every
    parameter alone. Lag 0 is the last state, the one the final logits are computed from
    (by ``readout`` if given, else by the last ``step``).
    """
    with torch.autocast(device_type=inputs.device.type, enabled=False):  # fp32, backward too
        states, loss = _run_window(step, initial_state, inputs, final_targets, burnin, readout)
        flat_states = [tensor for state in states for tensor in state]
        flat_gradients = torch.autograd.grad(loss, flat_states, allow_unused=True)
    state_size = len(states[0])
    gradients = [
        _flatten_per_sequence(
            flat_gradients[lag * state_size : (lag + 1) * state_size], states[lag], batch_dim
        )
        for lag in range(len(states))
    ]
    return _summarise(gradients)


def measure_gradient_profile_naive(
    step: StepFn,
    initial_state: State,
    inputs: Tensor,
    final_targets: Tensor,
    burnin: int,
    batch_dim: int = 0,
    readout: Readout | None = None,
) -> GradientProfile:
    """Reference implementation with one backward pass per lag (W passes instead of one).

    Same contract as :func:`measure_gradient_profile`; kept for tests and the benchmark that shows
    what the single pass saves.
    """
    gradients = []
    with torch.autocast(device_type=inputs.device.type, enabled=False):
        states, loss = _run_window(step, initial_state, inputs, final_targets, burnin, readout)
        for state in states:
            state_gradients = torch.autograd.grad(
                loss, list(state), retain_graph=True, allow_unused=True
            )
            gradients.append(_flatten_per_sequence(state_gradients, state, batch_dim))
    return _summarise(gradients)


def _run_window(
    step: StepFn,
    initial_state: State,
    inputs: Tensor,
    final_targets: Tensor,
    burnin: int,
    readout: Readout | None = None,
) -> tuple[list[State], Tensor]:
    """Burn in without gradient, then run the window keeping every state; return states by lag.

    Called with autocast disabled: the profile is measured in fp32.

    The loss is the summed cross-entropy of the final step, so that each sequence's gradient is
    the gradient of its own loss and the norms do not shrink with the number of sequences (the
    mean loss would scale all of them by 1/S; ratios such as the decay rate are the same).
    """
    num_sequences, total_length = inputs.shape
    window = total_length - burnin
    if burnin < 0 or window < 1:
        raise ValueError(f"inputs of length {total_length} leave no window after burn-in {burnin}")
    if final_targets.shape != (num_sequences,):
        raise ValueError("final_targets must hold one target per sequence")
    state = initial_state
    with torch.no_grad():
        for position in range(burnin):
            _, state = step(inputs[:, position], state)
    with torch.enable_grad():
        # A fresh leaf, so the window's states require grad even for a parameter-free step.
        state = tuple(tensor.detach().requires_grad_() for tensor in state)
        states = []
        for position in range(burnin, total_length):
            logits, state = step(inputs[:, position], state)
            states.append(state)
        if readout is not None:
            logits = readout(state)
        loss = F.cross_entropy(logits.float(), final_targets, reduction="sum")
    states.reverse()  # index = lag: states[0] is the last state
    return states, loss


def _flatten_per_sequence(
    gradients: tuple[Tensor | None, ...], state: State, batch_dim: int
) -> Tensor:
    """Join the gradients of all state tensors into one S x D matrix (zeros where unused)."""
    pieces = []
    for gradient, tensor in zip(gradients, state):
        if gradient is None:
            gradient = torch.zeros_like(tensor)
        gradient = gradient.float().movedim(batch_dim, 0)
        pieces.append(gradient.reshape(gradient.shape[0], -1))  # S x D_i
    return torch.cat(pieces, dim=1)  # S x D


def _summarise(gradients: list[Tensor]) -> GradientProfile:
    """Average per-sequence norms and per-sequence gradients over the S sequences."""
    stacked = torch.stack(gradients)  # W x S x D
    return GradientProfile(
        norms=stacked.norm(dim=2).mean(dim=1).detach(),  # W
        mean_gradients=stacked.mean(dim=1).detach(),  # W x D
        num_sequences=stacked.shape[1],
    )
