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
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import metrics, utils
from fairseq.data import Dictionary
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask, register_task
from torch import Tensor

from atbptt import TbpttLoop, TruncationController, scaled_learning_rate
from atbptt.loop import Snapshot
from atbptt.records import MetricsFile, decision_record
from atbptt_fairseq import fairseq_fixes
from atbptt_fairseq.criterions.tbptt_cross_entropy import segment_forward
from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.fairseq_fixes import eval_lm_guard
from atbptt_fairseq.tasks.checkpoint_state import (
    check_resumed_options,
    checkpoint_layout,
    loop_checkpoint,
    restore_loop,
)
from atbptt_fairseq.tasks.config import (
    AdaptiveTbpttLmConfig,
    check_config,
    check_gradient_estimator,
    check_precision,
    method_config,
    option_flag,
    options_without_effect,
)
from atbptt_fairseq.tasks.estimators import build_gradient_estimator, check_estimator_model
from atbptt_fairseq.tasks.method_metrics import RunRecords, UpdateLoss, reduce_method_metrics
from atbptt_fairseq.tasks.streams import (
    SplitStream,
    batch_iterator,
    check_checkpoint_targets,
    check_dictionary_identity,
    dictionary_identity,
    evaluation_chunks,
    load_dictionary,
    read_split,
)
from atbptt_fairseq.tasks.workers import average_over_workers, gather_columns, unwrap, world

logger = logging.getLogger(__name__)

# an update's training loss above this many bits per token has diverged: its perplexity 2^loss
# overflows a float64 (ppl inf in the logs), where guessing uniformly costs log2(vocabulary) bits
DIVERGED_BITS_PER_TOKEN = 1024.0


