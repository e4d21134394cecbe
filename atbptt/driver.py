"""Adaptive truncated BPTT in a plain PyTorch training loop: a small facade over the one loop.

The loop (:class:`atbptt.loop.TbpttLoop`) owns what stateful TBPTT needs between updates: the
token columns and the position in them, the detached state carried from one segment to the next,
the controller that holds K and re-estimates it on its schedule, and the factors of the learning
rate and clipping for the K in force. The driver serves its segments one at a time and applies
the factors in the optimizer's step; the training loop keeps the model, the optimizer and the
backward pass (see ``examples/copy_task.py`` and ``docs/front_ends.md``)::

    driver = TbpttDriver(tokens, batch_size=64, config=TbpttConfig(target_bias=0.1))
    driver.attach_optimizer(optimizer)  # needed with lr_scaling or truncation_clip_norm
    for segment in driver.segments(model):
        loss = segment.loss(model)  # runs the window from the carried state, carries the next one
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import (  # noqa: F401  (re-exported: the driver's module was their home)
    BUDGET_COUNTS,
    RESUME_BREAKING_OPTIONS,
    TBPTT_STYLES,
    TbpttConfig,
    budget_tokens,
    describe_changes,
    lr_factor,
    resume_changes,
)
from .controller import TruncationDecision, build_controller  # noqa: F401  (re-exported)
from .estimators.base import GradientEstimator
from .gradient_profile import State
from .loop import (  # noqa: F401  (re-exported)
    LoopSegment,
    TbpttLoop,
    estimate_truncation,
    placement,
    stream_identity,
)
from .protocol import RecurrentModel
from .records import MetricsFile, decision_record
from .token_stream import StreamCursor, lay_out_columns

logger = logging.getLogger(__name__)


@dataclass
class TrainingSegment:
    """One update's window: read ``inputs`` from ``state``, score the positions from
    ``output_start`` on against ``targets``, carry the state after ``carry_offset`` steps.

    Call :meth:`accumulate` (every estimator), or with truncated BPTT :meth:`loss` (or run the
    model yourself and call :meth:`carry`), exactly once. ``records``: the update's figures and the
    decision on K that ran before it, as the metrics file holds them (:mod:`atbptt.records`).
    """

    inputs: Tensor  # B x T, on the model's device
    targets: Tensor  # B x (T - output_start)
    state: State  # the carried state (detached), or a zero state at the start of a pass
    output_start: int
    carry_offset: int
    truncation_length: int  # K in force for this update
    decision: TruncationDecision | None  # the estimate that ran just before this segment
    new_pass: bool  # the state was reset: a pass over the data begins
    # the loop's records of this update (and of the decision before it): atbptt.records
    records: list[dict[str, Any]] = field(repr=False)
    _driver: TbpttDriver = field(repr=False)
    _planned: LoopSegment = field(repr=False)

    def loss(self, model: RecurrentModel) -> Tensor:
        """Mean cross-entropy over the scored positions; hands the next state to the driver."""
        if not self._driver.estimator.differentiable_loss:
            raise RuntimeError(
                f"the driver's gradient estimator ({self._driver.estimator.name}) writes the "
                "gradient itself: call segment.accumulate(model)"
            )
        logits, carried = model.run_window(
            self.inputs, self.state, self.output_start, self.carry_offset
        )  # B x S x V
        self.carry(carried)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), self.targets.reshape(-1)
        )

    def carry(self, state: State) -> None:
        """Hand over the state after ``carry_offset`` steps (for loops that run the model)."""
        self._driver._finish(self)
        self._driver.loop.carry(state)

    def accumulate(self, model: RecurrentModel) -> float:
        """Add the driver's gradient estimate for this segment to ``.grad`` and carry its state
        (truncated BPTT: the gradient of the mean loss; the other estimators: divided by B x K, K
        the nominal length, so a random segment length does not rescale the step); returns the
        segment's mean cross-entropy."""
        self._driver._finish(self)
        loss = self._driver.loop.train(self._planned, model)
        return float(loss) / self.targets.numel()


