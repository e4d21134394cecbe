"""One forward over a window whose steps are grouped in buckets of lags, and the per-bucket
parameter gradients of its losses with one backward each: what the in-window bias estimate
(:mod:`atbptt.in_window`, on the training path) and the ground-truth diagnostic
(:mod:`atbptt.ground_truth`, beside it) both measure with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .gradient_profile import State


class _Steps(nn.Module):
    """Runs ``model.advance`` over a chunk of tokens; a module so functional_call can swap the
    parameters of a whole bucket of steps at once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, state: State) -> list[State]:  # tokens m x n
        states = []
        for position in range(tokens.shape[1]):
            state = self.model.advance(tokens[:, position], state)
            states.append(state)
        return states


class _Readout(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, state: State) -> Tensor:
        return self.model.readout(state)


class BucketedRun:
    """One forward pass of a batch of windows, each bucket of steps on its own parameter leaves.

    ``tokens`` (m x L) run from ``initial_state`` (detached here). Buckets are delimited by
    ``edges`` (lags from the end, ascending, the last = L): bucket b holds the steps producing
    states at lags [edges[b-1], edges[b]). Gradients come back per bucket, so the gradient
    truncated at a lag e (an edge) is the readout's part plus the buckets below e.
    """

    def __init__(
        self,
        model: nn.Module,
        initial_state: State,
        tokens: Tensor,
        edges: list[int],
        batch_dim: int,
    ) -> None:
        window = tokens.shape[1]
        if not edges or edges[-1] != window or sorted(set(edges)) != edges or edges[0] < 1:
            raise ValueError(f"bucket edges must rise from >= 1 to the window {window}: {edges}")
        self.batch_dim = batch_dim
        self.edges = edges
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        parameters = dict(model.named_parameters())

        def leaves() -> dict[str, Tensor]:  # aliases of the parameters' storage, no copy
            return {f"model.{n}": parameters[n].detach().requires_grad_() for n in self.names}

        self.readout_leaves = leaves()
        self.bucket_leaves = [leaves() for _ in edges]
        self.readout = _Readout(model)
        # a fresh leaf, so that every state of the window requires grad (for state gradients)
        state = tuple(tensor.detach().requires_grad_() for tensor in initial_state)
        steps = _Steps(model)
        self.states: list[State] = []  # in time order, states[-1] = h_s
        with torch.enable_grad():
            for bucket in reversed(range(len(edges))):  # earliest steps (largest lags) first
                low_lag = edges[bucket - 1] if bucket > 0 else 0
                start = window - edges[bucket]
                stop = window - low_lag
                chunk = functional_call(
                    steps, self.bucket_leaves[bucket], (tokens[:, start:stop], state)
                )
                self.states.extend(chunk)
                state = chunk[-1]

    def _gradients(
        self, loss: Tensor, extra_inputs: list[Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """The readout's and every bucket's contribution to d loss / d parameters, flattened
        (and, with ``extra_inputs``, the loss's gradients with respect to them, same backward)."""
        groups = [self.readout_leaves, *self.bucket_leaves]
        leaves = [leaf for group in groups for leaf in group.values()]
        extra = extra_inputs or []
        gradients = torch.autograd.grad(loss, leaves + extra, retain_graph=True, allow_unused=True)
        extra_gradients = list(gradients[len(leaves) :])
        gradients = gradients[: len(leaves)]
        flat = []
        for leaf, gradient in zip(leaves, gradients):
            flat.append((torch.zeros_like(leaf) if gradient is None else gradient).reshape(-1))
        per_group = len(self.names)
        vectors = [
            torch.cat(flat[i * per_group : (i + 1) * per_group]).double()
            for i in range(len(groups))
        ]
        if extra_inputs is not None:
            return vectors[0], vectors[1:], extra_gradients
        return vectors[0], vectors[1:]

    def _truncated(self, readout: Tensor, buckets: list[Tensor], lag: int) -> Tensor:
        """Gradient through the readout and the steps at lags below ``lag`` (an edge)."""
        kept = [vector for edge, vector in zip(self.edges, buckets) if edge <= lag]
        return readout + sum(kept) if kept else readout.clone()

    def final_step_gradients(
        self, final_targets: Tensor, lengths: list[int]
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Mean over the group of g (full) and of g_K for each K, flattened."""
        logits = functional_call(self.readout, self.readout_leaves, (self.states[-1],))
        loss = F.cross_entropy(logits.float(), final_targets, reduction="mean")
        readout, buckets = self._gradients(loss)
        full = readout + sum(buckets)
        return full, {length: self._truncated(readout, buckets, length) for length in lengths}

    def final_step_contributions(
        self, final_targets: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """For the mean final-step loss: the readout's and each bucket's parameter-gradient
        contribution, and the per-sequence norms of d loss / d state at every lag (lag 0 = h_s),
        all from one backward pass. The loss is a mean, so the state gradients are scaled back
        by the batch size to be each sequence's own."""
        logits = functional_call(self.readout, self.readout_leaves, (self.states[-1],))
        loss = F.cross_entropy(logits.float(), final_targets, reduction="mean")
        flat_states = [tensor for state in reversed(self.states) for tensor in state]
        readout, buckets, state_gradients = self._gradients(loss, flat_states)
        size = len(self.states[0])
        batch = final_targets.numel()
        per_lag = []
        for lag, state in enumerate(reversed(self.states)):
            pieces = []
            for gradient, tensor in zip(state_gradients[lag * size : (lag + 1) * size], state):
                gradient = torch.zeros_like(tensor) if gradient is None else gradient
                gradient = gradient.float().movedim(self.batch_dim, 0)
                pieces.append(gradient.reshape(gradient.shape[0], -1))
            per_lag.append(torch.cat(pieces, dim=1) * batch)  # m x D
        return readout, buckets, per_lag

    def training_window_gradients(
        self, window_targets: Tensor, length: int
    ) -> tuple[Tensor, Tensor]:
        """Mean over the group of the overlap loss's gradient at K: full, and truncated at 2K-1."""
        scored = self.states[-length:]  # K states, time order
        stacked = tuple(
            torch.cat([state[i] for state in scored], dim=self.batch_dim)
            for i in range(len(scored[0]))
        )  # batch K*m, position-major
        logits = functional_call(self.readout, self.readout_leaves, (stacked,))
        scored_targets = window_targets[:, -length:].t().reshape(-1)  # position-major as above
        loss = F.cross_entropy(logits.float(), scored_targets, reduction="mean")
        readout, buckets = self._gradients(loss)
        return readout + sum(buckets), self._truncated(readout, buckets, 2 * length - 1)