@register_task("adaptive_tbptt_lm", dataclass=AdaptiveTbpttLmConfig)
class AdaptiveTbpttLmTask(FairseqTask):
    """Stateful TBPTT language modelling with a fixed or adaptively chosen truncation length."""

    cfg: AdaptiveTbpttLmConfig

    def __init__(self, cfg: AdaptiveTbpttLmConfig, dictionary: Dictionary) -> None:
        super().__init__(cfg)
        self.dictionary = dictionary
        check_config(cfg)
        self.method = method_config(cfg)  # the core's options, as atbptt.TbpttDriver takes them
        world_size, rank = world()
        try:  # the one segment loop: every --gradient-estimator, tbptt included, trains in it
            self.loop = TbpttLoop(
                self.method, build_gradient_estimator(cfg), rank, world_size, average_over_workers,
                flag=option_flag,
            )  # fmt: skip
        except ValueError as error:  # check_config should have caught it first
            raise UserInputError(f"adaptive_tbptt_lm options: {error}") from None
        if self.loop.estimating:
            logger.info(self.loop.describe_schedule())
        self._train_stream: Optional[SplitStream] = None
        self._train_shard: Optional[int] = None
        self._gathered_state: Optional[Tuple[dict, List[Tensor]]] = None
        self._last_call: Optional[Tuple[int, int]] = None  # (update, slot) of the last train_step
        self._snapshot: Optional[Snapshot] = None  # the loop before that call, for a retry
        self._processed_validations = 0  # validations --validate-interval-processed-tokens made
        self._update_loss = UpdateLoss()  # the last update's, for training_diverged
        self._warned_unchecked_dictionary = False
        self._updates_trained = 0  # updates whose record is written
        self._estimate_seconds = 0.0  # of this update's estimate, for its record
        save_dir = getattr(cfg, "save_dir", None)  # unresolved outside fairseq-train: no file
        resolved = isinstance(save_dir, str) and "${" not in save_dir
        metrics_file = MetricsFile(save_dir) if resolved and rank == 0 else None
        self._records = RunRecords(metrics_file, cfg.valid_subset)

    @property
    def controller(self) -> TruncationController:
        """The loop's controller (K and its schedule)."""
        return self.loop.controller

    # ----------------------------------------------------------------------------- set-up

    @classmethod
    def setup_task(cls, cfg: AdaptiveTbpttLmConfig, **kwargs) -> "AdaptiveTbpttLmTask":
        # fairseq runs the plugin: its fixes (idempotent; also in workers that imported the
        # plugin by unpickling their config rather than through --user-dir)
        fairseq_fixes.install()
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
        return batch_iterator(items, epoch, data_buffer_size, skip_remainder_batch)

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
        """``fairseq-eval-lm``: the same stateful pass as validation (``--eval-batch-size``
        columns), over any split, the training split included."""
        eval_lm_guard.check_context_window(context_window)
        if not isinstance(dataset, SplitStream):
            raise TypeError("adaptive_tbptt_lm evaluates only its own split streams")
        items = evaluation_chunks(
            dataset, self.cfg.eval_batch_size, self.cfg.eval_chunk_length, num_shards, shard_id
        )
        return batch_iterator(items).next_epoch_itr(shuffle=False)

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
        core = unwrap(model)
        call = (update_num, int(sample["slot"]))
        if call == self._last_call:
            self.loop.rewind(self._snapshot)
        elif self._last_call is None or self._last_call[0] != update_num:
            # K changes only between updates: never before the 2nd micro-batch of --update-freq
            decision = self.loop.estimate_if_due(core, update_num)
            if decision is not None:
                self._log_decision(update_num, decision)
        self._last_call, self._snapshot = call, self.loop.snapshot()

        amp = isinstance(optimizer, AMPOptimizer)
        model.train()
        model.set_num_updates(update_num)
        try:
            segment = self.loop.next_segment(core)
            ntokens = segment.targets.numel()
            loss = self.loop.train(
                segment,
                core,
                lambda loss: optimizer.backward(loss),
                lambda segment: segment_forward(criterion, model, segment, amp),
                ntokens,
                ignore_grad,
            )
        except BaseException:
            self.loop.rewind(self._snapshot)
            raise
        loss = loss.float()
        self._update_loss.add(update_num, call[1], loss, ntokens)
        record = self.loop.update_record(update_num)
        estimate_tokens, estimate_seconds = self.loop.take_estimate_cost()
        self._estimate_seconds = estimate_seconds or self._estimate_seconds  # for the record
        logging_output = {
            "loss": loss,
            "ntokens": ntokens,
            "nsentences": segment.inputs.size(0),
            "sample_size": ntokens,
            "trunc_k": record["trunc_k"],
            "tbptt_parts": 1,  # identical on every worker: the reduction divides by their count
            # this worker's tokens through the model in this update, its estimate included
            "processed_tokens": segment.inputs.numel() + estimate_tokens,
        }
        for key in ("bias_hat", "beta_hat", "lr_scale"):
            if key in record:
                logging_output[key] = record[key]
        if "est_sec" in record:
            logging_output["est_sec"] = estimate_seconds / self.loop.world_size
        return loss, ntokens, logging_output

    def _log_decision(self, update_num: int, decision) -> None:
        logger.info(
            f"update {update_num}: K = {decision.truncation_length} "
            f"(bias_hat {decision.relative_bias:.4g}, beta_hat {decision.decay_rate:.4g}, "
            f"{decision.seconds:.2f}s): {decision.reason}"
        )
        record = decision_record(update_num, decision)
        logger.info(f"k_decision {json.dumps(record)}")  # also in the log, for its readers
        self._records.write(record)

    def training_diverged(self, num_updates: int) -> Optional[str]:
        """Why the last update's training loss has diverged, in one line; None while it has not
        (called by fairseq-train after every update, on every worker: the loss is all-reduced,
        the one sync per update, and goes into the update's record)."""
        value = self._update_loss.take_bits_per_token()
        if value is None:
            return None
        self._records.write_update(value)
        if value <= DIVERGED_BITS_PER_TOKEN:
            return None
        return (
            f"training diverged at update {num_updates}: the training loss is {value:.4g} bits "
            f"per token at K = {self.loop.update_length} (perplexity overflows)"
        )

    def training_budget_reached(self) -> Optional[str]:
        """Which training budget is spent, in words for the log; None if none (same on every
        worker)."""
        return self.loop.budget_spent(self.cfg.max_train_tokens, self.cfg.max_processed_tokens)

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
        if update_num >= self._updates_trained:  # once per update, not again on a retry
            record = self.loop.update_record(update_num)
            if "est_sec" in record:
                record["est_sec"], self._estimate_seconds = self._estimate_seconds, 0.0
            self._records.hold_update(record)  # written with its loss by training_diverged
            self._updates_trained = update_num + 1
        with scaled_learning_rate(optimizer.param_groups, self.loop.lr_factor):
            optimizer.step()

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        reduce_method_metrics(logging_outputs)

    # ------------------------------------------------------------------------- evaluation

    def begin_valid_epoch(self, epoch: int, model) -> None:
        unwrap(model).reset_streams()

    def post_validate(self, model, stats: Dict[str, Any], aggregate) -> None:
        """Record a split's validation (fairseq-train, after each split, before logging it)."""
        self._records.validation(stats, aggregate, self.loop)

    # ------------------------------------------------------------------------ checkpoints

    def gather_checkpoint_state(self) -> None:
        """Collect every rank's carried state before rank 0 writes a checkpoint.

        Called on every rank by the plugin's wrapper of ``checkpoint_utils.save_checkpoint`` (see
        :mod:`atbptt_fairseq.fairseq_fixes.checkpoint_guard`); fairseq asks only rank 0 for
        :meth:`get_checkpoint_dict`. The checkpoint then holds the state of all columns in the
        global layout (columns x layers x hidden), which each rank slices again on resume.
        """
        carried = checkpoint_layout(self.loop)
        self._gathered_state = None
        if world()[0] > 1 and carried is not None:  # else the same on every rank, or None
            self._gathered_state = (self.loop.cursor.state_dict(), gather_columns(carried))

    def get_checkpoint_dict(self) -> Dict[str, Any]:
        return {
            type(self).__name__: {
                **loop_checkpoint(self.loop, world()[0], self._gathered_state),
                "train_shard": self._train_shard,
                "processed_validations": self._processed_validations,
                "dictionary": dictionary_identity(self.dictionary),
                "method": dataclasses.asdict(self.method),  # compared on resume
                "num_updates": self._updates_trained,  # the metrics records kept on resume
                "wall": self._records.wall(),
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
        dict_path = os.path.join(utils.split_paths(self.cfg.data)[0], "dict.txt")
        checked = check_dictionary_identity(
            trained, dictionary_identity(self.dictionary), dict_path
        )
        if not checked and not self._warned_unchecked_dictionary:
            self._warned_unchecked_dictionary = True
            logger.warning(
                "the checkpoint records no dictionary identity (it was written by an older "
                f"version of the plugin): cannot check that it was trained with {dict_path}"
            )

    def set_checkpoint_dict(self, state: Dict[str, Any]) -> None:
        """Restore the loop (:func:`restore_loop`) and the validation count; fairseq has already
        loaded the training data of the epoch it resumes (and built its iterator)."""
        check_resumed_options(state.get("method"), self.method, options_without_effect(self.cfg))
        world_size, rank = world()
        self._train_shard = restore_loop(self.loop, state, world_size, rank, self._train_shard)
        self._last_call = self._snapshot = None
        self._processed_validations = int(state.get("processed_validations", 0))
        self._updates_trained = int(state.get("num_updates", self._updates_trained))
        self._records.resume(state)  # the records of updates after the checkpoint come again
        # lr_base / lr_set of older checkpoints are ignored: the lr in the optimizer is unscaled
