"""The ``adaptive_tbptt_lm`` task: stateful truncated BPTT over a token stream, with K chosen by
the paper's bias estimator when ``--target-bias`` is set.

Batches are built lazily. A fairseq epoch is a fixed number of update slots (one pass over the data
at K0 by default); each slot is turned into a real segment inside ``train_step`` from the task's
stream cursor and the K in force at that update. K can therefore change at any update, the update
count per epoch never depends on K, and resuming only needs the cursor, the carried state and the
controller, which travel in the checkpoint.
"""

import dataclasses
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import metrics, utils
from fairseq.data import Dictionary, iterators
from fairseq.distributed import utils as distributed_utils
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask, register_task
from torch import Tensor

from atbptt import (
    RESUME_BREAKING_OPTIONS,
    LoopSegment,
    StreamCursor,
    TbpttLoop,
    TruncationController,
    describe_changes,
    resume_changes,
    scaled_learning_rate,
)
from atbptt.estimators import Carry
from atbptt.loop import Snapshot
from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.fairseq_fixes import eval_lm_guard
from atbptt_fairseq.tasks.config import (  # noqa: F401  (AdaptiveTbpttLmConfig's home before)
    METHOD_DEFAULTS,
    AdaptiveTbpttLmConfig,
    check_config,
    check_gradient_estimator,
    check_precision,
    method_config,
)
from atbptt_fairseq.tasks.estimators import (  # noqa: F401  (their home before)
    build_gradient_estimator,
    check_estimator_model,
    gradient_estimation_model,
    task_layout,
)
from atbptt_fairseq.tasks.streams import (  # noqa: F401  (their home before)
    SlotDataset,
    SplitStream,
    check_checkpoint_targets,
    check_dictionary_identity,
    dictionary_identity,
    evaluation_chunks,
    load_dictionary,
    read_split,
)

logger = logging.getLogger(__name__)

# an update's training loss above this many bits per token has diverged: its perplexity 2^loss
# overflows a float64 (ppl inf in the logs), where guessing uniformly costs log2(vocabulary) bits
DIVERGED_BITS_PER_TOKEN = 1024.0

# prefix of the JSON log line that records every decision on K (TruncationDecision's fields)
DECISION_RECORD = "k_decision"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _average_over_workers(tensors: List[Tensor]) -> None:
    """Replace each tensor by its mean over the data-parallel workers (so that every worker
    decides the same K); a no-op on one worker."""
    world_size, _ = _world()
    if world_size > 1:
        group = distributed_utils.get_data_parallel_group()
        for tensor in tensors:
            distributed_utils.all_reduce(tensor, group=group)
            tensor.div_(world_size)


def _world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group = distributed_utils.get_data_parallel_group()
        return distributed_utils.get_world_size(group), distributed_utils.get_rank(group)
    return 1, 0


