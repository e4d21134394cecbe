"""The ``adaptive_tbptt_lm`` task: stateful truncated BPTT over a token stream, with K chosen by
the paper's bias estimator when ``--target-bias`` is set.

Batches are built lazily. A fairseq epoch is a fixed number of update slots (one pass over the data
at K0 by default); each slot is turned into a real segment inside ``train_step`` from the task's
stream cursor and the K in force at that update. K can therefore change at any update, the update
count per epoch never depends on K, and resuming only needs the cursor, the carried state and the
controller, which travel in the checkpoint.
"""

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq import metrics, utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, iterators
from fairseq.data.indexed_dataset import MMapIndexedDataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.distributed import utils as distributed_utils
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II
from torch import Tensor

from atbptt_fairseq.tasks.token_stream import (
    StreamCursor,
    StreamTooShortError,
    aligned_stream,
    lay_out_columns,
    plan_segment,
)
from atbptt_fairseq.truncation import (
    GradientProfile,
    TruncationController,
    TruncationDecision,
    measure_gradient_profile,
    sample_windows,
)

logger = logging.getLogger(__name__)

TBPTT_STYLE_CHOICES = ChoiceEnum(["overlap", "disjoint"])
LR_SCALING_CHOICES = ChoiceEnum(["none", "sqrt", "linear"])
CUMULATIVE_NORM_CHOICES = ChoiceEnum(["approx", "exact"])


