"""Adaptive truncated BPTT in a plain PyTorch training loop.

The driver owns what stateful TBPTT needs between updates: the token columns and the position in
them, the detached state carried from one segment to the next, the controller that holds K and
re-estimates it on its schedule, and the scaling of the learning rate with K. The training loop
keeps the model, the optimizer and the backward pass (see ``examples/copy_task.py`` and
``docs/front_ends.md``)::

    driver = TbpttDriver(tokens, batch_size=64, config=TbpttConfig(target_bias=0.1))
    driver.attach_optimizer(optimizer)  # needed with lr_scaling or truncation_clip_norm
    for segment in driver.segments(model):
        loss = segment.loss(model)  # runs the window from the carried state, carries the next one
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .controller import TruncationController, TruncationDecision
from .estimators.base import Carry, GradientEstimator
from .gradient_profile import GradientProfile, State, measure_gradient_profile, sample_windows
from .in_window import InWindowMeasurement, measure_in_window
from .learning_rate import LR_SCALINGS, learning_rate_factor
from .protocol import RecurrentModel
from .token_stream import (
    StreamCursor,
    aligned_stream,
    lay_out_columns,
    plan_segment,
    segments_per_pass,
)

logger = logging.getLogger(__name__)

TBPTT_STYLES = ("overlap", "disjoint")
# options whose change on resume would give the carried state another meaning: the overlap style
# carries the state after the first K steps of a 2K - 1 window, the disjoint one at its end
RESUME_BREAKING_OPTIONS = ("tbptt_style",)
BUDGET_COUNTS = ("processed", "scored")


@dataclass
class TbpttConfig:
    """Options of the method, named and defaulting as the fairseq task's (a test keeps them equal).

    See ``AdaptiveTbpttLmConfig`` in ``atbptt_fairseq/tasks/config.py`` for the help
    text of each option.
    """

    truncation_length: int = 35  # fixed K, or K0 when target_bias is set
    tbptt_style: str = "overlap"  # overlap (the paper's) or disjoint
    updates_per_epoch: int = 0  # segments per epoch; 0: one pass over the columns at K0
    target_bias: float | None = None  # delta in (0, 1); None: K stays fixed
    min_truncation_length: int = 10
    max_truncation_length: int = 300
    max_truncation_change: float = 0.0  # one decision moves K at most by this factor; 0: free
    estimate_window: int = 400  # W
    estimate_burnin: int = -1  # -1: W // 10
    estimate_sequences: int = 32  # S
    estimate_repeats: int = 5  # R
    estimate_interval: int = 0  # every this many updates; 0: on the token budget below
    estimate_budget: float = 0.03  # share of the training tokens an estimate may cost
    estimate_budget_counts: str = "processed"  # training tokens: processed (inputs) or scored
    estimate_lag_origin: str = "final"  # lag 0: final (the paper's formula) or previous
    estimate_tail_anchor: int = -1  # tau; -1: W - W // 10 - 1
    estimate_method: str = "norms"  # norms (the paper's bound) or in-window (docs/bias_check.md)
    estimate_cumulative: str = "approx"  # approx or exact
    bias_relative_to: str = "gradient"  # gradient (the paper's delta) or update (noise-aware)
    estimate_at_start: bool = False  # also estimate before the first update (else train at K0)
    monitor_bias: bool = False  # with a fixed K, still estimate delta_hat at K
    lr_scaling: str = "none"  # none, sqrt or linear in K
    truncation_clip_norm: float = 0.0  # clip the mean loss's gradient norm at this / K; 0: off
    lr_scaling_reference: int = 0  # the K at which the lr applies unscaled; 0: K0
    seed: int = 1  # seeds the estimate windows (with the update number)


def build_controller(config: TbpttConfig) -> TruncationController:
    """The controller for ``config``; a fixed K is not bound by the adaptive range."""
    adaptive = config.target_bias is not None
    window = (
        config.estimate_window
        if adaptive
        else max(config.estimate_window, config.truncation_length)
    )
    return TruncationController(
        initial_length=config.truncation_length,
        min_length=config.min_truncation_length if adaptive else config.truncation_length,
        max_length=config.max_truncation_length if adaptive else config.truncation_length,
        target_bias=config.target_bias,
        window=window,
        burnin=config.estimate_burnin if config.estimate_burnin >= 0 else window // 10,
        num_sequences=config.estimate_sequences,
        num_estimates=config.estimate_repeats,
        interval=config.estimate_interval,
        budget=config.estimate_budget,
        cumulative=config.estimate_cumulative,
        lag_origin=config.estimate_lag_origin,
        tail_anchor=None if config.estimate_tail_anchor < 0 else config.estimate_tail_anchor,
        estimate_method=config.estimate_method,
        max_change=config.max_truncation_change,
        bias_relative_to=config.bias_relative_to,
        estimate_at_start=config.estimate_at_start,
    )


def budget_tokens(config: TbpttConfig, processed: int, scored: int) -> int:
    """The tokens of a training segment that count towards the estimate budget:
    ``estimate_budget_counts`` says whether the inputs run (processed) or the targets scored."""
    return scored if config.estimate_budget_counts == "scored" else processed


def lr_factor(
    config: TbpttConfig, truncation_length: int, initial_length: int | None = None
) -> float:
    """The paper's scaling of the learning rate for a segment of ``truncation_length``, relative
    to ``lr_scaling_reference``, or else K0 (``initial_length`` where K0 as applied differs from
    ``config.truncation_length``, e.g. capped by a short column)."""
    reference = config.lr_scaling_reference or initial_length or config.truncation_length
    return learning_rate_factor(truncation_length, reference, config.lr_scaling)


def estimate_truncation(
    controller: TruncationController,
    model: RecurrentModel,
    stream: tuple[Tensor, Tensor],
    seed: int,
    update: int,
    rank: int = 0,
    average: Callable[[list[Tensor]], None] | None = None,
    update_columns: int = 0,
    workers: int = 1,
) -> TruncationDecision:
    """One decision of ``controller`` on random windows of ``stream`` (aligned inputs and targets,
    :func:`atbptt.aligned_stream`).

    In fp32 and eval mode, without touching any parameter's ``.grad``, the carried state or the
    global RNG. The windows depend only on ``seed``, ``update`` and ``rank``, so a resumed run
    estimates exactly as an uninterrupted one. With several workers, ``average`` replaces the
    measured tensors in place by their mean over all workers (an all-reduce, before any norm is
    taken), so every worker decides the same K. ``update_columns`` (all workers' columns of one
    update) and ``workers`` size the update's noise for ``bias_relative_to`` "update".
    """
    inputs, targets = stream
    burnin = controller.burnin
    length = burnin + controller.measured_steps
    estimator = model
    if isinstance(model, nn.Module) and any(p.dtype != torch.float32 for p in model.parameters()):
        estimator = copy.deepcopy(model).float()
    device, _ = _placement(estimator)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + update) * 1009 + rank)

    def measure() -> GradientProfile | InWindowMeasurement:
        windows, final_targets = sample_windows(
            inputs, targets, controller.num_sequences, length, generator
        )
        windows, final_targets = windows.to(device), final_targets.to(device)
        state = estimator.zero_state(windows.size(0))
        if burnin > 0:
            # the fused kernel runs the burn-in, in fp32 like the window (even under autocast)
            with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
                _, state = estimator.run_window(windows[:, :burnin], state, burnin, burnin)
        if controller.estimate_method == "in-window":
            measurement = measure_in_window(
                estimator, state, windows[:, burnin:], final_targets,
                batch_dim=estimator.state_batch_dim,
            )  # fmt: skip
            profile = measurement.profile
            tensors = [profile.norms, profile.mean_gradients, measurement.readout_gradient]
            tensors.append(measurement.bucket_gradients)
            if average is not None:
                average(tensors)
            return measurement
        profile = measure_gradient_profile(
            lambda tokens, state: (None, estimator.advance(tokens, state)),
            state,
            windows[:, burnin:],
            final_targets,
            burnin=0,
            batch_dim=estimator.state_batch_dim,
            readout=estimator.readout,  # the output layer runs on the final state only
        )
        if average is not None:
            average([profile.norms, profile.mean_gradients])
        return profile

    was_training = getattr(estimator, "training", None)
    if was_training is not None:
        estimator.eval()
    try:
        return controller.estimate(measure, update, update_columns, workers)
    finally:
        if was_training is not None:
            estimator.train(was_training)


def resume_changes(saved: dict[str, Any] | None, config: TbpttConfig) -> list[tuple[str, Any, Any]]:
    """The method options that differ between a checkpoint's recorded ``saved`` options and
    ``config``, as (name, saved value, current value); none for a checkpoint that recorded none."""
    if not saved:
        return []
    current = dataclasses.asdict(config)
    return [
        (name, saved[name], value)
        for name, value in current.items()
        if name in saved and saved[name] != value
    ]


def describe_changes(changes: list[tuple[str, Any, Any]], flag: Callable[[str], str]) -> str:
    """``--target-bias 0.1 -> 0.2, ...``: :func:`resume_changes`'s list, named by ``flag``."""
    return ", ".join(f"{flag(name)} {old!r} -> {new!r}" for name, old, new in changes)


