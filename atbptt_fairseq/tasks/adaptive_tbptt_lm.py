"""The ``adaptive_tbptt_lm`` task: stateful truncated BPTT over a token stream, with K chosen by
the paper's bias estimator when ``--target-bias`` is set.

Batches are built lazily. A fairseq epoch is a fixed number of update slots (one pass over the data
at K0 by default); each slot is turned into a real segment inside ``train_step`` from the task's
stream cursor and the K in force at that update. K can therefore change at any update, the update
count per epoch never depends on K, and resuming only needs the cursor, the carried state and the
controller, which travel in the checkpoint.
"""

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq import metrics, utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, iterators
from fairseq.data.indexed_dataset import MMapIndexedDataset
from fairseq.distributed import utils as distributed_utils
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask, register_task
from torch import Tensor

from atbptt import (
    RESUME_BREAKING_OPTIONS,
    StreamCursor,
    StreamTooShortError,
    aligned_stream,
    budget_tokens,
    build_controller,
    describe_changes,
    estimate_truncation,
    lay_out_columns,
    lr_factor,
    plan_segment,
    resume_changes,
    scaled_learning_rate,
    segments_per_pass,
)
from atbptt.estimators import (
    Artbp,
    Carry,
    ElementwiseLstm,
    ExactRtrl,
    GradientEstimator,
    KfRtrl,
    TanhRnn,
    Uoro,
)
from atbptt.gradient_profile import State
from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq import fairseq_fixes
from atbptt_fairseq.fairseq_fixes import eval_lm_guard
from atbptt_fairseq.tasks.config import (  # noqa: F401  (AdaptiveTbpttLmConfig's home before)
    METHOD_DEFAULTS,
    AdaptiveTbpttLmConfig,
    check_config,
    check_gradient_estimator,
    check_precision,
    method_config,
    options_without_effect,
)

logger = logging.getLogger(__name__)

# an update's training loss above this many bits per token has diverged: its perplexity 2^loss
# overflows a float64 (ppl inf in the logs), where guessing uniformly costs log2(vocabulary) bits
DIVERGED_BITS_PER_TOKEN = 1024.0

# prefix of the JSON log line that records every decision on K (TruncationDecision's fields)
DECISION_RECORD = "k_decision"


class SplitStream(FairseqDataset):
    """A whole split as a 1-D token stream, with an optional token-aligned target stream.

    Batched only by this task's ``get_batch_iterator``, which lays it out in columns.
    """

    def __init__(self, name: str, tokens: Tensor, targets: Optional[Tensor] = None) -> None:
        super().__init__()
        self.name = name
        self.tokens = tokens  # N
        self.targets = targets  # N, or None: the target is the next token

    def __len__(self) -> int:
        return self.tokens.numel()

    def __getitem__(self, index: int) -> Tensor:
        return self.tokens[index]


class SlotDataset(FairseqDataset):
    """A fixed number of items that index update slots (training) or prebuilt batches (evaluation)."""

    def __init__(self, items: List[Dict[str, Any]]) -> None:
        super().__init__()
        self.items = items

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        assert len(samples) == 1, "every item is a whole batch"
        return samples[0]


