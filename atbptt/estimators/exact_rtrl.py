"""Exact RTRL for the element-wise LSTM (Irie, Gopalakrishnan & Schmidhuber 2023).

In :class:`~atbptt.estimators.models.ElementwiseLstm` unit i's cell reads only its own previous
cell and its own parameters (one column of each gate's input weights, a recurrent weight and a
bias per gate: ``unit_parameters`` of them). Its sensitivity d c_t[i] / d theta_i is therefore a
vector of that length per unit and sequence, B x H x P in all: as much memory per sequence as
the parameters, and one forward-mode pass per unit parameter per step, with no truncation and no
noise. The gradient is exactly full BPTT's.

The P directions are pushed through the step at once: a tangent that sets parameter k of *every*
unit (say, column v of every unit's forget-gate weights) moves unit i only through its own
parameter k, so one ``jvp`` per k, vectorised with ``vmap``, yields every unit's derivative.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..protocol import RecurrentModel
from .base import Carry, GradientEstimator, add_to_grad, token_loss_sum
from .models import ElementwiseLstm


class ExactRtrl(GradientEstimator):
    """Exact RTRL for :class:`ElementwiseLstm`; carry extra ``cell_sensitivity``: B x P x H."""

    name = "exact-rtrl"

    def start(self, model: RecurrentModel, batch_size: int) -> Carry:
        _check_model(model)
        carry = super().start(model, batch_size)
        cell = carry.state[0]
        sensitivity = cell.new_zeros(batch_size, model.unit_parameters, cell.size(1))  # type: ignore[attr-defined]
        return Carry(carry.state, {"cell_sensitivity": sensitivity})

    def accumulate(
        self,
        model: RecurrentModel,
        inputs: Tensor,
        targets: Tensor,
        carry: Carry,
        normaliser: float | None = None,
    ) -> tuple[float, Carry]:
        _check_model(model)
        assert isinstance(model, ElementwiseLstm)
        scale = normaliser if normaliser is not None else targets.numel()
        constants = {name: p.detach() for name, p in model.recurrent_parameters().items()}
        directions = unit_directions(model)
        readout = [p for p in model.output.parameters() if p.requires_grad]
        sensitivity = carry.extras["cell_sensitivity"].movedim(1, 0)  # P x B x H
        cell, hidden = carry.state
        total = 0.0
        for position in range(inputs.size(1)):
            tokens = inputs[:, position]

            def tangent(direction, cell_direction, tokens=tokens, cell=cell, hidden=hidden):
                return torch.func.jvp(
                    lambda p, c: model.step(p, tokens, (c, hidden)),
                    (constants, cell),
                    (direction, cell_direction),
                )[1]

            cell_tangent, hidden_tangent = torch.func.vmap(tangent)(directions, sensitivity)
            cell, hidden = model.step(constants, tokens, (cell, hidden))
            hidden = hidden.detach().requires_grad_()
            loss = token_loss_sum(model.readout((cell, hidden)), targets[:, position])
            total += float(loss.detach())
            *readout_gradients, delta = torch.autograd.grad(loss / scale, [*readout, hidden])
            add_to_grad(readout, readout_gradients)
            per_unit = torch.einsum("bi,kbi->ki", delta, hidden_tangent)  # P x H
            add_to_grad(
                list(model.recurrent_parameters().values()), unit_to_parameters(model, per_unit)
            )
            sensitivity = cell_tangent
            hidden = hidden.detach()
        extras = {"cell_sensitivity": sensitivity.movedim(0, 1)}
        return total / targets.numel(), Carry((cell, hidden), extras)


def unit_directions(model: ElementwiseLstm) -> dict[str, Tensor]:
    """For each unit parameter k, the tangent that moves parameter k of every unit by 1.

    Order of k: the input columns of gate f, z, o (V each), the three recurrent weights, the
    three biases (the order :func:`unit_to_parameters` undoes).
    """
    gates, vocabulary, hidden = model.GATES, model.vocabulary, model.hidden
    weight = model.input_weight
    eye_gates = torch.eye(gates, dtype=weight.dtype, device=weight.device)
    eye_vocabulary = torch.eye(vocabulary, dtype=weight.dtype, device=weight.device)
    ones = weight.new_ones(hidden)
    # (g, v) -> rows of gate g, column v: G V x G H x V
    input_part = torch.einsum("gG,vw,h->gvGhw", eye_gates, eye_vocabulary, ones).reshape(
        gates * vocabulary, gates * hidden, vocabulary
    )
    gate_rows = torch.einsum("gG,h->gGh", eye_gates, ones).reshape(gates, gates * hidden)
    zeros_input = weight.new_zeros(gates, gates * hidden, vocabulary)
    zeros_vector = weight.new_zeros(gates, gates * hidden)
    vector_zeros = weight.new_zeros(gates * vocabulary, gates * hidden)
    return {
        "input_weight": torch.cat([input_part, zeros_input, zeros_input]),
        "recurrent_weight": torch.cat([vector_zeros, gate_rows, zeros_vector]),
        "bias": torch.cat([vector_zeros, zeros_vector, gate_rows]),
    }


def unit_to_parameters(model: ElementwiseLstm, per_unit: Tensor) -> list[Tensor]:
    """A P x H gradient per unit parameter -> gradients shaped like ``recurrent_parameters``."""
    gates, vocabulary, hidden = model.GATES, model.vocabulary, model.hidden
    inputs = per_unit[: gates * vocabulary].reshape(gates, vocabulary, hidden)
    input_weight = inputs.permute(0, 2, 1).reshape(gates * hidden, vocabulary)
    recurrent = per_unit[gates * vocabulary : gates * (vocabulary + 1)].reshape(-1)
    bias = per_unit[gates * (vocabulary + 1) :].reshape(-1)
    return [input_weight, recurrent, bias]


def _check_model(model: RecurrentModel) -> None:
    if not isinstance(model, ElementwiseLstm):
        raise TypeError(
            "exact RTRL is implemented for atbptt.estimators.ElementwiseLstm (element-wise "
            f"recurrence), not {type(model).__name__}: with dense recurrent weights it costs "
            "H^4 per step"
        )