class TbpttDriver:
    """Serves TBPTT segments at the K in force over a token stream laid out in columns.

    ``tokens``: the training stream (1-D). Without ``targets`` each position predicts the next
    token; with a token-aligned ``targets`` stream (the copy task) input t predicts target t.
    ``batch_size`` columns are trained side by side, each carrying its own state; the state is
    reset at the start of every pass. One process: the driver does not split columns over ranks.
    ``estimator``: a gradient estimator of :mod:`atbptt.estimators` instead of truncated BPTT
    (segments are then disjoint stretches of the length it asks for); every estimator trains by
    ``segment.accumulate(model)``, truncated BPTT also by ``segment.loss(model)``.
    """

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        config: TbpttConfig,
        targets: Tensor | None = None,
        estimator: GradientEstimator | None = None,
        metrics_dir: str | os.PathLike | None = None,
    ) -> None:
        self.loop = TbpttLoop(config, estimator)
        # also write every segment's records to atbptt_metrics.jsonl there
        self.metrics = None if metrics_dir is None else MetricsFile(metrics_dir)
        self.loop.use_stream(tokens, batch_size, targets)
        self.config = config
        self.estimator = self.loop.estimator
        self.controller = self.loop.controller
        self.batch_size = batch_size
        self.segments_per_epoch = self.loop.segments_per_epoch
        self._stream_identity = stream_identity(tokens, targets)  # checked on resume
        self._pending: TrainingSegment | None = None
        self._attached: list[int] = []  # ids of the optimizers whose lr follows K
        self._unscaled_lrs: dict[int, list[Any]] = {}

    # ------------------------------------------------------------------------------ facts

    @property
    def column_length(self) -> int:
        """Positions per column (the length of one pass)."""
        return self.loop.column_length

    @property
    def _columns(self) -> tuple[Tensor, Tensor]:
        return self.loop.columns  # type: ignore[return-value]

    @property
    def _carried(self) -> State | None:
        return self.loop.carried_state

    @property
    def cursor(self) -> StreamCursor:
        return self.loop.cursor

    @property
    def num_updates(self) -> int:
        """Segments served."""
        return self.loop.num_segments

    @property
    def scored_tokens(self) -> int:
        """Target tokens of all segments served."""
        return self.loop.scored_tokens

    @property
    def processed_tokens(self) -> int:
        """Tokens through the model: windows, and the estimates of an adaptive K."""
        return self.loop.processed_tokens

    @property
    def truncation_length(self) -> int:
        """K in force."""
        return self.loop.truncation_length

    @property
    def epoch(self) -> int:
        """Completed epochs (``segments_per_epoch`` segments each)."""
        return self.num_updates // self.segments_per_epoch

    @property
    def estimating(self) -> bool:
        """Whether K is estimated on the schedule (adaptive K, or monitoring a fixed K)."""
        return self.loop.estimating

    @property
    def lr_factor(self) -> float:
        """The paper's scaling of the learning rate with the K of the update in progress,
        relative to ``lr_scaling_reference`` (or K0)."""
        return self.loop.lr_factor

    @property
    def clip_threshold(self) -> float | None:
        """``truncation_clip_norm`` / K of the update in progress; None when off."""
        return self.loop.clip_threshold

    @property
    def _steps_follow_k(self) -> bool:
        return self.config.lr_scaling != "none" or self.clip_threshold is not None

    # --------------------------------------------------------------------------- training

    def segments(
        self, model: RecurrentModel, max_updates: int | None = None
    ) -> Iterator[TrainingSegment]:
        """The rest of the current epoch's segments, stopping early once ``max_updates`` have
        been served in all (so a resumed run continues mid-epoch)."""
        end = (self.epoch + 1) * self.segments_per_epoch
        if max_updates is not None:
            end = min(end, max_updates)
        while self.num_updates < end:
            yield self.next_segment(model)

    def next_segment(self, model: RecurrentModel) -> TrainingSegment:
        """Estimate K if due, then plan the next segment at the K in force.

        Raises if the previous segment's state was not carried: the state would silently restart.
        """
        if self._pending is not None:
            raise RuntimeError(
                "the previous segment was not run: call segment.loss(model), or segment.carry("
                "state) after running the model yourself, before asking for the next segment"
            )
        if self._steps_follow_k and not self._attached:
            raise RuntimeError(
                "lr_scaling and truncation_clip_norm act in the optimizer's step: call "
                "driver.attach_optimizer(optimizer) before training"
            )
        update = self.num_updates
        decision = self.loop.estimate_if_due(model, update)
        planned = self.loop.next_segment(model)
        records = [] if decision is None else [decision_record(update, decision)]
        records.append(self.loop.update_record(update))
        self.loop.take_estimate_cost()  # the record holds it
        if self.metrics is not None:
            self.metrics.write(*records)
        segment = TrainingSegment(
            inputs=planned.inputs,
            targets=planned.targets,
            state=planned.state,
            output_start=planned.output_start,
            carry_offset=planned.carry_offset,
            truncation_length=planned.truncation_length,
            decision=decision,
            new_pass=planned.new_pass,
            records=records,
            _driver=self,
            _planned=planned,
        )
        self._pending = segment
        return segment

    def _finish(self, segment: TrainingSegment) -> None:
        if segment is not self._pending:
            raise RuntimeError("this segment's state was already carried (run each segment once)")
        self._pending = None

    # ------------------------------------------------------------------------- estimation

    def estimate(self, model: RecurrentModel) -> TruncationDecision:
        """Measure the gradient profile on random windows of the training stream and decide K
        (:func:`estimate_truncation`; the fairseq task draws the same windows)."""
        return self.loop.estimate(model, self.num_updates)

    # ---------------------------------------------------------------------- learning rate

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make every ``optimizer.step()`` follow K: clip at :attr:`clip_threshold`, then step
        at the lr times :attr:`lr_factor`.

        Both happen in the optimizer's step hooks, and the lr is restored right after the step
        (as :func:`atbptt.scaled_learning_rate` does for the fairseq task), so outside ``step()``
        the param groups hold the unscaled lr that you or your scheduler set: a scheduler never
        reads back a scaled lr, scaling never compounds, and the optimizer's ``state_dict`` stores
        the unscaled lr. No-op without ``lr_scaling`` and ``truncation_clip_norm``.
        """
        if not self._steps_follow_k or id(optimizer) in self._attached:
            return
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._unscale_lr)
        self._attached.append(id(optimizer))

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._unscale_lr(optimizer, args, kwargs)  # a step that raised left its lr scaled
        threshold = self.clip_threshold
        if threshold is not None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(parameters, threshold)
        self._unscaled_lrs[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
        factor = self.lr_factor
        if factor != 1.0:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def _unscale_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        unscaled = self._unscaled_lrs.pop(id(optimizer), None)
        if unscaled is not None:
            for group, lr in zip(optimizer.param_groups, unscaled):
                group["lr"] = lr

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Cursor, carried state, update count and controller: plain values and CPU tensors,
        loadable with ``torch.load(weights_only=True)``."""
        if self._pending is not None:
            raise RuntimeError(
                "a segment is being trained: save after segment.loss(model) (and the step)"
            )
        return {
            **self.loop.state_dict(),
            "columns": list(self._columns[0].shape),
            "stream": self._stream_identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; the stream, batch size and TBPTT style must be the
        same (the carried state means nothing otherwise); other changed options are logged."""
        if list(state["columns"]) != list(self._columns[0].shape):
            raise ValueError(
                f"the saved driver trained {state['columns'][0]} columns of "
                f"{state['columns'][1]} positions, this one {self.batch_size} of "
                f"{self.column_length}: resume with the same data and batch size"
            )
        if state.get("stream", self._stream_identity) != self._stream_identity:
            raise ValueError(
                f"the saved driver trained another token stream of the same shape (sha256 "
                f"{state['stream'][:12]}, this one {self._stream_identity[:12]}): resume with "
                "the same data"
            )
        changes = resume_changes(state.get("config"), self.config)
        breaking = [change for change in changes if change[0] in RESUME_BREAKING_OPTIONS]
        if breaking:
            raise ValueError(
                f"cannot resume with {describe_changes(breaking, str)}: the carried state belongs "
                "to the saved style; resume with the saved value, or start a new run"
            )
        if changes:
            logger.warning(f"resuming with changed options: {describe_changes(changes, str)}")
        self.loop.load_state_dict(state)
        self._pending = None
        if self.metrics is not None:
            self.metrics.resume_at(self.num_updates)


def evaluate_stream(
    model: RecurrentModel,
    tokens: Tensor,
    targets: Tensor | None = None,
    batch_size: int = 1,
    chunk_length: int = 100,
) -> float:
    """Mean cross-entropy (nats per position) of one stateful pass over a stream.

    Each of ``batch_size`` columns starts from a zero state and carries it across chunks, so with
    one column this is exactly one forward pass over the whole stream. In eval mode, no grad.
    """
    inputs, target_columns = lay_out_columns(tokens, batch_size, targets)
    device, _ = placement(model)
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            state = model.zero_state(batch_size)
            for start in range(0, inputs.size(1), chunk_length):
                chunk = inputs[:, start : start + chunk_length].to(device)
                logits, state = model.run_window(chunk, state, 0, chunk.size(1))
                expected = target_columns[:, start : start + chunk_length].to(device)
                total += float(
                    F.cross_entropy(
                        logits.float().reshape(-1, logits.size(-1)),
                        expected.reshape(-1),
                        reduction="sum",
                    )
                )
                count += expected.numel()
    finally:
        if was_training is not None:
            model.train(was_training)
    return total / count
