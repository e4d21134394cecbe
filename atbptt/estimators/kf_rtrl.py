"""KF-RTRL: RTRL with random Kronecker factors (Mujika, Meier & Steger, NeurIPS 2018).

For the RNNs the paper is built on, one weight matrix W acts on a_t = [x_t; h_{t-1}; 1] per step,
h_t = f(W a_t), so the immediate sensitivity is a Kronecker product, F_t = a_t^T (x) D_t with
D_t = diag f'(W a_t). KF-RTRL keeps G_t ~ u_t^T (x) A_t per sequence (u: length of a_t, A: H x H)
and updates it with two random signs c1, c2:

    u_t = c1 p1 u_{t-1} + c2 p2 a_t,       A_t = c1 / p1 H_t A_{t-1} + c2 / p2 D_t,

(H_t = D_t W_h the Jacobian of the step), whose expectation is H_t G_{t-1} + F_t: unbiased,
with p1, p2 balancing the norms. Its noise is a single rank-one mixing of two Kronecker products
per step, not of the whole state, hence far below UORO's. Memory per sequence is H^2 + |a_t|,
compute H^3 per step (the product H_t A).

Implemented for :class:`~atbptt.estimators.models.TanhRnn` (h_t = tanh(W [onehot(x_t); h_{t-1}]
+ b)): the paper's class, vanilla RNNs and Recurrent Highway Networks, is RNNs with this form; its
analysis rests on D_t being diagonal. An LSTM (two state vectors, four gates) or the element-wise
LSTM (whose exact RTRL is cheaper still) fall outside it, see ``docs/alternatives.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..protocol import RecurrentModel
from .base import Carry, GradientEstimator, add_to_grad, immediate_step
from .models import TanhRnn

EPSILON = 1e-7


class KfRtrl(GradientEstimator):
    """Kronecker-factored unbiased RTRL for :class:`TanhRnn`; carry extras ``u`` (B x (V+H+1))
    and ``A`` (B x H x H)."""

    name = "kf-rtrl"

    def start(self, model: RecurrentModel, batch_size: int) -> Carry:
        _check_model(model)
        carry = super().start(model, batch_size)
        h = carry.state[0]
        width = model.vocabulary + model.hidden + 1  # type: ignore[attr-defined]
        return Carry(
            carry.state,
            {"u": h.new_zeros(batch_size, width), "A": h.new_zeros(batch_size, *h.shape[1:] * 2)},
        )

    def accumulate(
        self,
        model: RecurrentModel,
        inputs: Tensor,
        targets: Tensor,
        carry: Carry,
        normaliser: float | None = None,
    ) -> tuple[float, Carry]:
        _check_model(model)
        assert isinstance(model, TanhRnn)
        scale = normaliser if normaliser is not None else targets.numel()
        params = model.recurrent_parameters()
        vocabulary = model.vocabulary
        recurrent = model.weight.detach()[:, vocabulary:]  # W_h, H x H
        u, kron_a = carry.extras["u"], carry.extras["A"]
        state = carry.state
        total = 0.0
        for position in range(inputs.size(1)):
            tokens = inputs[:, position]
            loss, new_state, (delta,) = immediate_step(
                model, model.step, params, tokens, state, targets[:, position], scale
            )
            total += float(loss)
            h = new_state[0]
            derivative = 1 - h * h  # D_t, B x H
            jacobian_a = derivative[:, :, None] * (recurrent @ kron_a)  # H_t A_{t-1}, B x H x H
            # history term dL/dh_t . H_t G_{t-1}: (A^T H^T delta) (x) u, summed over sequences
            r = torch.einsum("bij,bi->bj", jacobian_a, delta)
            history = r.transpose(0, 1) @ u  # H x (V + H + 1)
            add_to_grad([model.weight, model.bias], [history[:, :-1], history[:, -1]])
            a = torch.cat([model.one_hot(tokens, h.dtype), state[0], h.new_ones(h.size(0), 1)], 1)
            p1 = torch.sqrt((_norm(jacobian_a) + EPSILON) / (_norm(u) + EPSILON))
            p2 = torch.sqrt((_norm(derivative) + EPSILON) / (_norm(a) + EPSILON))
            c1 = self.random_signs((h.size(0),), h)
            c2 = self.random_signs((h.size(0),), h)
            u = (c1 * p1)[:, None] * u + (c2 * p2)[:, None] * a
            kron_a = (c1 / p1)[:, None, None] * jacobian_a + (c2 / p2)[:, None, None] * (
                torch.diag_embed(derivative)
            )
            state = new_state
        return total / targets.numel(), Carry(state, {"u": u, "A": kron_a})


def _norm(tensor: Tensor) -> Tensor:
    """Per-sequence Frobenius norm."""
    return tensor.reshape(tensor.size(0), -1).norm(dim=1)


def _check_model(model: RecurrentModel) -> None:
    if not isinstance(model, TanhRnn):
        raise TypeError(
            f"KF-RTRL is implemented for atbptt.estimators.TanhRnn, not {type(model).__name__} "
            "(see docs/alternatives.md for which recurrences it covers)"
        )