@register_task("adaptive_tbptt_lm", dataclass=AdaptiveTbpttLmConfig)
class AdaptiveTbpttLmTask(FairseqTask):
    """Stateful TBPTT language modelling with a fixed or adaptively chosen truncation length."""

    cfg: AdaptiveTbpttLmConfig

    def __init__(self, cfg: AdaptiveTbpttLmConfig, dictionary: Dictionary) -> None:
        super().__init__(cfg)
        self.dictionary = dictionary
        check_config(cfg)
        self.method = method_config(cfg)  # the core's options, as atbptt.TbpttDriver takes them
        world_size, rank = _world()
        try:  # the one segment loop; --gradient-estimator (not tbptt) trains through it too
            self.loop = TbpttLoop(
                self.method, build_gradient_estimator(cfg), rank, world_size, _average_over_workers
            )
        except ValueError as error:  # check_config should have caught it first
            raise UserInputError(f"adaptive_tbptt_lm options: {error}") from None
        if self.loop.estimating:
            controller = self.loop.controller
            schedule = (
                f"every {controller.interval} updates"
                if controller.interval
                else f"every {controller.tokens_between_estimates:,} training tokens "
                f"(--estimate-budget {controller.budget})"
            )
            logger.info(
                f"truncation estimates ({controller.num_estimates} x {controller.num_sequences} "
                f"sequences x {controller.burnin} + {controller.window} steps = "
                f"{controller.estimate_tokens:,} tokens each) {schedule}"
            )
        self._train_stream: Optional[SplitStream] = None
        self._train_shard: Optional[int] = None
        self._gathered_state: Optional[Tuple[dict, List[Tensor]]] = None
        self._last_call: Optional[Tuple[int, int]] = None  # (update, slot) of the last train_step
        self._snapshot: Optional[Snapshot] = None  # the loop before that call, for a retry
        self._processed_validations = 0  # validations --validate-interval-processed-tokens made
        self._update_loss: Optional[Tuple[Tensor, Any]] = None  # the last update's, and its size
        self._warned_unchecked_dictionary = False

    @property
    def controller(self) -> TruncationController:
        """The loop's controller (K and its schedule)."""
        return self.loop.controller

    # ----------------------------------------------------------------------------- set-up

    @classmethod
    def setup_task(cls, cfg: AdaptiveTbpttLmConfig, **kwargs) -> "AdaptiveTbpttLmTask":
        if not kwargs.get("from_checkpoint", False):  # a stored config may come from a GPU run
            check_gradient_estimator(cfg)  # before check_precision: its --fp16 line says less
            check_precision(cfg)
        dictionary = load_dictionary(cfg.data, cfg.target_dir)
        logger.info(f"dictionary: {len(dictionary)} types")
        return cls(cfg, dictionary)

    @property
    def source_dictionary(self) -> Dictionary:
        return self.dictionary

    @property
    def target_dictionary(self) -> Dictionary:
        return self.dictionary

    def max_positions(self):
        return None

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)]
        self.datasets[split] = read_split(data_path, split, self.dictionary, self.cfg.target_dir)
        if split == self.cfg.train_subset:
            shard = (epoch - 1) % len(paths)
            if self._train_shard is not None and shard != self._train_shard:
                self.loop.restart_pass()
            self._train_shard = shard
            self._train_stream = self.datasets[split]
        logger.info(f"{split}: {len(self.datasets[split]):,} tokens from {data_path}")

    # --------------------------------------------------------------------------- batching

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
    ):
        """Train: ``updates_per_epoch`` update slots; evaluation: prebuilt stateful chunks.

        Every worker gets every item: the columns are split across workers here, not the batches.
        """
        if not isinstance(dataset, SplitStream):
            raise TypeError("adaptive_tbptt_lm batches only its own split streams")
        if dataset is self._train_stream:
            items = self._training_slots(dataset, max_sentences, num_shards, shard_id)
        else:
            items = evaluation_chunks(
                dataset, self.cfg.eval_batch_size, self.cfg.eval_chunk_length, num_shards, shard_id
            )
        return iterators.EpochBatchIterator(
            dataset=SlotDataset(items),
            collate_fn=lambda samples: samples[0],
            batch_sampler=[[i] for i in range(len(items))],
            num_workers=0,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
        )

    def _training_slots(self, stream: SplitStream, batch_size, num_shards: int, shard_id: int):
        if not batch_size:
            raise UserInputError(
                "--batch-size (columns per worker) is required; --max-tokens is not used"
            )
        try:
            self.loop.use_stream(stream.tokens, batch_size, stream.targets, shard_id, num_shards)
        except ValueError as error:  # too short for the columns or the estimate window
            raise UserInputError(f"training split {stream.name}: {error}") from None
        slots = self.loop.segments_per_epoch
        logger.info(
            f"training columns: {batch_size} x {self.loop.column_length:,} tokens per worker, "
            f"{slots} update slots per epoch"
        )
        return [
            {"id": torch.tensor([i]), "slot": i, "nsentences": batch_size} for i in range(slots)
        ]

    def eval_lm_dataloader(
        self, dataset, num_shards: int = 1, shard_id: int = 0, context_window: int = 0, **unused
    ):
        """``fairseq-eval-lm``: the same stateful pass as validation (``--eval-batch-size`` columns)."""
        eval_lm_guard.check_context_window(context_window)
        return self.get_batch_iterator(
            dataset, num_shards=num_shards, shard_id=shard_id
        ).next_epoch_itr(shuffle=False)

    def build_model(self, cfg, from_checkpoint: bool = False):
        model = super().build_model(cfg, from_checkpoint)
        for required in ("zero_state", "advance", "readout", "run_window", "state_batch_dim"):
            if not hasattr(model, required):  # atbptt.RecurrentModel
                raise UserInputError(
                    f"adaptive_tbptt_lm needs a stateful model such as --arch tbptt_lstm_lm_ptb; "
                    f"{type(model).__name__} has no {required}"
                )
        check_estimator_model(self.cfg, model)
        return model

    # --------------------------------------------------------------------------- training

    def train_step(
        self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs
    ):
        """Train on the loop's next segment; a repeated ``(update_num, slot)`` call is a retry.

        fairseq calls again with the same samples after an ``--amp`` overflow (and to locate a
        NaN): the loop is rewound to where it was before the first call, so the state advances
        once per update slot however often it is retried. If the forward or backward pass raises
        (e.g. out of memory), it is rewound as well before re-raising.
        """
        core = _unwrap(model)
        call = (update_num, int(sample["slot"]))
        if call == self._last_call:
            self.loop.rewind(self._snapshot)
        elif self._last_call is None or self._last_call[0] != update_num:
            # K changes only between updates: never before the 2nd micro-batch of --update-freq
            decision = self.loop.estimate_if_due(core, update_num)
            if decision is not None:
                self._log_decision(update_num, decision)
        self._last_call, self._snapshot = call, self.loop.snapshot()

        def run_window(segment: LoopSegment) -> Tuple[Tensor, Tuple[Tensor, ...]]:
            """Truncated BPTT's forward: the criterion's, through the (wrapped) model."""
            forward = getattr(_unwrap(criterion), "forward_carrying_state", None)
            if forward is None:
                raise UserInputError(
                    "adaptive_tbptt_lm trains with --criterion tbptt_cross_entropy, which hands "
                    "it the recurrent state to carry into the next update; "
                    f"{type(criterion).__name__} does not"
                )
            batch = {
                "net_input": {
                    "src_tokens": segment.inputs,
                    "state": segment.state,
                    "carry_offset": segment.carry_offset,
                    "output_start": segment.output_start,
                },
                "target": segment.targets,
                "ntokens": segment.targets.numel(),
            }
            with torch.amp.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, _, _, carried = forward(model, batch)
            return loss, carried

        model.train()
        model.set_num_updates(update_num)
        try:
            segment = self.loop.next_segment(core)
            ntokens = segment.targets.numel()
            loss = self.loop.train(
                segment, core, lambda loss: optimizer.backward(loss), run_window, ntokens,
                ignore_grad,
            )  # fmt: skip
        except BaseException:
            self.loop.rewind(self._snapshot)
            raise
        loss = loss.float()
        self._update_loss = (loss, ntokens)  # training_diverged
        record = self.loop.take_update_record(update_num)
        logging_output = {
            "loss": loss,
            "ntokens": ntokens,
            "nsentences": segment.inputs.size(0),
            "sample_size": ntokens,
            "trunc_k": record["trunc_k"],
            "tbptt_parts": 1,  # identical on every worker: the reduction divides by their count
            # this worker's tokens through the model in this update, its estimate included
            "processed_tokens": segment.inputs.numel() + record["est_tokens"],
        }
        for key in ("bias_hat", "beta_hat", "lr_scale"):
            if key in record:
                logging_output[key] = record[key]
        if "est_sec" in record:
            logging_output["est_sec"] = record["est_sec"] / self.loop.world_size
        return loss, ntokens, logging_output

    def _log_decision(self, update_num: int, decision) -> None:
        logger.info(
            f"update {update_num}: K = {decision.truncation_length} "
            f"(bias_hat {decision.relative_bias:.4g}, beta_hat {decision.decay_rate:.4g}, "
            f"{decision.seconds:.2f}s): {decision.reason}"
        )
        record = {"update": update_num, **dataclasses.asdict(decision)}
        logger.info(f"{DECISION_RECORD} {json.dumps(record)}")

    def training_diverged(self, num_updates: int) -> Optional[str]:
        """Why the last update's training loss has diverged, in one line; None while it has not
        (called by fairseq-train after every update, on every worker: the check is all-reduced)."""
        if self._update_loss is None:
            return None
        loss, sample_size = self._update_loss
        self._update_loss = None
        bits = (loss.float() / max(float(sample_size), 1.0) / math.log(2)).reshape(1)
        bits = torch.where(torch.isnan(bits), torch.full_like(bits, math.inf), bits)
        if _world()[0] > 1:
            group = distributed_utils.get_data_parallel_group()
            bits = distributed_utils.all_reduce(bits, group, op="max")
        value = float(bits)
        if value <= DIVERGED_BITS_PER_TOKEN:
            return None
        return (
            f"training diverged at update {num_updates}: the training loss is {value:.4g} bits "
            f"per token at K = {self.loop.update_length} (perplexity overflows)"
        )

    def training_budget_reached(self) -> Optional[str]:
        """Which training budget is spent, in words for the log; None if none (same on every
        worker)."""
        scored, processed = self.loop.scored_tokens, self.loop.processed_tokens
        if 0 < self.cfg.max_train_tokens <= scored:
            return f"scored tokens: {scored:,} >= max_train_tokens: {self.cfg.max_train_tokens:,}"
        if 0 < self.cfg.max_processed_tokens <= processed:
            return (
                f"processed tokens: {processed:,} >= max_processed_tokens: "
                f"{self.cfg.max_processed_tokens:,}"
            )
        return None

    def processed_validation_due(self) -> bool:
        """Whether --validate-interval-processed-tokens asks for a validation after this update."""
        interval = self.cfg.validate_interval_processed_tokens
        return interval > 0 and self.loop.processed_tokens // interval > self._processed_validations

    def processed_validation_done(self) -> None:
        interval = self.cfg.validate_interval_processed_tokens
        self._processed_validations = self.loop.processed_tokens // interval

    def optimizer_step(self, optimizer, model, update_num) -> None:
        """Clip at --truncation-clip-norm / K and step at the scheduler's lr times factor(K).

        The factor is applied only for the step itself, so the lr the scheduler reads back (and
        fairseq logs and checkpoints) stays unscaled: a reduce-on-plateau shrink is never applied
        to an lr that already carries the factor.
        """
        threshold = self.loop.clip_threshold
        if threshold is not None:
            optimizer.clip_grad_norm(threshold)
            metrics.log_scalar("clip_at", threshold, weight=0)
        with scaled_learning_rate(optimizer.param_groups, self.loop.lr_factor):
            optimizer.step()

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        parts = sum(log.get("tbptt_parts", 0) for log in logging_outputs)
        if parts == 0:
            return
        trunc_k = sum(log.get("trunc_k", 0) for log in logging_outputs) / parts
        metrics.log_scalar("trunc_k", trunc_k, weight=1, round=1)
        for key in ("bias_hat", "beta_hat"):
            if any(key in log for log in logging_outputs):
                value = sum(log.get(key, 0.0) for log in logging_outputs) / parts
                # unrounded: fairseq prints 6 significant digits, so a bias of 1e-6 or a decay
                # rate of 0.99993 stays readable
                metrics.log_scalar(key, value)
        if any("lr_scale" in log for log in logging_outputs):
            value = sum(log.get("lr_scale", 0.0) for log in logging_outputs) / parts
            metrics.log_scalar("lr_scale", value, round=3)
        if any("processed_tokens" in log for log in logging_outputs):
            # per update, like fairseq's wpb: sweeps cumulate it into processed tokens
            processed = sum(log.get("processed_tokens", 0) for log in logging_outputs)
            metrics.log_scalar("ppb", processed, round=1)
        if any("est_sec" in log for log in logging_outputs):
            seconds = sum(log.get("est_sec", 0.0) for log in logging_outputs)
            metrics.log_scalar_sum("est_sec", seconds, round=2)

    # ------------------------------------------------------------------------- evaluation

    def begin_valid_epoch(self, epoch: int, model) -> None:
        _unwrap(model).reset_streams()

    # ------------------------------------------------------------------------ checkpoints

    def _carried_state(self) -> Optional[Tuple[Tensor, ...]]:
        """The loop's carried state in the checkpoints' layout (batch along dim 1)."""
        state = self.loop.carried_state
        return None if state is None else task_layout(state, self.loop.state_batch_dim)

    def gather_checkpoint_state(self) -> None:
        """Collect every rank's carried state before rank 0 writes a checkpoint.

        Called on every rank by the plugin's wrapper of ``checkpoint_utils.save_checkpoint`` (see
        :mod:`atbptt_fairseq.fairseq_fixes.checkpoint_guard`); fairseq asks only rank 0 for
        :meth:`get_checkpoint_dict`. The checkpoint then holds the state of all columns in the
        global layout (columns x layers x hidden), which each rank slices again on resume.
        """
        world_size, _ = _world()
        carried = self._carried_state()
        self._gathered_state = None
        if world_size == 1 or carried is None:
            return  # the cursor, and so a None state, is the same on every rank
        group = distributed_utils.get_data_parallel_group()
        gathered = [
            torch.cat(distributed_utils.all_gather(tensor.detach().contiguous(), group), dim=1)
            for tensor in carried
        ]
        self._gathered_state = (self.loop.cursor.state_dict(), gathered)

    def get_checkpoint_dict(self) -> Dict[str, Any]:
        state, carried, cursor = None, self._carried_state(), self.loop.cursor.state_dict()
        world_size, _ = _world()
        if world_size == 1:
            if carried is not None:
                state = [tensor.detach().cpu() for tensor in carried]
        elif self._gathered_state is not None and self._gathered_state[0] == cursor:
            state = [tensor.cpu() for tensor in self._gathered_state[1]]
        elif carried is not None:
            logger.warning(
                "no carried state in this checkpoint: it was not gathered from all ranks"
            )
        estimator, carry = self.loop.estimator, self.loop.estimator_carry
        return {
            type(self).__name__: {
                "cursor": cursor,
                "carried_state": state,
                "train_shard": self._train_shard,
                "controller": self.controller.state_dict(),
                "scored_tokens": self.loop.scored_tokens,
                "processed_tokens": self.loop.processed_tokens,
                "processed_validations": self._processed_validations,
                "dictionary": dictionary_identity(self.dictionary),
                "method": dataclasses.asdict(self.method),  # compared on resume
                # --gradient-estimator (not tbptt): its name, RNG and carry (sensitivities too)
                **(
                    {}
                    if estimator is None
                    else {
                        "gradient_estimator": {
                            "name": estimator.name,
                            "state": estimator.state_dict(),
                            "carry": None if carry is None else carry.state_dict(),
                        }
                    }
                ),
            }
        }

    def state_dict(self) -> Dict[str, Any]:
        """fairseq's task state, plus the dictionary's identity and the ``--target-dir`` trained
        on: fairseq-eval-lm (and every loader of a trained model) hands this back to
        :meth:`load_state_dict` before building the model, where :meth:`get_checkpoint_dict`
        reaches only a resumed fairseq-train."""
        return {
            **super().state_dict(),
            "dictionary_identity": dictionary_identity(self.dictionary),
            "target_dir": self.cfg.target_dir,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Check that a trained model fits this task's data and targets, then fairseq's load."""
        state_dict = dict(state_dict)
        self.check_checkpoint_dictionary(state_dict.pop("dictionary_identity", None))
        if "target_dir" in state_dict:  # absent: a checkpoint of another task
            check_checkpoint_targets(state_dict.pop("target_dir"), self.cfg.target_dir)
        super().load_state_dict(state_dict)

    @staticmethod
    def upgrade_checkpoint_state(checkpoint: Dict[str, Any]) -> None:
        """Bring the task state of an older checkpoint of this task up to date (called by the
        plugin's checkpoint loader): before the task state held ``target_dir``, only the
        checkpoint's config recorded it."""
        task_state = checkpoint.get("task_state")
        if isinstance(task_state, dict) and "target_dir" not in task_state:
            task_state["target_dir"] = checkpoint["cfg"]["task"].get("target_dir")

    def check_checkpoint_dict(self, state: Dict[str, Any]) -> None:
        """Refuse to resume from a checkpoint of other data (called by the plugin's wrapper of
        fairseq's ``load_checkpoint`` before anything is trained or written)."""
        self.check_checkpoint_dictionary(state.get("dictionary"))

    def check_checkpoint_dictionary(self, trained: Optional[Dict[str, Any]]) -> None:
        """Refuse a checkpoint trained with another dictionary than this data directory's (its
        token ids would mean other words); warn once for one that recorded none."""
        own = dictionary_identity(self.dictionary)
        dict_path = os.path.join(utils.split_paths(self.cfg.data)[0], "dict.txt")
        if not trained or "sha256" not in trained:
            if not self._warned_unchecked_dictionary:
                self._warned_unchecked_dictionary = True
                logger.warning(
                    "the checkpoint records no dictionary identity (it was written by an older "
                    f"version of the plugin): cannot check that it was trained with {dict_path}"
                )
            return
        check_dictionary_identity(trained, own, dict_path)

    def _check_resumed_options(self, saved: Optional[Dict[str, Any]]) -> None:
        """Say in one line which method options differ from the checkpoint's; refuse those that
        would give the carried state another meaning (checkpoints before this check: none)."""
        changes = resume_changes(saved, self.method)
        breaking = [change for change in changes if change[0] in RESUME_BREAKING_OPTIONS]
        if breaking:
            raise UserInputError(
                f"cannot resume with {describe_changes(breaking, _flag)}: the checkpoint's carried "
                "state belongs to the saved value; resume with it, or start a new run "
                "(another --save-dir, or --reset-dataloader to start a new pass)"
            )
        if changes:
            logger.warning(f"resuming with changed options: {describe_changes(changes, _flag)}")

    def set_checkpoint_dict(self, state: Dict[str, Any]) -> None:
        """Restore the stream position, carried state, controller, token count and lr scaling.

        fairseq has already loaded the training data of the epoch it resumes (and built its
        iterator). The stored carried state covers all columns; this rank keeps its own. A
        checkpoint written at the end of an epoch on another data shard (colon-separated data
        paths) starts that shard from its beginning with a zero state, as an uninterrupted run does
        when it moves to the next shard. A checkpoint of another global batch size (columns =
        --batch-size x workers) starts a new pass over the data, as the columns differ.
        """
        self._check_resumed_options(state.get("method"))
        cursor = StreamCursor.from_state_dict(state["cursor"])
        carried = state.get("carried_state")
        saved_shard = state.get("train_shard")
        world_size, rank = _world()
        columns = self.loop.column_count or None
        saved_columns = None if carried is None else carried[0].size(1)
        if (
            saved_columns is not None
            and columns is not None
            and saved_columns != columns * world_size
        ):
            logger.warning(
                f"the checkpoint's carried state covers {saved_columns} columns but this run "
                f"trains {columns * world_size} (--batch-size x workers): starting a new pass over "
                "the training data from a zero state"
            )
            cursor, carried = StreamCursor(passes=cursor.passes + 1), None
        elif saved_shard is not None and self._train_shard not in (None, saved_shard):
            cursor, carried = StreamCursor(passes=cursor.passes), None
        else:
            if carried is not None:
                rows = slice(rank * columns, (rank + 1) * columns) if columns else slice(None)
                carried = tuple(tensor[:, rows].contiguous() for tensor in carried)
            if saved_shard is not None:
                self._train_shard = saved_shard
        estimator, saved = self.loop.estimator, state.get("gradient_estimator")
        estimator_state, carry = None, None
        if estimator is not None and (saved is None or saved.get("name") != estimator.name):
            logger.warning(
                f"the checkpoint holds no {estimator.name} state (it was trained with "
                f"another --gradient-estimator): the estimator starts afresh at a new pass"
            )
            cursor, carried = StreamCursor(passes=cursor.passes + 1), None
        elif estimator is not None:
            estimator_state = saved["state"]
            # a carry that does not continue the restored stream (a new pass or shard) is dropped
            if saved.get("carry") is not None and carried is not None:
                carry = Carry.from_state_dict(saved["carry"])
        self._last_call = self._snapshot = None
        self.loop.restore(
            cursor,
            carried,
            state["controller"],
            # checkpoints before the processed-token budget: estimates not counted, windows are
            state.get("scored_tokens", 0),
            state.get("processed_tokens", 0),
            estimator_state,
            carry,
        )
        self._processed_validations = int(state.get("processed_validations", 0))
        # lr_base / lr_set of older checkpoints are ignored: the lr in the optimizer is unscaled


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