def stream_identity(tokens: Tensor, targets: Tensor | None = None) -> str:
    """sha256 of a training stream's tokens (and targets): the data a driver's state is of."""
    digest = hashlib.sha256()
    for tensor in (tokens, targets):
        if tensor is not None:
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_config(config: TbpttConfig) -> None:
    """Reject the options the controller does not check itself."""
    if config.tbptt_style not in TBPTT_STYLES:
        raise ValueError(f"tbptt_style must be one of {TBPTT_STYLES} (got {config.tbptt_style!r})")
    if config.lr_scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling must be one of {LR_SCALINGS} (got {config.lr_scaling!r})")
    if config.estimate_budget_counts not in BUDGET_COUNTS:
        raise ValueError(
            f"estimate_budget_counts must be one of {BUDGET_COUNTS} "
            f"(got {config.estimate_budget_counts!r})"
        )
    for name in ("truncation_clip_norm", "estimate_budget", "target_bias", "max_truncation_change"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number (got {value})")
    for name, least in (
        ("truncation_length", 1),
        ("updates_per_epoch", 0),
        ("estimate_burnin", -1),
        ("estimate_tail_anchor", -1),
        ("truncation_clip_norm", 0),
        ("lr_scaling_reference", 0),
    ):
        value = getattr(config, name)
        if value < least:
            raise ValueError(f"{name} must be at least {least} (got {value})")


@dataclass
class TrainingSegment:
    """One update's window: read ``inputs`` from ``state``, score the positions from
    ``output_start`` on against ``targets``, carry the state after ``carry_offset`` steps.

    Call :meth:`loss` (or run the model yourself and call :meth:`carry`) exactly once.
    """

    inputs: Tensor  # B x T, on the model's device
    targets: Tensor  # B x (T - output_start)
    state: State  # the carried state (detached), or a zero state at the start of a pass
    output_start: int
    carry_offset: int
    truncation_length: int  # K in force for this update
    decision: TruncationDecision | None  # the estimate that ran just before this segment
    new_pass: bool  # the state was reset: a pass over the data begins
    _driver: TbpttDriver = field(repr=False)

    def loss(self, model: RecurrentModel) -> Tensor:
        """Mean cross-entropy over the scored positions; hands the next state to the driver."""
        if self._driver.estimator is not None:
            raise RuntimeError(
                "the driver has a gradient estimator: call segment.accumulate(model)"
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
        self._driver._carry(self, state)

    def accumulate(self, model: RecurrentModel) -> float:
        """With the driver's gradient estimator: add its gradient estimate for this segment to
        ``.grad`` (divided by B x K, K the nominal length, so a random segment length does not
        rescale the step) and carry its state; returns the segment's mean cross-entropy."""
        driver = self._driver
        if driver.estimator is None or driver._estimator_carry is None:
            raise RuntimeError("the driver has no gradient estimator: use segment.loss(model)")
        if self is not driver._pending:
            raise RuntimeError("this segment's state was already carried (run each segment once)")
        loss, carry = driver.estimator.accumulate(
            model,
            self.inputs,
            self.targets,
            driver._estimator_carry,
            normaliser=self.inputs.size(0) * self.truncation_length,
        )
        driver._estimator_carry = carry
        driver._carry(self, carry.state)
        return loss


class TbpttDriver:
    """Serves TBPTT segments at the K in force over a token stream laid out in columns.

    ``tokens``: the training stream (1-D). Without ``targets`` each position predicts the next
    token; with a token-aligned ``targets`` stream (the copy task) input t predicts target t.
    ``batch_size`` columns are trained side by side, each carrying its own state; the state is
    reset at the start of every pass. One process: the driver does not split columns over ranks.
    """

    def __init__(
        self,
        tokens: Tensor,
        batch_size: int,
        config: TbpttConfig,
        targets: Tensor | None = None,
        estimator: GradientEstimator | None = None,
    ) -> None:
        _check_config(config)
        self.config = config
        # with an estimator, segments are disjoint stretches of the length it asks for (around
        # K), trained by segment.accumulate(model); it carries its own state and sensitivities
        self.estimator = estimator
        self._estimator_carry: Carry | None = None
        self.controller = build_controller(config)
        self._columns = lay_out_columns(tokens, batch_size, targets)  # (inputs, targets) C x n
        self._stream = aligned_stream(tokens, targets)  # estimate windows are cut from it
        self._stream_identity = stream_identity(tokens, targets)  # checked on resume
        if self.estimating:
            length = self.controller.burnin + self.controller.measured_steps
            if self._stream[0].numel() < length:
                raise ValueError(
                    f"the training stream has {self._stream[0].numel()} positions, fewer than "
                    f"the burn-in plus estimate window ({length}); lower estimate_window (and "
                    "max_truncation_length) or estimate_burnin, or use more data"
                )
        self.batch_size = batch_size
        self.segments_per_epoch = config.updates_per_epoch or segments_per_pass(
            config.truncation_length, config.tbptt_style, self.column_length
        )
        self.cursor = StreamCursor()
        self.num_updates = 0  # segments served
        self.scored_tokens = 0  # target tokens of all segments served
        self.processed_tokens = 0  # tokens through the model: windows, estimates of an adaptive K
        self._segment_length = config.truncation_length  # K of the update in progress
        self._carried: State | None = None
        self._pending: TrainingSegment | None = None
        self._attached: list[int] = []  # ids of the optimizers whose lr follows K
        self._unscaled_lrs: dict[int, list[Any]] = {}

    # ------------------------------------------------------------------------------ facts

    @property
    def column_length(self) -> int:
        """Positions per column (the length of one pass)."""
        return self._columns[0].size(1)

    @property
    def truncation_length(self) -> int:
        """K in force."""
        return self.controller.truncation_length

    @property
    def epoch(self) -> int:
        """Completed epochs (``segments_per_epoch`` segments each)."""
        return self.num_updates // self.segments_per_epoch

    @property
    def estimating(self) -> bool:
        """Whether K is estimated on the schedule (adaptive K, or monitoring a fixed K)."""
        return self.controller.adaptive or self.config.monitor_bias

    @property
    def lr_factor(self) -> float:
        """The paper's scaling of the learning rate with the K of the update in progress,
        relative to ``lr_scaling_reference`` (or K0)."""
        return lr_factor(self.config, self._segment_length)

    @property
    def clip_threshold(self) -> float | None:
        """``truncation_clip_norm`` / K of the update in progress; None when off."""
        if self.config.truncation_clip_norm <= 0:
            return None
        return self.config.truncation_clip_norm / self._segment_length

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
        decision = None
        if self.estimating and self.controller.is_due(self.num_updates):
            decision = self.estimate(model)
        truncation_length = self.controller.truncation_length
        if self.estimator is None:
            plan = plan_segment(
                self.cursor, truncation_length, self.config.tbptt_style, self.column_length
            )
        else:
            length = self.estimator.segment_length(truncation_length)
            plan = plan_segment(self.cursor, length, "disjoint", self.column_length)
        if plan.new_pass:
            self._carried = None
        device, dtype = _placement(model)
        if self.estimator is not None:
            if plan.new_pass or self._estimator_carry is None:
                self._estimator_carry = self.estimator.start(model, self.batch_size)
            else:  # a carry restored from a checkpoint lives on the CPU
                self._estimator_carry = self._estimator_carry.to(device, dtype)
            state = self._estimator_carry.state
        elif self._carried is None:
            state = model.zero_state(self.batch_size)
        else:  # a state restored from a checkpoint lives on the CPU
            state = tuple(tensor.to(device=device, dtype=dtype) for tensor in self._carried)
        inputs, targets = self._columns
        window = slice(plan.window_start, plan.window_end)
        scored = slice(plan.window_start + plan.output_start, plan.window_end)
        segment = TrainingSegment(
            inputs=inputs[:, window].to(device),
            targets=targets[:, scored].to(device),
            state=state,
            output_start=plan.output_start,
            carry_offset=plan.carry_offset,
            truncation_length=truncation_length,
            decision=decision,
            new_pass=plan.new_pass,
            _driver=self,
        )
        processed, scored = segment.inputs.numel(), segment.targets.numel()
        self.controller.record_tokens(budget_tokens(self.config, processed, scored))
        self.processed_tokens += processed
        self.scored_tokens += scored
        self._segment_length = truncation_length
        self.num_updates += 1
        self._pending = segment
        return segment

    def _carry(self, segment: TrainingSegment, state: State) -> None:
        if segment is not self._pending:
            raise RuntimeError("this segment's state was already carried (run each segment once)")
        self._carried = tuple(tensor.detach() for tensor in state)
        self._pending = None

    # ------------------------------------------------------------------------- estimation

    def estimate(self, model: RecurrentModel) -> TruncationDecision:
        """Measure the gradient profile on random windows of the training stream and decide K
        (:func:`estimate_truncation`; the fairseq task draws the same windows)."""
        controller = self.controller
        decision = estimate_truncation(
            controller,
            model,
            self._stream,
            self.config.seed,
            self.num_updates,
            update_columns=self.batch_size,
        )
        if controller.adaptive:  # a fixed K's monitoring observes, it is not the run's compute
            self.processed_tokens += controller.estimate_tokens
        return decision

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
        carried = None if self._carried is None else [t.detach().cpu() for t in self._carried]
        return {
            "cursor": self.cursor.state_dict(),
            "num_updates": self.num_updates,
            "segment_length": self._segment_length,
            "scored_tokens": self.scored_tokens,
            "processed_tokens": self.processed_tokens,
            "carried_state": carried,
            "controller": self.controller.state_dict(),
            "columns": list(self._columns[0].shape),
            "stream": self._stream_identity,
            "config": dataclasses.asdict(self.config),
            "estimator": None if self.estimator is None else self.estimator.state_dict(),
            "estimator_carry": (
                None if self._estimator_carry is None else self._estimator_carry.state_dict()
            ),
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
        self.cursor = StreamCursor.from_state_dict(state["cursor"])
        self.num_updates = int(state["num_updates"])
        self._segment_length = int(state["segment_length"])
        self.scored_tokens = int(state["scored_tokens"])
        self.processed_tokens = int(state["processed_tokens"])
        carried = state["carried_state"]
        self._carried = None if carried is None else tuple(carried)
        self._pending = None
        self.controller.load_state_dict(state["controller"])
        if self.estimator is not None and state.get("estimator") is not None:
            self.estimator.load_state_dict(state["estimator"])
        saved_carry = state.get("estimator_carry")
        self._estimator_carry = None if saved_carry is None else Carry.from_state_dict(saved_carry)


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
    device, _ = _placement(model)
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


def _placement(model: RecurrentModel) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's state (from its parameters when it has any)."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
    reference = model.zero_state(1)[0]
    return reference.device, reference.dtype