def dictionary_identity(dictionary: Dictionary) -> Dict[str, Any]:
    """What a checkpoint records of the dictionary it was trained with: the sha256 of its symbols
    in id order (the meaning of every token id; counts left out) and, for messages, its size.

    Sizes match easily (fairseq pads a dictionary to a multiple of 8), so only the hash tells two
    corpora's dictionaries apart.
    """
    joined = "\n".join(dictionary.symbols).encode("utf-8")
    return {"sha256": hashlib.sha256(joined).hexdigest(), "types": len(dictionary)}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _batch_iterator(
    items: List[Dict[str, Any]],
    epoch: int = 1,
    buffer_size: int = 0,
    skip_remainder_batch: bool = False,
) -> iterators.EpochBatchIterator:
    """fairseq's iterator over ``items``, each one whole batch, in order."""
    return iterators.EpochBatchIterator(
        dataset=SlotDataset(items),
        collate_fn=lambda samples: samples[0],
        batch_sampler=[[i] for i in range(len(items))],
        num_workers=0,
        epoch=epoch,
        buffer_size=buffer_size,
        disable_shuffling=True,
        skip_remainder_batch=skip_remainder_batch,
    )


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
        try:
            self.controller = build_controller(self.method)
        except ValueError as error:  # check_config should have caught it first
            raise UserInputError(f"adaptive_tbptt_lm options: {error}") from None
        if self._estimating:
            controller = self.controller
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
        # --gradient-estimator other than tbptt: the estimator and what it carries across updates
        self.estimator = build_gradient_estimator(cfg)
        self._estimator_carry: Optional[Carry] = None
        self.cursor = StreamCursor()
        self._carried_state: Optional[Tuple[Tensor, Tensor]] = None
        self._train_columns: Optional[Tuple[Tensor, Tensor]] = None
        self._train_stream: Optional[SplitStream] = None
        self._train_shard: Optional[int] = None
        self._gathered_state: Optional[Tuple[dict, List[Tensor]]] = None
        self._last_call: Optional[Tuple[int, int]] = None
        self._counted_call: Optional[Tuple[int, int]] = None
        self.scored_tokens = 0  # target tokens of all training updates so far, all workers
        self._before_last_call: Optional[Tuple[StreamCursor, Any]] = None
        self._pending_estimate_seconds = 0.0
        self.processed_tokens = 0  # tokens run through the model, estimates included, all workers
        self._update_truncation_length = cfg.truncation_length  # K of the update in progress
        self._pending_estimate_tokens = 0  # this worker's estimate tokens not yet logged
        self._processed_validations = 0  # validations --validate-interval-processed-tokens made
        self._update_loss: Optional[Tuple[Tensor, Any]] = None  # the last update's, and its size
        self._warned_long_truncation = False
        self._warned_unchecked_dictionary = False

    # ----------------------------------------------------------------------------- set-up

    @classmethod
    def setup_task(cls, cfg: AdaptiveTbpttLmConfig, **kwargs) -> "AdaptiveTbpttLmTask":
        # fairseq runs the plugin: its fixes (idempotent; also in workers that imported the
        # plugin by unpickling their config rather than through --user-dir)
        fairseq_fixes.install()
        if not kwargs.get("from_checkpoint", False):  # a stored config may come from a GPU run
            check_gradient_estimator(cfg)  # before check_precision: its --fp16 line says less
            check_precision(cfg)
        paths = utils.split_paths(cfg.data or "")
        if not paths or not paths[0]:
            raise UserInputError(
                "no data directory given; pass the fairseq-preprocess --only-source output "
                "directory"
            )
        for path in paths:
            if not os.path.isdir(path):
                raise UserInputError(
                    f"data directory {path} does not exist; run fairseq-preprocess --only-source "
                    "--destdir there first, or fix the path"
                )
        dict_path = os.path.join(paths[0], "dict.txt")
        if not os.path.isfile(dict_path):
            raise UserInputError(
                f"{dict_path} is missing; the data directory must be fairseq-preprocess output "
                "(it writes dict.txt next to the .bin/.idx files)"
            )
        try:
            dictionary = Dictionary.load(dict_path)
        except Exception as error:  # noqa: BLE001  (fairseq raises ValueError or others)
            raise UserInputError(
                f"{dict_path} is not a fairseq dictionary ({error}); regenerate it with "
                "fairseq-preprocess"
            ) from None
        if cfg.target_dir:
            cls._check_target_dictionary(dict_path, dictionary, paths[0], cfg.target_dir)
        logger.info(f"dictionary: {len(dictionary)} types")
        return cls(cfg, dictionary)

    @staticmethod
    def _check_target_dictionary(
        dict_path: str, dictionary: Dictionary, data_path: str, target_dir: str
    ) -> None:
        """The target stream is read with the input dictionary: refuse one binarized with
        another (its own dict.txt, when it has one, must be the same)."""
        target_dict_path = os.path.join(data_path, target_dir, "dict.txt")
        if not os.path.isfile(target_dict_path):
            return
        try:
            target_dictionary = Dictionary.load(target_dict_path)
        except Exception as error:  # noqa: BLE001  (fairseq raises ValueError or others)
            raise UserInputError(
                f"{target_dict_path} is not a fairseq dictionary ({error}); regenerate it with "
                "fairseq-preprocess"
            ) from None
        inputs, targets = dictionary_identity(dictionary), dictionary_identity(target_dictionary)
        if inputs["sha256"] != targets["sha256"]:
            raise UserInputError(
                f"{target_dict_path} ({targets['types']} types, sha256 "
                f"{targets['sha256'][:12]}) is not {dict_path} ({inputs['types']} types, sha256 "
                f"{inputs['sha256'][:12]}): --target-dir {target_dir} is read with the input "
                f"dictionary; binarize the targets with fairseq-preprocess --srcdict {dict_path}"
            )

    @property
    def source_dictionary(self) -> Dictionary:
        return self.dictionary

    @property
    def target_dictionary(self) -> Dictionary:
        return self.dictionary

    def max_positions(self):
        return None

    def _read_stream(self, split_path: str, combine: bool) -> Tensor:
        if os.path.isfile(split_path + ".bin") and os.path.getsize(split_path + ".bin") == 0:
            # fairseq cannot even open it (mmap of an empty file)
            raise UserInputError(
                f"split {split_path} is empty (fairseq-preprocess got an empty text file); give "
                "it some text and binarize it again"
            )
        data = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if data is None:
            raise UserInputError(
                f"split {split_path}.bin/.idx not found; binarize it with fairseq-preprocess "
                "(--trainpref/--validpref/--testpref) or choose another split"
            )
        if isinstance(data, MMapIndexedDataset):
            buffer = np.frombuffer(data._bin_buffer, dtype=data._index.dtype)
            tokens = torch.from_numpy(buffer.astype(np.int64))
        else:
            pieces = [data[i].long() for i in range(len(data))]
            tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        if tokens.numel() and int(tokens.max()) >= len(self.dictionary):
            raise UserInputError(
                f"{split_path} holds token ids up to {int(tokens.max())} but dict.txt has "
                f"{len(self.dictionary)} entries: the split was binarized with another "
                "dictionary; binarize it again with fairseq-preprocess --srcdict <this dict.txt>"
            )
        return tokens

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)]
        tokens = self._read_stream(os.path.join(data_path, split), combine)
        targets = None
        if self.cfg.target_dir:
            targets = self._read_stream(
                os.path.join(data_path, self.cfg.target_dir, split), combine
            )
            if targets.numel() != tokens.numel():
                raise UserInputError(
                    f"{split}: the target stream has {targets.numel()} tokens, the input stream "
                    f"{tokens.numel()}; binarize token-aligned inputs and targets"
                )
        if tokens.numel() < 2:
            raise UserInputError(
                f"split {split} in {data_path} holds {tokens.numel()} tokens; give it some text "
                "and binarize it again"
            )
        self.datasets[split] = SplitStream(
            name=f"{data_path}:{split}", tokens=tokens, targets=targets
        )
        if split == self.cfg.train_subset:
            shard = (epoch - 1) % len(paths)
            if self._train_shard is not None and shard != self._train_shard:
                self.cursor = StreamCursor(passes=self.cursor.passes)
                self._carried_state = None
            self._train_shard = shard
            self._train_stream = self.datasets[split]
        logger.info(f"{split}: {tokens.numel():,} tokens from {data_path}")

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
            items = self._evaluation_chunks(dataset, num_shards, shard_id)
        return _batch_iterator(items, epoch, data_buffer_size, skip_remainder_batch)

    def _training_slots(self, stream: SplitStream, batch_size, num_shards: int, shard_id: int):
        if not batch_size:
            raise UserInputError(
                "--batch-size (columns per worker) is required; --max-tokens is not used"
            )
        try:
            inputs, targets = lay_out_columns(
                stream.tokens, batch_size * num_shards, stream.targets, shard_id, num_shards
            )
        except StreamTooShortError as error:
            raise UserInputError(f"training split {stream.name}: {error}") from None
        if self._estimating:
            self._check_estimate_fits(stream)
        self._train_columns = (inputs, targets)
        style = self.cfg.tbptt_style if self.estimator is None else "disjoint"
        slots = self.cfg.updates_per_epoch or segments_per_pass(
            self.cfg.truncation_length, style, inputs.size(1)
        )
        logger.info(
            f"training columns: {batch_size} x {inputs.size(1):,} tokens per worker, "
            f"{slots} update slots per epoch"
        )
        return [
            {"id": torch.tensor([i]), "slot": i, "nsentences": batch_size} for i in range(slots)
        ]

    def _evaluation_chunks(self, stream: SplitStream, num_shards: int, shard_id: int):
        columns = self.cfg.eval_batch_size
        try:
            inputs, targets = lay_out_columns(
                stream.tokens, columns * num_shards, stream.targets, shard_id, num_shards
            )
        except StreamTooShortError as error:
            raise UserInputError(
                f"evaluation split {stream.name}: {error} (--eval-batch-size)"
            ) from None
        chunk = self.cfg.eval_chunk_length
        items = []
        for index, start in enumerate(range(0, inputs.size(1), chunk)):
            src = inputs[:, start : start + chunk]  # B x T
            items.append(
                {
                    "id": torch.arange(columns),
                    "net_input": {
                        "src_tokens": src,
                        "src_lengths": torch.full((columns,), src.size(1)),
                        "stream": stream.name,
                        "start_of_stream": index == 0,
                    },
                    "target": targets[:, start : start + chunk],
                    "nsentences": columns,
                    "ntokens": src.numel(),
                }
            )
        return items

    def eval_lm_dataloader(
        self, dataset, num_shards: int = 1, shard_id: int = 0, context_window: int = 0, **unused
    ):
        """``fairseq-eval-lm``: the same stateful pass as validation (``--eval-batch-size`` columns),
        over any split, the training split included."""
        eval_lm_guard.check_context_window(context_window)
        if not isinstance(dataset, SplitStream):
            raise TypeError("adaptive_tbptt_lm evaluates only its own split streams")
        items = self._evaluation_chunks(dataset, num_shards, shard_id)
        return _batch_iterator(items).next_epoch_itr(shuffle=False)

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

    def check_checkpoint_targets(self, trained_dir: Optional[str]) -> None:
        """Refuse to score a checkpoint on other targets than it learned (``trained_dir``: its
        ``--target-dir``): a copy-task model evaluated without ``--target-dir`` would be scored
        on predicting its next input."""
        target_dir = self.cfg.target_dir
        if trained_dir == target_dir:
            return
        if target_dir is None:
            raise UserInputError(
                f"the checkpoint was trained to predict the targets in --target-dir "
                f"{trained_dir}; pass --target-dir {trained_dir} to score it on them"
            )
        learned = f"--target-dir {trained_dir}" if trained_dir else "the next token"
        raise UserInputError(
            f"the checkpoint was trained to predict {learned}, not the targets in --target-dir "
            f"{target_dir}; use the --target-dir it was trained with"
            + ("" if trained_dir else " (none: leave the option out)")
        )

    # --------------------------------------------------------------------------- training

    def _training_batch(
        self, slot_sample: Dict[str, Any], device: torch.device, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """Turn an update slot into the next segment of the stream at the current K.

        The carried state goes to ``device`` and, if given, ``dtype`` (a state restored from a
        checkpoint lives on the CPU, possibly in another precision).
        """
        inputs, targets = self._train_columns
        requested = self.controller.truncation_length
        truncation_length = self._applied_truncation_length(requested)
        if truncation_length < requested:
            self._warn_long_truncation(requested, truncation_length)
        segment = plan_segment(self.cursor, requested, self.cfg.tbptt_style, inputs.size(1))
        if segment.new_pass:
            self._carried_state = None
        state = self._carried_state
        if state is not None and (
            state[0].device != device or (dtype is not None and state[0].dtype != dtype)
        ):
            state = tuple(tensor.to(device=device, dtype=dtype) for tensor in state)
        window = slice(segment.window_start, segment.window_end)
        scored = slice(segment.window_start + segment.output_start, segment.window_end)
        src_tokens = inputs[:, window].to(device)  # B x T
        target = targets[:, scored].to(device)  # B x K
        return {
            "id": slot_sample["id"],
            "net_input": {
                "src_tokens": src_tokens,
                "state": state,
                "carry_offset": segment.carry_offset,
                "output_start": segment.output_start,
            },
            "target": target,
            "nsentences": src_tokens.size(0),
            "ntokens": target.numel(),
            "truncation_length": truncation_length,
        }

    def _applied_truncation_length(self, truncation_length: int) -> int:
        """The K a training segment really has: a K longer than a training column trains each
        column as one segment from a zero state, i.e. with K = the column length."""
        if self._train_columns is None:
            return truncation_length
        return min(truncation_length, self._train_columns[0].size(1))

    def _warn_long_truncation(self, requested: int, applied: int) -> None:
        """Say once per run that K is capped by the column length (on the first worker)."""
        if self._warned_long_truncation:
            return
        self._warned_long_truncation = True
        if _world()[1] == 0:
            logger.warning(
                f"K = {requested} is longer than a training column ({applied} tokens: the split "
                "over --batch-size x workers columns), so every update trains a whole column from "
                f"a zero state: K = {applied} applies, and trunc_k and --lr-scaling use it; lower "
                "--truncation-length (--max-truncation-length) or --batch-size for a longer K"
            )

    def train_step(
        self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs
    ):
        """Train on the next segment; a repeated ``(update_num, slot)`` call is a retry.

        fairseq calls again with the same samples after an ``--amp`` overflow (and to locate a
        NaN): the cursor and carried state are rewound to where they were before the first call,
        so the state advances once per update slot however often it is retried. If the forward or
        backward pass raises (e.g. out of memory), they are rewound as well before re-raising.
        """
        core = _unwrap(model)
        call = (update_num, int(sample["slot"]))
        retry = call == self._last_call
        if retry:
            self._rewind()
        else:
            # K changes only between updates: never before the 2nd micro-batch of --update-freq
            first_of_update = self._last_call is None or self._last_call[0] != update_num
            if first_of_update and self._estimating and self.controller.is_due(update_num):
                self._estimate(core, update_num)
        self._last_call = call
        self._before_last_call = (
            copy.deepcopy(self.cursor),
            self._carried_state,
            self._estimator_carry,
            None if self.estimator is None else copy.deepcopy(self.estimator.state_dict()),
        )

        parameter = next(core.parameters())
        try:
            if self.estimator is None:
                batch = self._training_batch(sample, parameter.device, parameter.dtype)
                loss, sample_size, logging_output, carried_state = self._train_segment(
                    batch, model, criterion, optimizer, update_num, ignore_grad
                )
            else:
                batch = self._estimator_batch(sample, parameter.device, parameter.dtype)
                loss, sample_size, logging_output, carried_state = self._accumulate_segment(
                    batch, model, update_num, ignore_grad
                )
        except BaseException:
            self._rewind()
            raise
        self._carried_state = carried_state
        self._update_truncation_length = batch["truncation_length"]
        self._update_loss = (torch.as_tensor(loss).detach(), sample_size)  # training_diverged
        if call != self._counted_call:  # once per update slot, however often it is retried
            processed = batch["net_input"]["src_tokens"].numel()
            scored = batch["ntokens"]
            self.controller.record_tokens(budget_tokens(self.method, processed, scored))
            world_size = _world()[0]  # every worker runs as many tokens
            self.scored_tokens += scored * world_size
            self.processed_tokens += processed * world_size
            self._counted_call = call
            # this worker's tokens through the model in this update, its estimate included
            logging_output["processed_tokens"] = processed + self._pending_estimate_tokens
            self._pending_estimate_tokens = 0
        self._add_estimate_logs(logging_output)
        return loss, sample_size, logging_output

    def _rewind(self) -> None:
        """Back to the stream position, states and estimator RNG before this update's call."""
        cursor, carried_state, estimator_carry, estimator_state = self._before_last_call
        self.cursor = copy.deepcopy(cursor)
        self._carried_state = carried_state
        self._estimator_carry = estimator_carry
        if self.estimator is not None:
            self.estimator.load_state_dict(copy.deepcopy(estimator_state))

    def _estimator_batch(
        self, slot_sample: Dict[str, Any], device: torch.device, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """The next disjoint segment for --gradient-estimator (not tbptt), of the length the
        estimator asks for (ARTBP: random, mean K), and the carry it starts from."""
        inputs, targets = self._train_columns
        nominal = self._applied_truncation_length(self.cfg.truncation_length)
        length = self.estimator.segment_length(nominal)
        segment = plan_segment(self.cursor, length, "disjoint", inputs.size(1))
        carry = self._estimator_carry
        if segment.new_pass or carry is None:
            carry = None  # started on the model in _accumulate_segment
        else:  # a carry restored from a checkpoint lives on the CPU
            carry = carry.to(device, dtype)
        window = slice(segment.window_start, segment.window_end)
        src_tokens = inputs[:, window].to(device)  # B x L
        target = targets[:, window].to(device)  # B x L
        return {
            "id": slot_sample["id"],
            "net_input": {"src_tokens": src_tokens},
            "target": target,
            "carry": carry,
            "nsentences": src_tokens.size(0),
            "ntokens": target.numel(),
            "truncation_length": nominal,
        }

    def _accumulate_segment(self, batch, model, update_num: int, ignore_grad: bool):
        """Train one segment with the gradient estimator, which writes ``.grad`` itself.

        fairseq divides the gradient by the returned sample size (the segment's B x L target
        tokens); the estimator's normaliser K / L makes the step's gradient the summed
        cross-entropy's over B x K, as the driver's ``segment.accumulate`` does, so ARTBP's random
        lengths do not rescale the step. The loss in the logging output is summed, as the
        criterion's is, so fairseq's loss and ppl are per target token.
        """
        estimated = gradient_estimation_model(_unwrap(model))  # e.g. a wrapper's core model
        model.train()
        model.set_num_updates(update_num)
        src_tokens, target = batch["net_input"]["src_tokens"], batch["target"]
        carry = batch["carry"]
        if carry is None:
            carry = self.estimator.start(estimated, src_tokens.size(0))
        parameters = [p for p in _unwrap(model).parameters() if p.requires_grad]
        # a dummy batch's gradient must not count: keep the gradients only then (not every update)
        kept = (
            [None if p.grad is None else p.grad.clone() for p in parameters] if ignore_grad else []
        )
        normaliser = batch["truncation_length"] / src_tokens.size(1)
        with torch.autograd.profiler.record_function("estimator"):
            mean_loss, carry = self.estimator.accumulate(
                estimated, src_tokens, target, carry, normaliser
            )
        if ignore_grad:
            for parameter, grad in zip(parameters, kept):
                parameter.grad = grad
        self._estimator_carry = carry
        ntokens = batch["ntokens"]
        loss = torch.tensor(mean_loss * ntokens)
        logging_output = {
            "loss": loss,
            "ntokens": ntokens,
            "nsentences": batch["nsentences"],
            "sample_size": ntokens,
            "trunc_k": src_tokens.size(1),  # the segment's length (ARTBP: random)
            "tbptt_parts": 1,
        }
        return loss, ntokens, logging_output, task_layout(carry.state, estimated.state_batch_dim)

    @staticmethod
    def _train_segment(batch, model, criterion, optimizer, update_num: int, ignore_grad: bool):
        """``FairseqTask.train_step`` on one segment, through the criterion's forward that also
        returns the state to carry into the next segment (fairseq's criterion interface returns
        only the loss, sample size and logging output)."""
        forward = getattr(_unwrap(criterion), "forward_carrying_state", None)
        if forward is None:
            raise UserInputError(
                "adaptive_tbptt_lm trains with --criterion tbptt_cross_entropy, which hands it the "
                f"recurrent state to carry into the next update; {type(criterion).__name__} "
                "does not"
            )
        model.train()
        model.set_num_updates(update_num)
        with torch.autograd.profiler.record_function("forward"):
            with torch.amp.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output, carried_state = forward(model, batch)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        return loss, sample_size, logging_output, carried_state

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
            f"per token at K = {self._update_truncation_length} (perplexity overflows)"
        )

    def training_budget_reached(self) -> Optional[str]:
        """Which training budget is spent, in words for the log; None if none (same on every
        worker)."""
        if 0 < self.cfg.max_train_tokens <= self.scored_tokens:
            return (
                f"scored tokens: {self.scored_tokens:,} >= max_train_tokens: "
                f"{self.cfg.max_train_tokens:,}"
            )
        if 0 < self.cfg.max_processed_tokens <= self.processed_tokens:
            return (
                f"processed tokens: {self.processed_tokens:,} >= max_processed_tokens: "
                f"{self.cfg.max_processed_tokens:,}"
            )
        return None

    def processed_validation_due(self) -> bool:
        """Whether --validate-interval-processed-tokens asks for a validation after this update."""
        interval = self.cfg.validate_interval_processed_tokens
        return interval > 0 and self.processed_tokens // interval > self._processed_validations

    def processed_validation_done(self) -> None:
        interval = self.cfg.validate_interval_processed_tokens
        self._processed_validations = self.processed_tokens // interval

    @property
    def _estimating(self) -> bool:
        return self.controller.adaptive or self.cfg.monitor_bias

    def _lr_factor(self) -> float:
        """The paper's learning-rate scaling with K, relative to K0 or --lr-scaling-reference."""
        initial = self._applied_truncation_length(self.cfg.truncation_length)
        return lr_factor(self.method, self._update_truncation_length, initial)

    def optimizer_step(self, optimizer, model, update_num) -> None:
        """Clip at --truncation-clip-norm / K and step at the scheduler's lr times factor(K).

        The factor is applied only for the step itself, so the lr the scheduler reads back (and
        fairseq logs and checkpoints) stays unscaled: a reduce-on-plateau shrink is never applied
        to an lr that already carries the factor.
        """
        if self.cfg.truncation_clip_norm > 0:
            threshold = self.cfg.truncation_clip_norm / self._update_truncation_length
            optimizer.clip_grad_norm(threshold)
            metrics.log_scalar("clip_at", threshold, weight=0)
        with scaled_learning_rate(optimizer.param_groups, self._lr_factor()):
            optimizer.step()

    # ------------------------------------------------------------------------- estimation

    def _check_estimate_fits(self, stream: SplitStream) -> None:
        """Fail at start-up, not at the first estimate, if no estimate window fits in the split."""
        inputs, _ = aligned_stream(stream.tokens, stream.targets)
        length = self.controller.burnin + self.controller.measured_steps
        if inputs.numel() < length + 1:
            raise UserInputError(
                f"the training split {stream.name} has {inputs.numel()} tokens, fewer than the "
                f"burn-in plus estimate window ({length}); lower --estimate-window (and "
                "--max-truncation-length) or --estimate-burnin, or use more data"
            )

    def _estimate(self, model: torch.nn.Module, update_num: int) -> None:
        stream = self._train_stream
        self._check_estimate_fits(stream)
        world_size, rank = _world()
        columns = 0 if self._train_columns is None else self._train_columns[0].size(0)

        def average_over_workers(tensors: List[Tensor]) -> None:
            if world_size > 1:  # every worker then decides the same K
                group = distributed_utils.get_data_parallel_group()
                for tensor in tensors:
                    distributed_utils.all_reduce(tensor, group=group)
                    tensor.div_(world_size)

        decision = estimate_truncation(
            self.controller,
            model,
            aligned_stream(stream.tokens, stream.targets),
            self.cfg.seed,
            update_num,
            rank=rank,
            average=average_over_workers,
            update_columns=columns * world_size,
            workers=world_size,
        )
        self._pending_estimate_seconds += decision.seconds
        if self.controller.adaptive:  # a fixed K's monitoring is an observer, not its compute
            self.processed_tokens += self.controller.estimate_tokens * world_size
            self._pending_estimate_tokens += self.controller.estimate_tokens
        logger.info(
            f"update {update_num}: K = {decision.truncation_length} "
            f"(bias_hat {decision.relative_bias:.4g}, beta_hat {decision.decay_rate:.4g}, "
            f"{decision.seconds:.2f}s): {decision.reason}"
        )
        # the same decision as a structured record, which sweeps and the demo read
        record = {"update": update_num, **dataclasses.asdict(decision)}
        logger.info(f"{DECISION_RECORD} {json.dumps(record)}")

    def _add_estimate_logs(self, logging_output: Dict[str, Any]) -> None:
        """Identical on every worker and micro-batch: the reduction divides by ``tbptt_parts``."""
        decision = self.controller.last_decision
        if decision is not None:
            logging_output["bias_hat"] = decision.relative_bias
            logging_output["beta_hat"] = decision.decay_rate
        if self._estimating:
            world_size, _ = _world()
            logging_output["est_sec"] = self._pending_estimate_seconds / world_size
            self._pending_estimate_seconds = 0.0
        if self.cfg.lr_scaling != "none":
            logging_output["lr_scale"] = self._lr_factor()

    def reduce_metrics(self, logging_outputs, criterion) -> None:
        super().reduce_metrics(logging_outputs, criterion)
        parts = sum(log.get("tbptt_parts", 0) for log in logging_outputs)
        if parts == 0:
            return
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

    def gather_checkpoint_state(self) -> None:
        """Collect every rank's carried state before rank 0 writes a checkpoint.

        Called on every rank by the plugin's wrapper of ``checkpoint_utils.save_checkpoint`` (see
        :mod:`atbptt_fairseq.fairseq_fixes.checkpoint_guard`); fairseq asks only rank 0 for
        :meth:`get_checkpoint_dict`. The checkpoint then holds the state of all columns in the
        global layout (columns x layers x hidden), which each rank slices again on resume.
        """
        world_size, _ = _world()
        self._gathered_state = None
        if world_size == 1 or self._carried_state is None:
            return  # the cursor, and so a None state, is the same on every rank
        group = distributed_utils.get_data_parallel_group()
        gathered = [
            torch.cat(distributed_utils.all_gather(tensor.detach().contiguous(), group), dim=1)
            for tensor in self._carried_state
        ]
        self._gathered_state = (self.cursor.state_dict(), gathered)

    def get_checkpoint_dict(self) -> Dict[str, Any]:
        state = None
        world_size, _ = _world()
        if world_size == 1:
            if self._carried_state is not None:
                state = [tensor.detach().cpu() for tensor in self._carried_state]
        elif (
            self._gathered_state is not None and self._gathered_state[0] == self.cursor.state_dict()
        ):
            state = [tensor.cpu() for tensor in self._gathered_state[1]]
        elif self._carried_state is not None:
            logger.warning(
                "no carried state in this checkpoint: it was not gathered from all ranks"
            )
        return {
            type(self).__name__: {
                "cursor": self.cursor.state_dict(),
                "carried_state": state,
                "train_shard": self._train_shard,
                "controller": self.controller.state_dict(),
                "scored_tokens": self.scored_tokens,
                "processed_tokens": self.processed_tokens,
                "processed_validations": self._processed_validations,
                "dictionary": dictionary_identity(self.dictionary),
                "method": dataclasses.asdict(self.method),  # compared on resume
                **self._estimator_checkpoint(),
            }
        }

    def _estimator_checkpoint(self) -> Dict[str, Any]:
        """--gradient-estimator (not tbptt): its name, RNG and carry, sensitivities included."""
        if self.estimator is None:
            return {}
        carry = self._estimator_carry
        return {
            "gradient_estimator": {
                "name": self.estimator.name,
                "state": self.estimator.state_dict(),
                "carry": None if carry is None else carry.state_dict(),
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
            self.check_checkpoint_targets(state_dict.pop("target_dir"))
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
        if trained["sha256"] != own["sha256"]:
            raise UserInputError(
                f"the checkpoint was trained with a dictionary of {trained.get('types', '?')} "
                f"types (sha256 {trained['sha256'][:12]}), not this data directory's {dict_path} "
                f"({own['types']} types, sha256 {own['sha256'][:12]}): evaluate or resume with "
                "the data directory (dict.txt) it was trained on, or binarize your text with "
                "fairseq-preprocess --srcdict <that dict.txt>"
            )

    def _restore_estimator(self, saved: Optional[Dict[str, Any]]) -> None:
        """Restore the estimator's RNG and carry; a carry that does not continue the restored
        stream (a new pass or shard: no carried state) or another method's is dropped."""
        self._estimator_carry = None
        if self.estimator is None:
            return
        if saved is None or saved.get("name") != self.estimator.name:
            logger.warning(
                f"the checkpoint holds no {self.estimator.name} state (it was trained with "
                f"another --gradient-estimator): the estimator starts afresh at a new pass"
            )
            self.cursor = StreamCursor(passes=self.cursor.passes + 1)
            self._carried_state = None
            return
        self.estimator.load_state_dict(saved["state"])
        if saved.get("carry") is not None and self._carried_state is not None:
            self._estimator_carry = Carry.from_state_dict(saved["carry"])

    def _check_resumed_options(self, saved: Optional[Dict[str, Any]]) -> None:
        """Say in one line which method options differ from the checkpoint's; refuse those that
        would give the carried state another meaning (checkpoints before this check: none)."""
        changes = resume_changes(saved, self.method)
        without_effect = options_without_effect(self.cfg)  # e.g. the style of --gradient-estimator
        breaking = [
            change
            for change in changes
            if change[0] in RESUME_BREAKING_OPTIONS and change[0] not in without_effect
        ]
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
        columns = self._train_columns[0].size(0) if self._train_columns is not None else None
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
            self.cursor = StreamCursor(passes=cursor.passes + 1)
            self._carried_state = None
        elif saved_shard is not None and self._train_shard not in (None, saved_shard):
            self.cursor = StreamCursor(passes=cursor.passes)
            self._carried_state = None
        else:
            self.cursor = cursor
            self._carried_state = None
            if carried is not None:
                rows = slice(rank * columns, (rank + 1) * columns) if columns else slice(None)
                self._carried_state = tuple(tensor[:, rows].contiguous() for tensor in carried)
            if saved_shard is not None:
                self._train_shard = saved_shard
        self._last_call = self._before_last_call = None
        self._restore_estimator(state.get("gradient_estimator"))
        self.controller.load_state_dict(state["controller"])
        self.scored_tokens = int(state.get("scored_tokens", 0))
        # checkpoints before the processed-token budget: estimates not counted, windows are
        self.processed_tokens = int(state.get("processed_tokens", 0))
        self._processed_validations = int(state.get("processed_validations", 0))
        # lr_base / lr_set of older checkpoints are ignored: the lr in the optimizer is unscaled


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


ESTIMATORS = {"artbp": Artbp, "uoro": Uoro, "kf-rtrl": KfRtrl, "exact-rtrl": ExactRtrl}
# the core model class the methods built for one recurrence need (docs/alternatives.md says why)
ESTIMATOR_MODELS = {"kf-rtrl": TanhRnn, "exact-rtrl": ElementwiseLstm}


def build_gradient_estimator(cfg: AdaptiveTbpttLmConfig) -> Optional[GradientEstimator]:
    """The estimator of --gradient-estimator, seeded with --seed; None for the task's TBPTT."""
    method = getattr(cfg, "gradient_estimator", "tbptt")
    seed = cfg.seed if isinstance(cfg.seed, int) else 0
    estimator = ESTIMATORS.get(method)
    return None if estimator is None else estimator(seed=seed)


def gradient_estimation_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module --gradient-estimator trains: the one the model hands over with
    ``gradient_estimation_model()`` (the one-hot models' core ``TanhRnn`` / ``ElementwiseLstm``,
    whose parameters are the model's), else the model itself."""
    handed_over = getattr(model, "gradient_estimation_model", None)
    return model if handed_over is None else handed_over()


def task_layout(state: State, batch_dim: int) -> Tuple[Tensor, ...]:
    """A state with its batch along dim 1, the layout in which the task carries and checkpoints
    states (``nn.LSTM``'s layers x B x H): a batch-first state, such as a core model's B x H,
    gets a leading dim of 1, the 1 x B x H its fairseq wrapper shows."""
    if batch_dim == 1:
        return tuple(state)
    return tuple(tensor.movedim(batch_dim, 0).unsqueeze(0) for tensor in state)


def architectures_around(core_class: type) -> List[str]:
    """The --arch names of the fairseq models that wrap a ``core_class`` model (``core_class``
    attribute, as the one-hot models of ``atbptt_fairseq.models`` have)."""
    return sorted(
        name
        for name, model in ARCH_MODEL_REGISTRY.items()
        if issubclass(getattr(model, "core_class", type(None)), core_class)
    )


def check_estimator_model(cfg: AdaptiveTbpttLmConfig, model: torch.nn.Module) -> None:
    """Refuse a model that --gradient-estimator cannot train (KF-RTRL and exact RTRL are built
    for one recurrence each), naming the architectures that work."""
    method = getattr(cfg, "gradient_estimator", "tbptt")
    required = ESTIMATOR_MODELS.get(method)
    if required is None or isinstance(gradient_estimation_model(model), required):
        return
    raise UserInputError(
        f"--gradient-estimator {method} trains only models around atbptt.estimators."
        f"{required.__name__} (--arch {', '.join(architectures_around(required))}; "
        f"docs/alternatives.md says why), not {type(model).__name__}"
    )
