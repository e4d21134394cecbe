"""The one TBPTT segment loop: everything that happens between two updates, for every front end.

:class:`TbpttLoop` owns the columns of this worker, the stream cursor, the carried state, the K in
force (capped at the column length), the token counts, the estimate schedule and the controller,
the learning-rate and clipping factors of the K in force, the snapshot that an update retried by
fairseq's ``--amp`` rewinds to, and the state of an exact resume. Fixed K, adaptive K and every
gradient estimator of :mod:`atbptt.estimators` train through :meth:`TbpttLoop.train`; the
plain-PyTorch driver, the Lightning module and the fairseq task only translate (see
``docs/front_ends.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .config import TbpttConfig, budget_tokens, check_config, lr_factor
from .controller import TruncationController, TruncationDecision, build_controller
from .estimators.base import Carry, GradientEstimator, LoopSegment, next_segment, placement
from .estimators.truncated import Truncation
from .gradient_profile import GradientProfile, State, measure_gradient_profile, sample_windows
from .in_window import InWindowMeasurement, measure_in_window
from .protocol import RecurrentModel
from .token_stream import (
    StreamCursor,
    aligned_stream,
    lay_out_columns,
    segments_per_pass,
)

logger = logging.getLogger(__name__)

# what a retried update rewinds to (TbpttLoop.snapshot)
Snapshot = tuple[Any, ...]


class TbpttLoop:
    """The segment loop of one worker over a token stream laid out in columns.

    ``config``: the method's options (checked here). ``estimator``: how the gradient of a segment
    is computed, a :class:`atbptt.estimators.GradientEstimator` (ARTBP, UORO, KF-RTRL, exact
    RTRL); None: (adaptive) truncated BPTT at the controller's K in ``config.tbptt_style``
    (:class:`atbptt.estimators.Truncation`). Every one trains through :meth:`train`.
    ``rank``/``world_size``: this worker's share of the columns (``batch_size`` columns each);
    ``average`` all-reduces the measured gradient profile of an estimate in place, so that every
    worker decides the same K. ``flag`` names an option in messages (the fairseq task:
    ``--estimate-window``). Give the training stream with :meth:`use_stream` before the first
    segment.
    """

    def __init__(
        self,
        config: TbpttConfig,
        estimator: GradientEstimator | None = None,
        rank: int = 0,
        world_size: int = 1,
        average: Callable[[list[Tensor]], None] | None = None,
        flag: Callable[[str], str] = str,
    ) -> None:
        check_config(config, flag)
        self.flag = flag  # how the messages name an option (the fairseq task: its flags)
        self.config = config
        self.estimator: GradientEstimator = estimator or Truncation(config.tbptt_style)
        self.rank, self.world_size, self.average = rank, world_size, average
        self.controller: TruncationController = build_controller(config)
        self.columns: tuple[Tensor, Tensor] | None = None  # (inputs, targets), C x n
        self.stream: tuple[Tensor, Tensor] | None = None  # estimate windows are cut from it
        self.cursor = StreamCursor()
        # the state after the last segment and the estimator's history (sensitivities)
        self.estimator_carry: Carry | None = None
        self.state_batch_dim = 1  # of the trained model's state (nn.LSTM's layers x B x H)
        self.num_segments = 0  # segments served
        self.scored_tokens = 0  # target tokens of all segments, all workers
        self.processed_tokens = 0  # tokens through the model, adaptive estimates too, all workers
        self.update_length = config.truncation_length  # K applied in the update in progress
        self.trained_length = config.truncation_length  # trunc_k of the update in progress
        self.pending_estimate_tokens = 0  # this worker's estimate tokens since the last record
        self.pending_estimate_seconds = 0.0
        self._warned_cap = False
        self._counted_ahead = False  # the next segment's tokens were counted before a rewind
        self._checked_model: int | None = None  # id of the model check_model accepted

    # ------------------------------------------------------------------------------ data

    def use_stream(
        self,
        tokens: Tensor,
        batch_size: int,
        targets: Tensor | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Lay out the training stream in ``batch_size`` columns per worker and keep this
        worker's (``rank``/``world_size``: as given at construction unless given here); keep the
        whole stream for the estimate windows. The cursor and carried state are kept."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of columns (got {batch_size})")
        self.rank = self.rank if rank is None else rank
        self.world_size = self.world_size if world_size is None else world_size
        self.columns = lay_out_columns(
            tokens, batch_size * self.world_size, targets, self.rank, self.world_size
        )
        self.stream = aligned_stream(tokens, targets)
        if self.estimating:
            length = self.controller.burnin + self.controller.measured_steps
            if self.stream[0].numel() < length:
                raise ValueError(
                    f"the training stream has {self.stream[0].numel()} positions, fewer than "
                    f"the burn-in plus estimate window ({length}); lower "
                    f"{self.flag('estimate_window')} (and {self.flag('max_truncation_length')}) or "
                    f"{self.flag('estimate_burnin')}, or use more data"
                )

    def restart_pass(self, count_pass: bool = False) -> None:
        """Start the stream from its beginning with a zero state (a new shard or layout)."""
        self.cursor = StreamCursor(passes=self.cursor.passes + int(count_pass))
        self.estimator_carry = None

    # ------------------------------------------------------------------------------ facts

    @property
    def column_length(self) -> int:
        """Positions per column (the length of one pass)."""
        if self.columns is None:
            raise RuntimeError("no training stream: call use_stream(tokens, batch_size) first")
        return self.columns[0].size(1)

    @property
    def batch_size(self) -> int:
        """Columns of this worker."""
        return self.column_count

    @property
    def column_count(self) -> int:
        return 0 if self.columns is None else self.columns[0].size(0)

    @property
    def estimating(self) -> bool:
        """Whether K is estimated on the schedule (adaptive K, or monitoring a fixed K)."""
        return self.controller.adaptive or self.config.monitor_bias

    @property
    def segments_per_epoch(self) -> int:
        """``updates_per_epoch``, or one pass over the columns at K0."""
        return self.config.updates_per_epoch or segments_per_pass(
            self.config.truncation_length, self.estimator.style, self.column_length
        )

    def applied_length(self, truncation_length: int) -> int:
        """The K a segment really has: a K longer than a column trains the whole column from a
        zero state, i.e. with K = the column length (said once, on the first worker)."""
        if self.columns is None or truncation_length <= self.column_length:
            return truncation_length
        if not self._warned_cap and self.rank == 0:
            logger.warning(
                f"K = {truncation_length} is longer than a training column ({self.column_length} "
                "tokens: the split over the batch size x workers columns), so every update trains "
                f"a whole column from a zero state: K = {self.column_length} applies, and trunc_k "
                "and the lr scaling use it; lower the (maximum) truncation length or the batch "
                "size for a longer K"
            )
        self._warned_cap = True
        return self.column_length

    @property
    def truncation_length(self) -> int:
        """K in force, capped at the column length."""
        return self.applied_length(self.controller.truncation_length)

    @property
    def lr_factor(self) -> float:
        """The paper's scaling of the learning rate with the K of the update in progress,
        relative to ``lr_scaling_reference`` (or K0 as applied)."""
        initial = self.applied_length(self.config.truncation_length)
        return lr_factor(self.config, self.update_length, initial)

    @property
    def clip_threshold(self) -> float | None:
        """``truncation_clip_norm`` / K of the update in progress; None when off."""
        if self.config.truncation_clip_norm <= 0:
            return None
        return self.config.truncation_clip_norm / self.update_length

    def check_model(self, model: Any) -> None:
        """Refuse, in one line, a model that lacks what this loop calls: ``zero_state``,
        ``run_window`` and ``state_batch_dim`` of :class:`atbptt.RecurrentModel`, and ``advance``
        and ``readout`` when K is estimated (checked once per model)."""
        if id(model) == self._checked_model:
            return
        required = ["zero_state", "run_window", "state_batch_dim"]
        if self.estimating:
            required += ["advance", "readout"]
        missing = [name for name in required if not hasattr(model, name)]
        if missing:
            purpose = " (K is estimated by stepping it)" if "advance" in missing else ""
            raise TypeError(
                f"{type(model).__name__} is not an atbptt.RecurrentModel: it has no "
                f"{', '.join(missing)}{purpose}; see docs/front_ends.md, 'The model protocol'"
            )
        self._checked_model = id(model)

    def trained_model(self, model: RecurrentModel) -> RecurrentModel:
        """The module the gradient is taken of (the estimator's choice: truncated BPTT takes the
        whole model; the others the core recurrence a model may hand over)."""
        return self.estimator.trained_module(model)

    # ------------------------------------------------------------------------- estimates

    def describe_schedule(self) -> str:
        """What an estimate costs and when it runs, in words for the log."""
        controller = self.controller
        schedule = (
            f"every {controller.interval} updates"
            if controller.interval
            else f"every {controller.tokens_between_estimates:,} training tokens "
            f"(estimate budget {controller.budget})"
        )
        return (
            f"truncation estimates ({controller.num_estimates} x {controller.num_sequences} "
            f"sequences x {controller.burnin} + {controller.window} steps = "
            f"{controller.estimate_tokens:,} tokens each) {schedule}"
        )

    def estimate_if_due(self, model: RecurrentModel, update: int) -> TruncationDecision | None:
        """Estimate K before ``update`` if the schedule says so (adaptive K or monitoring)."""
        if self.estimating and self.controller.is_due(update):
            return self.estimate(model, update)
        return None

    def estimate(self, model: RecurrentModel, update: int) -> TruncationDecision:
        """Measure the gradient profile on random windows of the training stream and decide K
        (:func:`estimate_truncation`). Counts an adaptive K's estimate as processed tokens."""
        if self.stream is None:
            raise RuntimeError("no training stream: call use_stream(tokens, batch_size) first")
        self.check_model(model)
        controller = self.controller
        decision = estimate_truncation(
            controller,
            model,
            self.stream,
            self.config.seed,
            update,
            self.rank,
            self.average,
            update_columns=self.column_count * self.world_size,
            workers=self.world_size,
        )
        self.pending_estimate_seconds += decision.seconds
        if controller.adaptive:  # a fixed K's monitoring observes, it is not the run's compute
            self.processed_tokens += controller.estimate_tokens * self.world_size
            self.pending_estimate_tokens += controller.estimate_tokens
        return decision

    # -------------------------------------------------------------------------- training

    def next_segment(self, model: RecurrentModel) -> LoopSegment:
        """Plan the next segment at the K in force (of the length and style the estimator asks
        for), on the device and in the precision of ``model``; count its tokens."""
        if self.columns is None:
            raise RuntimeError("no training stream: call use_stream(tokens, batch_size) first")
        trained = self.trained_model(model)
        self.check_model(trained)
        truncation_length = self.truncation_length
        self.state_batch_dim = getattr(trained, "state_batch_dim", 1)
        segment, self.estimator_carry = next_segment(
            self.estimator, trained, self.columns, self.cursor, self.estimator_carry,
            truncation_length,
        )  # fmt: skip
        processed, scored_count = segment.inputs.numel(), segment.targets.numel()
        if not self._counted_ahead:  # a segment served again after a rewind counts once
            self.controller.record_tokens(budget_tokens(self.config, processed, scored_count))
            self.processed_tokens += processed * self.world_size
            self.scored_tokens += scored_count * self.world_size
        self._counted_ahead = False
        self.update_length, self.trained_length = truncation_length, segment.trained_length
        self.num_segments += 1
        return segment

    def train(
        self,
        segment: LoopSegment,
        model: RecurrentModel,
        backward: Callable[[Tensor], Any] | None = None,
        forward: Callable[[LoopSegment], tuple[Tensor, State]] | None = None,
        divided_later: float = 1.0,
        ignore_grad: bool = False,
    ) -> Tensor:
        """Add the gradient of the segment's summed cross-entropy / ``segment.normaliser`` to
        ``.grad`` and carry the state on; returns the summed cross-entropy (detached).

        The one training call, for every estimator (:meth:`GradientEstimator.train_segment`).
        ``divided_later``: the divisor the caller applies to the gradient itself (fairseq divides
        by the sample size it is handed), taken out of the normaliser here. ``forward`` (the
        summed loss of the segment and the state after ``carry_offset`` steps) and ``backward``
        (of that loss): a front end's own, for truncated BPTT (default: the model's
        ``run_window`` and ``Tensor.backward``); the other estimators write ``.grad``
        themselves. ``ignore_grad``: leave ``.grad`` as it was (fairseq's dummy batches), the
        state still advances.
        """
        scale = segment.normaliser / divided_later
        loss, self.estimator_carry = self.estimator.train_segment(
            self.trained_model(model),
            segment,
            self.estimator_carry,  # type: ignore[arg-type]
            scale,
            forward,
            backward,
            ignore_grad,
        )
        return loss

    def carry(self, state: State) -> None:
        """Keep ``state`` (detached) as the state the next segment starts from (a front end
        that ran truncated BPTT's window itself)."""
        self.estimator_carry = Carry(tuple(tensor.detach() for tensor in state))

    @property
    def carried_state(self) -> State | None:
        """The state the next segment starts from, in the trained model's layout."""
        return None if self.estimator_carry is None else self.estimator_carry.state

    carried = carried_state

    # ------------------------------------------------------------------- retried updates

    def snapshot(self) -> Snapshot:
        """What :meth:`rewind` restores: a retried update (fairseq's ``--amp`` overflow) must
        not advance the stream, the state or the estimator's RNG twice, nor count its tokens
        twice (the segment served again after a rewind is not counted again)."""
        return (
            copy.deepcopy(self.cursor),
            self.estimator_carry,
            copy.deepcopy(self.estimator.state_dict()),
            self.update_length,
            self.trained_length,
            self.num_segments,
            self.pending_estimate_tokens,
            self.pending_estimate_seconds,
        )

    def rewind(self, snapshot: Snapshot) -> None:
        """Back to where :meth:`snapshot` was taken."""
        (cursor, estimator_carry, estimator_state, update_length, trained_length,
         num_segments, estimate_tokens, estimate_seconds) = snapshot  # fmt: skip
        self.cursor = copy.deepcopy(cursor)
        self.estimator_carry = estimator_carry
        self.estimator.load_state_dict(copy.deepcopy(estimator_state))
        self.update_length, self.trained_length = update_length, trained_length
        self._counted_ahead = self._counted_ahead or self.num_segments != num_segments
        self.num_segments = num_segments
        self.pending_estimate_tokens = estimate_tokens
        self.pending_estimate_seconds = estimate_seconds

    def budget_spent(self, max_train_tokens: int, max_processed_tokens: int) -> str | None:
        """Which budget of scored or processed tokens (0: none) is spent, in words; None if
        none is."""
        scored, processed = self.scored_tokens, self.processed_tokens
        if 0 < max_train_tokens <= scored:
            return f"scored tokens: {scored:,} >= max_train_tokens: {max_train_tokens:,}"
        if 0 < max_processed_tokens <= processed:
            return (
                f"processed tokens: {processed:,} >= max_processed_tokens: {max_processed_tokens:,}"
            )
        return None

    # ------------------------------------------------------------------------- records

    def update_record(self, update: int) -> dict[str, Any]:
        """The figures of the update in progress, as a record (one JSON object of the metrics
        file, :mod:`atbptt.records`): K as trained, the last estimate, the lr and clip factors,
        the token counts of all workers, and the seconds of this worker's estimates not yet
        taken by :meth:`take_estimate_cost`."""
        decision = self.controller.last_decision
        record: dict[str, Any] = {
            "kind": "update",
            "update": update,
            "trunc_k": self.trained_length,
            "processed_tokens": self.processed_tokens,
            "scored_tokens": self.scored_tokens,
        }
        if decision is not None:
            record["bias_hat"] = decision.relative_bias
            record["beta_hat"] = decision.decay_rate
        if self.config.lr_scaling != "none":
            record["lr_scale"] = self.lr_factor
        if self.clip_threshold is not None:
            record["clip_at"] = self.clip_threshold
        if self.estimating:
            record["est_sec"] = self.pending_estimate_seconds
        return record

    def take_estimate_cost(self) -> tuple[int, float]:
        """This worker's estimate tokens and seconds since the last call (for per-update logs)."""
        cost = (self.pending_estimate_tokens, self.pending_estimate_seconds)
        self.pending_estimate_tokens, self.pending_estimate_seconds = 0, 0.0
        return cost

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Cursor, carried state, counts, controller and estimator: plain values and CPU
        tensors, loadable with ``torch.load(weights_only=True)``."""
        state = self.carried_state
        carried = None if state is None else [t.detach().cpu() for t in state]
        # truncated BPTT's carry is the bare state: carried_state holds it (the format before)
        checkpointed = self.estimator.checkpointed
        carry = self.estimator_carry if checkpointed else None
        return {
            "cursor": self.cursor.state_dict(),
            "num_updates": self.num_segments,
            "segment_length": self.update_length,
            "scored_tokens": self.scored_tokens,
            "processed_tokens": self.processed_tokens,
            "carried_state": carried,
            "controller": self.controller.state_dict(),
            "config": dataclasses.asdict(self.config),
            "estimator": self.estimator.state_dict() if checkpointed else None,
            "estimator_carry": None if carry is None else carry.state_dict(),
        }

    def restore(
        self,
        cursor: StreamCursor,
        carried: State | None,
        controller: dict[str, Any],
        scored_tokens: int,
        processed_tokens: int,
        estimator: dict[str, Any] | None = None,
        estimator_carry: Carry | None = None,
    ) -> None:
        """Continue from the parts of a front end's own checkpoint format (fairseq's)."""
        self.cursor = cursor
        self._counted_ahead = False
        self.controller.load_state_dict(controller)
        self.scored_tokens, self.processed_tokens = int(scored_tokens), int(processed_tokens)
        if estimator is not None:
            self.estimator.load_state_dict(estimator)
        self.estimator_carry = self._carry_from(carried, estimator_carry)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where :meth:`state_dict` left off (the front end checks the data)."""
        self.cursor = StreamCursor.from_state_dict(state["cursor"])
        self._counted_ahead = False
        self.num_segments = int(state["num_updates"])
        self.update_length = int(state["segment_length"])
        self.scored_tokens = int(state["scored_tokens"])
        self.processed_tokens = int(state["processed_tokens"])
        self.controller.load_state_dict(state["controller"])
        if self.estimator.checkpointed and state.get("estimator") is not None:
            self.estimator.load_state_dict(state["estimator"])
        saved_carry = state.get("estimator_carry")
        carry = None if saved_carry is None else Carry.from_state_dict(saved_carry)
        self.estimator_carry = self._carry_from(state["carried_state"], carry)

    def _carry_from(self, carried: Any, carry: Carry | None) -> Carry | None:
        """The carry to continue from: an estimator's saved carry (its history), or, for truncated
        BPTT, the saved bare state (an estimator with history has none without its carry)."""
        if self.estimator.checkpointed:
            return carry
        return None if carried is None else Carry(tuple(carried))


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
    device, _ = placement(estimator)
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


def stream_identity(tokens: Tensor, targets: Tensor | None = None) -> str:
    """sha256 of a training stream's tokens (and targets): the data a driver's state is of."""
    digest = hashlib.sha256()
    for tensor in (tokens, targets):
        if tensor is not None:
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
