"""UORO: unbiased online recurrent optimisation (Tallec & Ollivier 2017).

RTRL carries the sensitivity G_t = d state_t / d params, updated as G_t = J_t G_{t-1} + F_t
(J_t: Jacobian of the step with respect to the previous state, F_t: with respect to the
parameters). UORO keeps a random rank-one stand-in, G_t ~ s_t theta_t^T, per sequence:

    nu ~ uniform signs,   s_t = rho0 J_t s_{t-1} + rho1 nu,   theta_t = theta_{t-1} / rho0
    + (nu^T F_t) / rho1,

whose expectation over nu is G_t exactly (the cross terms are odd in nu), with rho0, rho1
chosen per sequence to balance the norms (less variance). Here the gradient of step t's loss is
its exact one-step part (readout and F_t, by backprop through that step) plus the history term
(dL/ds_t . J_t s_{t-1}) theta_{t-1}, which is unbiased.

Generic: any model whose step ``torch.func`` can differentiate (``J_t s`` by ``jvp``, the
per-sequence ``nu^T F_t`` by ``vmap`` over ``vjp``). Cost per step: a few evaluations of the step,
memory: one parameter-sized vector per sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..protocol import RecurrentModel
from .base import (
    Carry,
    GradientEstimator,
    add_to_grad,
    functional_step,
    immediate_step,
    per_example,
)

EPSILON = 1e-7  # keeps the norm ratios finite when a sensitivity is zero (the first step)


class Uoro(GradientEstimator):
    """Rank-one unbiased RTRL; its carry holds ``state_tilde.<i>`` and ``theta_tilde.<name>``."""

    name = "uoro"

    def start(self, model: RecurrentModel, batch_size: int) -> Carry:
        carry = super().start(model, batch_size)
        params, _ = functional_step(model)  # type: ignore[arg-type]
        extras = {f"state_tilde.{i}": torch.zeros_like(t) for i, t in enumerate(carry.state)}
        for name, parameter in params.items():
            extras[f"theta_tilde.{name}"] = parameter.new_zeros(batch_size, *parameter.shape)
        return Carry(carry.state, extras)

    def accumulate(
        self,
        model: RecurrentModel,
        inputs: Tensor,
        targets: Tensor,
        carry: Carry,
        normaliser: float | None = None,
    ) -> tuple[float, Carry]:
        params, step = functional_step(model)  # type: ignore[arg-type]
        names = list(params)
        constants = {name: p.detach() for name, p in params.items()}
        batch_dim = model.state_batch_dim
        scale = normaliser if normaliser is not None else targets.numel()
        state = carry.state
        state_tilde = tuple(carry.extras[f"state_tilde.{i}"] for i in range(len(state)))
        theta_tilde = {name: carry.extras[f"theta_tilde.{name}"] for name in names}
        total = 0.0

        def one_sequence(parameters, token, *single_state):
            batched = tuple(t.unsqueeze(batch_dim) for t in single_state)
            return tuple(
                t.squeeze(batch_dim) for t in step(parameters, token.unsqueeze(0), batched)
            )

        def sequence_vjp(token, single_state, single_nu):
            _, pullback = torch.func.vjp(
                lambda parameters: one_sequence(parameters, token, *single_state), constants
            )
            return pullback(single_nu)[0]

        per_sequence_vjp = torch.func.vmap(
            sequence_vjp, in_dims=(0, (batch_dim,) * len(state), (batch_dim,) * len(state))
        )
        for position in range(inputs.size(1)):
            tokens = inputs[:, position]
            loss, new_state, loss_gradient = immediate_step(
                model,
                step,
                params,
                tokens,
                state,
                targets[:, position],
                scale,  # type: ignore
            )
            total += float(loss)
            _, propagated = torch.func.jvp(
                lambda *s, tokens=tokens: step(constants, tokens, s), tuple(state), state_tilde
            )  # J_t s_{t-1}
            history = sum(  # dL/ds_t . J_t s_{t-1}, per sequence
                (per_example(g, batch_dim) * per_example(p, batch_dim)).sum(1)
                for g, p in zip(loss_gradient, propagated)
            )
            add_to_grad(
                [params[name] for name in names],
                [_contract(history, theta_tilde[name]) for name in names],
            )
            nu = tuple(self.random_signs(tuple(t.shape), t) for t in new_state)
            nu_f = per_sequence_vjp(tokens, tuple(state), nu)  # nu^T F_t, per sequence
            rho0 = torch.sqrt(
                (_norm(theta_tilde.values(), 0) + EPSILON)
                / (_norm(propagated, batch_dim) + EPSILON)
            )
            rho1 = torch.sqrt(
                (_norm(nu_f.values(), 0) + EPSILON) / (_norm(nu, batch_dim) + EPSILON)
            )
            state_tilde = tuple(
                _per_row(rho0, p, batch_dim) + _per_row(rho1, n, batch_dim)
                for p, n in zip(propagated, nu)
            )
            theta_tilde = {
                name: _per_row(1 / rho0, theta_tilde[name], 0) + _per_row(1 / rho1, nu_f[name], 0)
                for name in names
            }
            state = new_state
        extras = {f"state_tilde.{i}": t for i, t in enumerate(state_tilde)}
        extras.update({f"theta_tilde.{name}": t for name, t in theta_tilde.items()})
        return total / targets.numel(), Carry(state, extras)


def _contract(weights: Tensor, per_sequence: Tensor) -> Tensor:
    """sum_b weights[b] * per_sequence[b]."""
    return torch.tensordot(weights, per_sequence, dims=([0], [0]))


def _norm(tensors, batch_dim: int) -> Tensor:
    """Per-sequence Euclidean norm over several tensors (batch along ``batch_dim``)."""
    return torch.sqrt(sum(per_example(t, batch_dim).pow(2).sum(1) for t in tensors))


def _per_row(factors: Tensor, tensor: Tensor, batch_dim: int) -> Tensor:
    """``tensor`` with sequence b multiplied by ``factors[b]``."""
    shape = [1] * tensor.dim()
    shape[batch_dim] = -1
    return tensor * factors.view(shape)
