"""What a stateful recurrent model offers so that the driver can train it by (adaptive) TBPTT.

Four methods and one attribute: the training windows run through ``run_window`` (a fused kernel
over many steps), the bias estimate steps the model one token at a time with ``advance`` and reads
the last state out with ``readout``, so that every step's state is in the autograd graph.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from .gradient_profile import State


@runtime_checkable
class RecurrentModel(Protocol):
    """A recurrent model whose full state is an explicit input and output.

    ``state_batch_dim``: the dimension of every state tensor that indexes the sequences (1 for
    ``nn.LSTM``'s ``layers x B x H``). Train/eval switches such as dropout follow ``model.training``
    as usual; the driver puts the model in eval mode for the estimate.
    """

    state_batch_dim: int

    def zero_state(self, batch_size: int) -> State:
        """The state before the first token, on the model's device."""
        ...

    def advance(self, tokens: Tensor, state: State) -> State:
        """One step: tokens ``(B,)`` and a state -> the next state (no output layer)."""
        ...

    def readout(self, state: State) -> Tensor:
        """Logits ``B x V`` from a state, as ``run_window`` computes them at every position."""
        ...

    def run_window(
        self, tokens: Tensor, state: State, output_start: int, carry_offset: int
    ) -> tuple[Tensor, State]:
        """Read ``tokens`` (``B x T``) from ``state``.

        Returns the logits of positions ``output_start..T-1`` (``B x (T - output_start) x V``; the
        earlier positions are context only) and the state after the first ``carry_offset`` steps
        (``0 <= carry_offset <= T``), the one the next window starts from. The driver detaches it.
        """
        ...
