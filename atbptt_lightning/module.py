"""A LightningModule that trains a stateful recurrent model by (adaptive) TBPTT.

Manual optimization: every training step asks the driver for the next segment at the K in force
(the estimate runs inside that call when it is due), runs it from the carried state and steps the
optimizer. The driver's state (stream position, carried state, controller) travels in Lightning's
checkpoints, so a resumed fit continues exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import lightning
from torch import Tensor, nn

from atbptt import TbpttDriver, TrainingSegment
from atbptt.records import MetricsFile

CHECKPOINT_KEY = "atbptt_driver"
# the figures of an update's record logged besides trunc_k (atbptt.records)
LOGGED_FIGURES = ("bias_hat", "beta_hat", "lr_scale", "clip_at", "processed_tokens", "est_sec")


class SegmentSlots:
    """The training "data loader": one item per update of an epoch, the slot's index.

    The segments themselves are built inside ``training_step``, at the K in force then: Lightning
    fetches batches ahead of the step that would change K or carry the state. Stateful for
    Lightning (empty state), because the data position lives in the driver and its checkpoint.
    """

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class TbpttModule(lightning.LightningModule):
    """Trains ``model`` (an :class:`atbptt.RecurrentModel`) on the driver's token stream.

    Subclass it and define ``configure_optimizers`` (one optimizer; step any scheduler yourself,
    e.g. in ``on_train_epoch_end``). With ``lr_scaling`` in the driver's config the optimizer's
    lr is scaled with K inside each step. ``clip_norm`` and ``clip_algorithm`` are Lightning's
    ``gradient_clip_val`` and ``gradient_clip_algorithm`` ("norm" or "value"), applied before each
    step through Lightning's ``clip_gradients``: Lightning refuses the ``Trainer`` options under
    manual optimization, which the carried state needs (docs/front_ends.md). The module makes
    its own training data: ``fit(module, train_dataloaders=...)`` (or a datamodule's
    ``train_dataloader``) is refused. Logs ``train_loss`` and the figures of the loop's update
    record (``trunc_k``; once K has been estimated, ``bias_hat`` and ``beta_hat``; ...), and
    writes the records to ``atbptt_metrics.jsonl`` in the trainer's log dir. One process only.
    Give the ``Trainer`` ``plugins=[SafeCheckpointIO()]`` so that a resume verifies its file.
    """

    def __init__(
        self,
        model: nn.Module,
        driver: TbpttDriver,
        clip_norm: float | None = None,
        clip_algorithm: str = "norm",
    ) -> None:
        super().__init__()
        if clip_algorithm not in ("norm", "value"):
            raise ValueError(f"clip_algorithm must be 'norm' or 'value', not {clip_algorithm!r}")
        self.automatic_optimization = False
        self.model = model
        self.tbptt = driver
        self.clip_norm = clip_norm
        self.clip_algorithm = clip_algorithm
        self._metrics: MetricsFile | None = None

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise RuntimeError(
                "TbpttModule trains in one process (the driver does not split its columns over "
                f"ranks); got world size {self.trainer.world_size}: use devices=1"
            )

    def train_dataloader(self) -> SegmentSlots:
        return SegmentSlots(self.tbptt.segments_per_epoch)

    def on_train_start(self) -> None:
        loader = self.trainer.train_dataloader
        if not isinstance(loader, SegmentSlots):
            raise ValueError(
                "TbpttModule makes its own training data (the driver's token stream, one slot "
                f"per update) but fit() was given {type(loader).__name__}: call "
                "trainer.fit(module) without train_dataloaders (a datamodule may give "
                "val_dataloader only)"
            )
        self.tbptt.attach_optimizer(self._optimizer().optimizer)
        log_dir = self.trainer.log_dir
        if log_dir is not None and self.trainer.is_global_zero:
            self._metrics = MetricsFile(log_dir)
            self._metrics.resume_at(self.tbptt.num_updates)  # a resumed fit writes them again

    def training_step(self, batch: int, batch_idx: int) -> Tensor:
        optimizer = self._optimizer()
        segment = self.tbptt.next_segment(self.model)
        loss = segment.loss(self.model)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.clip_norm is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.clip_norm,
                gradient_clip_algorithm=self.clip_algorithm,
            )
        optimizer.step()
        self._log_segment(loss.detach(), segment)
        return loss.detach()

    def _optimizer(self) -> Any:
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise TypeError(
                f"TbpttModule steps one optimizer; configure_optimizers returned {len(optimizer)}"
            )
        return optimizer

    def _log_segment(self, loss: Tensor, segment: TrainingSegment) -> None:
        """``self.log`` the loss and the update's record; the records also go to
        ``atbptt_metrics.jsonl`` in the trainer's log dir."""
        options = {"on_step": True, "on_epoch": False, "batch_size": segment.inputs.size(0)}
        self.log("train_loss", loss, prog_bar=True, **options)
        update = segment.records[-1]
        for key in ("trunc_k", *LOGGED_FIGURES):
            if key in update:
                self.log(key, float(update[key]), prog_bar=key == "trunc_k", **options)
        if self._metrics is not None:
            self._metrics.write(*segment.records)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.tbptt.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.tbptt.load_state_dict(checkpoint[CHECKPOINT_KEY])
        else:
            warnings.warn(
                "the checkpoint holds no TBPTT driver state: training starts at the beginning "
                "of the stream from a zero state, with K0",
                stacklevel=2,
            )