@dataclass
class AdaptiveTbpttLmConfig(FairseqDataclass):
    data: Optional[str] = field(
        default=None,
        metadata={
            "help": "path to fairseq-preprocess --only-source output; colon-separated shards are "
            "used in turn, one per epoch, as fairseq's language_modeling task does"
        },
    )
    target_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "subdirectory of the data path holding a token-aligned target stream (same "
            "dict.txt), for tasks such as the copy task; unset: the target is the next token"
        },
    )
    truncation_length: int = field(
        default=35,
        metadata={"help": "truncation length K: fixed K, or the initial K0 when --target-bias is set"},
    )
    tbptt_style: TBPTT_STYLE_CHOICES = field(
        default="overlap",
        metadata={
            "help": "overlap: window 2K-1 from the carried state, loss on the last K positions, "
            "stride K (the paper's); disjoint: window K, loss on all K, stride K"
        },
    )
    updates_per_epoch: int = field(
        default=0,
        metadata={
            "help": "update slots in one fairseq epoch; 0: one pass over the training columns at "
            "K0. The stream position carries across epochs and wraps with a state reset"
        },
    )
    eval_chunk_length: int = field(
        default=100, metadata={"help": "tokens per column per evaluation batch"}
    )
    eval_batch_size: int = field(
        default=1,
        metadata={
            "help": "evaluation columns per worker; 1 scores the split in one stateful pass from "
            "a zero state (exact), more columns are faster but each column starts from zero"
        },
    )
    target_bias: Optional[float] = field(
        default=None,
        metadata={
            "help": "tolerable relative gradient bias delta in (0, 1); K adapts to keep the "
            "estimated bias below it. Unset: K stays fixed at --truncation-length"
        },
    )
    min_truncation_length: int = field(
        default=10, metadata={"help": "smallest K the adaptive rule may choose (K_min)"}
    )
    max_truncation_length: int = field(
        default=300, metadata={"help": "largest K the adaptive rule may choose (K_max)"}
    )
    estimate_window: int = field(
        default=400,
        metadata={"help": "lags W over which state-gradient norms are measured (>= K_max)"},
    )
    estimate_burnin: int = field(
        default=-1,
        metadata={"help": "steps run without gradient before the window; -1: W // 10"},
    )
    estimate_sequences: int = field(
        default=32, metadata={"help": "sequences S drawn from the training stream per estimate"}
    )
    estimate_repeats: int = field(
        default=5, metadata={"help": "estimates R averaged into one choice of K"}
    )
    estimate_interval: int = field(
        default=100,
        metadata={"help": "re-estimate K every this many updates (a count of updates, not time)"},
    )
    estimate_cumulative: CUMULATIVE_NORM_CHOICES = field(
        default="approx",
        metadata={
            "help": "full-gradient norm lower bound: approx sums per-lag norms (the paper's "
            "choice for language models), exact takes the norm of the summed gradients"
        },
    )
    monitor_bias: bool = field(
        default=False,
        metadata={
            "help": "with a fixed K, still estimate and log the relative bias at K on the "
            "--estimate-interval schedule"
        },
    )
    lr_scaling: LR_SCALING_CHOICES = field(
        default="none",
        metadata={"help": "scale the learning rate with K relative to K0: none, sqrt or linear"},
    )
    seed: int = II("common.seed")
    train_subset: str = II("dataset.train_subset")


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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


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
        adaptive = cfg.target_bias is not None
        window = cfg.estimate_window if adaptive else max(cfg.estimate_window, cfg.truncation_length)
        self.controller = TruncationController(
            initial_length=cfg.truncation_length,
            # a fixed K is not bound by the adaptive range
            min_length=cfg.min_truncation_length if adaptive else cfg.truncation_length,
            max_length=cfg.max_truncation_length if adaptive else cfg.truncation_length,
            target_bias=cfg.target_bias,
            window=window,
            burnin=cfg.estimate_burnin if cfg.estimate_burnin >= 0 else window // 10,
            num_sequences=cfg.estimate_sequences,
            num_estimates=cfg.estimate_repeats,
            interval=cfg.estimate_interval,
            cumulative=cfg.estimate_cumulative,
        )
        self.cursor = StreamCursor()
        self._carried_state: Optional[Tuple[Tensor, Tensor]] = None
        self._train_columns: Optional[Tuple[Tensor, Tensor]] = None
        self._train_stream: Optional[SplitStream] = None
        self._train_shard: Optional[int] = None
        self._last_call: Optional[Tuple[int, int]] = None
        self._before_last_call: Optional[Tuple[StreamCursor, Any]] = None
        self._pending_estimate_seconds = 0.0
        self._lr_base: Optional[float] = None
        self._lr_set: Optional[float] = None

    # ----------------------------------------------------------------------------- set-up

    @classmethod
    def setup_task(cls, cfg: AdaptiveTbpttLmConfig, **kwargs) -> "AdaptiveTbpttLmTask":
        paths = utils.split_paths(cfg.data or "")
        if not paths or not paths[0]:
            raise ValueError("no data directory given; pass the fairseq-preprocess output directory")
        for path in paths:
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"data directory {path} does not exist; run fairseq-preprocess --only-source first"
                )
        dict_path = os.path.join(paths[0], "dict.txt")
        if not os.path.isfile(dict_path):
            raise FileNotFoundError(
                f"{dict_path} is missing; the data directory must be fairseq-preprocess output"
            )
        dictionary = Dictionary.load(dict_path)
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

    def _read_stream(self, split_path: str, combine: bool) -> Tensor:
        data = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if data is None:
            raise FileNotFoundError(f"split {split_path}.bin/.idx not found")
        if isinstance(data, MMapIndexedDataset):
            buffer = np.frombuffer(data._bin_buffer, dtype=data._index.dtype)
            tokens = torch.from_numpy(buffer.astype(np.int64))
        else:
            pieces = [data[i].long() for i in range(len(data))]
            tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        if tokens.numel() and int(tokens.max()) >= len(self.dictionary):
            raise ValueError(
                f"{split_path} holds token ids up to {int(tokens.max())} but dict.txt has "
                f"{len(self.dictionary)} entries; binarize it with this dictionary"
            )
        return tokens

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)]
        tokens = self._read_stream(os.path.join(data_path, split), combine)
        targets = None
        if self.cfg.target_dir:
            targets = self._read_stream(os.path.join(data_path, self.cfg.target_dir, split), combine)
            if targets.numel() != tokens.numel():
                raise ValueError(
                    f"{split}: the target stream has {targets.numel()} tokens, the input stream "
                    f"{tokens.numel()}; binarize token-aligned inputs and targets"
                )
        if tokens.numel() < 2:
            raise ValueError(f"split {split} in {data_path} is empty; give it some text")
        self.datasets[split] = SplitStream(name=f"{data_path}:{split}", tokens=tokens, targets=targets)
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
            raise ValueError("--batch-size (columns per worker) is required; --max-tokens is not used")
        try:
            inputs, targets = lay_out_columns(
                stream.tokens, batch_size * num_shards, stream.targets, shard_id, num_shards
            )
        except StreamTooShortError as error:
            raise ValueError(f"training split: {error}") from None
        self._train_columns = (inputs, targets)
        slots = self.cfg.updates_per_epoch or math.ceil(inputs.size(1) / self.cfg.truncation_length)
        logger.info(
            f"training columns: {batch_size} x {inputs.size(1):,} tokens per worker, "
            f"{slots} update slots per epoch"
        )
        return [{"id": torch.tensor([i]), "slot": i, "nsentences": batch_size} for i in range(slots)]

    def _evaluation_chunks(self, stream: SplitStream, num_shards: int, shard_id: int):
        columns = self.cfg.eval_batch_size
        try:
            inputs, targets = lay_out_columns(
                stream.tokens, columns * num_shards, stream.targets, shard_id, num_shards
            )
        except StreamTooShortError as error:
            raise ValueError(f"evaluation split {stream.name}: {error}") from None
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

    def eval_lm_dataloader(self, dataset, num_shards: int = 1, shard_id: int = 0, **unused):
        """``fairseq-eval-lm``: the same stateful pass as validation (``--eval-batch-size`` columns)."""
        return self.get_batch_iterator(
            dataset, num_shards=num_shards, shard_id=shard_id
        ).next_epoch_itr(shuffle=False)

    def build_model(self, cfg, from_checkpoint: bool = False):
        model = super().build_model(cfg, from_checkpoint)
        for required in ("zero_state", "step"):
            if not hasattr(model, required):
                raise ValueError(
                    f"adaptive_tbptt_lm needs a stateful model such as --arch tbptt_lstm_lm_ptb; "
                    f"{type(model).__name__} has no {required}()"
                )
        return model

    # --------------------------------------------------------------------------- training

    def _training_batch(self, slot_sample: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
        """Turn an update slot into the next segment of the stream at the current K."""
        inputs, targets = self._train_columns
        truncation_length = self.controller.truncation_length
        segment = plan_segment(self.cursor, truncation_length, self.cfg.tbptt_style, inputs.size(1))
        if segment.new_pass:
            self._carried_state = None
        state = self._carried_state
        if state is not None and state[0].device != device:
            state = tuple(tensor.to(device) for tensor in state)
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

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        core = _unwrap(model)
        call = (update_num, int(sample["slot"]))
        if call == self._last_call:
            # fairseq retries the same samples after an fp16/amp overflow or an OOM: rewind
            self.cursor, self._carried_state = copy.deepcopy(self._before_last_call[0]), self._before_last_call[1]
        else:
            if self._estimating and self.controller.is_due(update_num):
                self._estimate(core, update_num)
            self._scale_learning_rate(optimizer)
        self._last_call = call
        self._before_last_call = (copy.deepcopy(self.cursor), self._carried_state)

        device = next(core.parameters()).device
        batch = self._training_batch(sample, device)
        loss, sample_size, logging_output = super().train_step(
            batch, model, criterion, optimizer, update_num, ignore_grad
        )
        self._carried_state = batch.get("carried_state")
        self._add_estimate_logs(logging_output)
        return loss, sample_size, logging_output

    @property
    def _estimating(self) -> bool:
        return self.controller.adaptive or self.cfg.monitor_bias

    def _lr_factor(self) -> float:
        """The paper's learning-rate scaling with K, relative to K0."""
        ratio = self.controller.truncation_length / self.cfg.truncation_length
        return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.cfg.lr_scaling]

    def _scale_learning_rate(self, optimizer) -> None:
        if self.cfg.lr_scaling == "none":
            return
        factor = self._lr_factor()
        current = optimizer.get_lr()
        if self._lr_set is None or current != self._lr_set:
            self._lr_base = current  # the scheduler set a new base learning rate
        self._lr_set = self._lr_base * factor
        optimizer.set_lr(self._lr_set)

    # ------------------------------------------------------------------------- estimation

    def _estimate(self, model: torch.nn.Module, update_num: int) -> None:
        stream = self._train_stream
        inputs, targets = aligned_stream(stream.tokens, stream.targets)
        world_size, rank = _world()
        burnin = self.controller.burnin
        length = burnin + self.controller.window
        if inputs.numel() < length + 1:
            raise ValueError(
                f"the training split has {inputs.numel()} tokens, fewer than the burn-in plus "
                f"estimate window ({length}); lower --estimate-window"
            )
        estimator = model
        if any(p.dtype != torch.float32 for p in model.parameters()):
            estimator = copy.deepcopy(model).float()  # the estimate always runs in fp32
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(
            (self.cfg.seed * 1_000_003 + update_num) * 1009 + rank
        )
        was_training = estimator.training
        estimator.eval()

        def measure() -> GradientProfile:
            windows, final_targets = sample_windows(
                inputs, targets, self.controller.num_sequences, length, generator
            )
            windows, final_targets = windows.to(device), final_targets.to(device)
            state = estimator.zero_state(windows.size(0))
            if burnin > 0:
                with torch.no_grad():  # the fused LSTM runs the burn-in
                    _, extra = estimator(windows[:, :burnin], state=state, output_start=burnin)
                state = extra["state"]
            profile = measure_gradient_profile(
                estimator.step, state, windows[:, burnin:], final_targets, burnin=0, batch_dim=1
            )
            if world_size > 1:
                group = distributed_utils.get_data_parallel_group()
                for tensor in (profile.norms, profile.mean_gradients):
                    distributed_utils.all_reduce(tensor, group=group)
                    tensor.div_(world_size)
            return profile

        try:
            decision = self.controller.estimate(measure, update_num)
        finally:
            estimator.train(was_training)
        self._pending_estimate_seconds += decision.seconds
        logger.info(
            f"update {update_num}: K = {decision.truncation_length} "
            f"(bias_hat {decision.relative_bias:.4g}, beta_hat {decision.decay_rate:.4g}, "
            f"{decision.seconds:.2f}s)"
        )

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
                metrics.log_scalar(key, value, round=4)
        if any("lr_scale" in log for log in logging_outputs):
            value = sum(log.get("lr_scale", 0.0) for log in logging_outputs) / parts
            metrics.log_scalar("lr_scale", value, round=3)
        if any("est_sec" in log for log in logging_outputs):
            seconds = sum(log.get("est_sec", 0.0) for log in logging_outputs)
            metrics.log_scalar_sum("est_sec", seconds, round=2)

    # ------------------------------------------------------------------------- evaluation

    def begin_valid_epoch(self, epoch: int, model) -> None:
        _unwrap(model).reset_streams()

    # ------------------------------------------------------------------------ checkpoints

    def get_checkpoint_dict(self) -> Dict[str, Any]:
        state = None
        if self._carried_state is not None:
            state = [tensor.detach().cpu() for tensor in self._carried_state]
        return {
            type(self).__name__: {
                "cursor": self.cursor.state_dict(),
                "carried_state": state,
                "train_shard": self._train_shard,
                "controller": self.controller.state_dict(),
                "lr_base": self._lr_base,
                "lr_set": self._lr_set,
            }
        }

    def set_checkpoint_dict(self, state: Dict[str, Any]) -> None:
        self.cursor = StreamCursor.from_state_dict(state["cursor"])
        carried = state.get("carried_state")
        self._carried_state = tuple(carried) if carried is not None else None
        self._train_shard = state.get("train_shard", self._train_shard)
        self.controller.load_state_dict(state["controller"])
        self._lr_base, self._lr_set = state.get("lr_base"), state.get("lr_set")
