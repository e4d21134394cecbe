"""Two small recurrent models whose step is a pure function of explicit parameters.

Both satisfy :class:`atbptt.RecurrentModel` (so the driver and truncated BPTT train them) and
expose ``step(params, tokens, state)``, which forward-mode methods differentiate with
``torch.func``. Inputs are token ids read as one-hot vectors, so the input weights are the
embedding: every parameter of the recurrence sits in the matrices the RTRL methods track.

- :class:`TanhRnn`: ``h_t = tanh(W [onehot(x_t); h_{t-1}] + b)``, the class KF-RTRL is built for
  (one weight matrix applied to the step's input and previous state).
- :class:`ElementwiseLstm`: the element-wise (diagonal) recurrent LSTM of Irie, Gopalakrishnan &
  Schmidhuber (2023), for which exact RTRL is tractable: unit i's state depends only on unit i's
  own parameters, so its sensitivities take as much memory as the parameters themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gradient_profile import State

Params = dict[str, Tensor]


class _OneHotRecurrent(nn.Module):
    """Shared parts: vocabulary, a linear readout of the hidden vector, windows by stepping."""

    state_batch_dim = 0  # every state tensor is B x H

    def __init__(self, vocabulary: int, hidden: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.hidden = hidden
        self.output = nn.Linear(hidden, vocabulary)

    def recurrent_parameters(self) -> Params:
        """The parameters ``step`` reads (the readout's are not among them)."""
        raise NotImplementedError

    def one_hot(self, tokens: Tensor, dtype: torch.dtype) -> Tensor:
        """``... x V`` one-hot rows (a comparison, which ``torch.func.vmap`` can batch)."""
        symbols = torch.arange(self.vocabulary, device=tokens.device)
        return (tokens[..., None] == symbols).to(dtype)

    def step(self, params: Params, tokens: Tensor, state: State) -> State:
        raise NotImplementedError

    def advance(self, tokens: Tensor, state: State) -> State:
        return self.step(self.recurrent_parameters(), tokens, state)

    def readout(self, state: State) -> Tensor:
        return self.output(state[-1])

    def run_window(
        self, tokens: Tensor, state: State, output_start: int, carry_offset: int
    ) -> tuple[Tensor, State]:
        params = self.recurrent_parameters()
        hidden, carried = [], state
        for position in range(tokens.size(1)):
            state = self.step(params, tokens[:, position], state)
            if position + 1 == carry_offset:
                carried = state
            if position >= output_start:
                hidden.append(state[-1])
        if not hidden:
            return self.output.weight.new_zeros(tokens.size(0), 0, self.vocabulary), carried
        return self.output(torch.stack(hidden, 1)), carried


class TanhRnn(_OneHotRecurrent):
    """``h_t = tanh(W [onehot(x_t); h_{t-1}] + b)``; logits ``= V h_t + c``. State ``(h,)``."""

    def __init__(self, vocabulary: int, hidden: int) -> None:
        super().__init__(vocabulary, hidden)
        self.weight = nn.Parameter(torch.empty(hidden, vocabulary + hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        nn.init.normal_(self.weight[:, :vocabulary], std=1.0)
        nn.init.orthogonal_(self.weight.data[:, vocabulary:])

    def recurrent_parameters(self) -> Params:
        return {"weight": self.weight, "bias": self.bias}

    def zero_state(self, batch_size: int) -> State:
        return (self.weight.new_zeros(batch_size, self.hidden),)

    def step(self, params: Params, tokens: Tensor, state: State) -> State:
        inputs = torch.cat([self.one_hot(tokens, state[0].dtype), state[0]], -1)
        return (torch.tanh(F.linear(inputs, params["weight"], params["bias"])),)


class ElementwiseLstm(_OneHotRecurrent):
    """An LSTM whose recurrent connections are element-wise (after Irie et al., 2023).

    With gates computed from the input and the unit's own previous cell::

        f, z, o = sigmoid, tanh, sigmoid of  W_g onehot(x_t) + w_g * c_{t-1} + b_g
        c_t = f * c_{t-1} + (1 - f) * z,      h_t = o * c_t

    State ``(c, h)``; only ``c`` is recurrent, ``h`` is what the readout sees. Parameters:
    ``input_weight`` (3H x V, rows f, z, o), ``recurrent_weight`` and ``bias`` (3H each).
    """

    GATES = 3

    def __init__(self, vocabulary: int, hidden: int) -> None:
        super().__init__(vocabulary, hidden)
        self.input_weight = nn.Parameter(torch.randn(self.GATES * hidden, vocabulary))
        self.recurrent_weight = nn.Parameter(torch.empty(self.GATES * hidden).uniform_(-1, 1))
        bias = torch.zeros(self.GATES * hidden)
        bias[:hidden] = 1.0  # forget gates start mostly open: memory from the first update
        self.bias = nn.Parameter(bias)

    def recurrent_parameters(self) -> Params:
        return {
            "input_weight": self.input_weight,
            "recurrent_weight": self.recurrent_weight,
            "bias": self.bias,
        }

    @property
    def unit_parameters(self) -> int:
        """Parameters of one unit: a column of each gate's input weights, a recurrent weight
        and a bias per gate."""
        return self.GATES * (self.vocabulary + 2)

    def zero_state(self, batch_size: int) -> State:
        zeros = self.input_weight.new_zeros(batch_size, self.hidden)
        return zeros, zeros.clone()

    def step(self, params: Params, tokens: Tensor, state: State) -> State:
        cell = state[0]
        inputs = self.one_hot(tokens, cell.dtype)
        pre = (
            F.linear(inputs, params["input_weight"])
            + torch.cat([cell] * self.GATES, -1) * params["recurrent_weight"]
            + params["bias"]
        )
        forget, candidate, output = pre.chunk(self.GATES, -1)
        forget = torch.sigmoid(forget)
        cell = forget * cell + (1 - forget) * torch.tanh(candidate)
        return cell, torch.sigmoid(output) * cell
