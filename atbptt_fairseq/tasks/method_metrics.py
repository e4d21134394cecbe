"""The method's figures in fairseq's metrics (the loop's records, reduced over workers), and the
task's records in ``atbptt_metrics.jsonl`` (:class:`RunRecords`)."""

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import metrics
from fairseq.distributed import utils as distributed_utils
from fairseq.logging.meters import AverageMeter
from torch import Tensor

from atbptt import TbpttLoop
from atbptt.records import MetricsFile, valid_record
from atbptt_fairseq.tasks.workers import world

# fairseq-train's aggregator of a whole epoch (its "train" log line)
EPOCH_AGGREGATOR = "train"


def reduce_method_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
    """Log the method's figures of an update's logging outputs (identical on every worker and
    micro-batch, counted by ``tbptt_parts``): ``trunc_k`` (a mean over the updates of the log
    interval) and ``trunc_k_last`` (the last update's), the estimate's ``bias_hat``/``beta_hat``,
    ``lr_scale``, processed tokens per batch (``ppb``) and estimate seconds (``est_sec``)."""
    parts = sum(log.get("tbptt_parts", 0) for log in logging_outputs)
    if parts == 0:
        return
    trunc_k = sum(log.get("trunc_k", 0) for log in logging_outputs) / parts
    metrics.log_scalar("trunc_k", trunc_k, weight=1, round=1)
    log_epoch_last("trunc_k_last", trunc_k, round=1)
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


def log_epoch_last(key: str, value: float, round: int) -> None:
    """Log ``value`` as the epoch's last value of ``key``: in the epoch's line only (a
    train_inner line's K is its interval's mean, ``trunc_k``), weight 0, so the meter shows the
    last update's value rather than a mean."""
    meters = metrics.get_meters(EPOCH_AGGREGATOR)
    if meters is None:
        return
    if key not in meters:
        meters.add_meter(key, AverageMeter(round=round), priority=50)
    meters[key].update(value, 0)


class RunRecords:
    """The records a fairseq-train run writes to its metrics file (``None``: not this rank, or no
    save dir), with the run's wall clock: fairseq's ``wall`` meter, which restarts at 0 on a
    resume, plus the wall at the checkpoint resumed from."""

    def __init__(self, metrics_file: Optional[MetricsFile], valid_subsets: Any) -> None:
        self.metrics_file = metrics_file
        # fairseq validates its --valid-subset splits in this order, once per validation
        self.valid_subsets = str(valid_subsets).split(",")
        self.wall_before = 0.0  # of the attempts before the checkpoint resumed from
        self._validated: Tuple[int, int] = (-1, 0)  # (update, splits validated there)
        self._held: Optional[Dict[str, Any]] = None  # an update record awaiting its loss

    def wall(self) -> float:
        """Seconds of training so far (NaN outside fairseq-train, which starts the meter)."""
        meter = metrics.get_meter("default", "wall")
        return math.nan if meter is None else self.wall_before + meter.elapsed_time

    def write(self, *records: Dict[str, Any]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(*records)

    def hold_update(self, record: Dict[str, Any]) -> None:
        """An update's record, written with its loss by :meth:`write_update` (a record still held
        then is written first, without one)."""
        self.write_update()
        self._held = record

    def write_update(self, loss: Optional[float] = None) -> None:
        """Write the held update record with the run's wall clock and the update's training
        ``loss`` in bits per token (as fairseq logs it)."""
        if self._held is not None:
            loss_field = {} if loss is None else {"loss": loss}
            self.write({**self._held, **loss_field, "wall": self.wall()})
            self._held = None

    def validation(self, stats: Dict[str, Any], aggregate, loop: TbpttLoop) -> None:
        """Record a validation whose fairseq ``stats`` and meters are given, naming its split by
        its place among this update's validations."""
        update = int(stats["num_updates"])
        index = self._validated[1] if self._validated[0] == update else 0
        self._validated = (update, index + 1)
        subset = self.valid_subsets[index] if index < len(self.valid_subsets) else f"valid{index}"
        loss = aggregate["loss"].avg if "loss" in aggregate else float(stats["loss"])
        self.write(
            valid_record(
                update, subset, float(loss), loop.processed_tokens, loop.scored_tokens, self.wall()
            )
        )

    def resume(self, state: Dict[str, Any]) -> None:
        """Go on from a checkpoint's task state: its wall clock, and its update's records kept."""
        self.wall_before = float(state.get("wall", 0.0))
        if "num_updates" in state and self.metrics_file is not None:
            self.metrics_file.resume_at(int(state["num_updates"]))


class UpdateLoss:
    """An update's training loss over its micro-batches (--update-freq; a retried one counted
    once), summed over the workers when taken: the loss fairseq logs for the update."""

    def __init__(self) -> None:
        self.update = -1
        self.parts: Dict[int, Tuple[Tensor, int]] = {}  # slot: (summed loss in nats, tokens)

    def add(self, update: int, slot: int, loss: Tensor, tokens: int) -> None:
        if update != self.update:
            self.update, self.parts = update, {}
        self.parts[slot] = (loss.detach().float().reshape(()), tokens)

    def take_bits_per_token(self) -> Optional[float]:
        """The update's loss in bits per token over all workers (inf for NaN), forgotten then;
        None if none was added since. One all-reduce and one sync: call it on every worker."""
        if not self.parts:
            return None
        loss = torch.stack([part[0] for part in self.parts.values()]).sum()
        tokens = float(sum(part[1] for part in self.parts.values()))
        self.parts = {}
        totals = torch.stack([loss, torch.tensor(tokens, device=loss.device)])
        if world()[0] > 1:
            group = distributed_utils.get_data_parallel_group()
            totals = distributed_utils.all_reduce(totals, group)
        loss_sum, token_count = totals.tolist()
        bits = loss_sum / max(token_count, 1.0) / math.log(2)
        return math.inf if math.isnan(bits) else bits
