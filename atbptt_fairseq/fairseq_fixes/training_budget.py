"""Stop fairseq-train once one of the task's token budgets is spent.

fairseq stops on updates (``--max-update``), epochs or time. With an adaptive K an update scores
a varying number of tokens, so runs with the same number of updates see different amounts of
data; ``--max-train-tokens`` gives them the same data instead, ``--max-processed-tokens`` the same
compute. The task counts the target tokens it has scored and the tokens it has run through the
model; fairseq-train calls ``validate_and_save`` after every update, and the wrapper here
lowers ``--max-update`` to the current update once the task reports its budget spent, so fairseq
stops through its own path: validation, checkpoints, end of training. As with ``--max-update``,
restarting a finished run from its last checkpoint trains one more update before stopping.

The same wrapper validates and saves when the task's ``--validate-interval-processed-tokens``
says so, by letting fairseq's own mid-epoch save (which validates) fire at this update; and on
that schedule only: fairseq would also validate and save at every epoch end, and the task's epoch
is a fixed number of update slots, so a run whose K fell would validate (and have its best
checkpoint chosen among) more often than a fixed K's run of the same compute. The last epoch of
``--max-epoch`` still ends with fairseq's validation and save.

A training loss that has diverged (non-finite, or so large its perplexity overflows: fairseq
would go on training and saving a model of ppl inf, exit status 0) ends the run here, before
this update's checkpoint is written, with one line naming the update, K and the checkpoint kept.
"""

import logging
import os

from fairseq_cli import train as train_cli
from omegaconf import open_dict

from atbptt_fairseq.errors import UserInputError

logger = logging.getLogger(__name__)

_original_validate_and_save = train_cli.validate_and_save


def validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
    """fairseq's ``validate_and_save``, told to stop when the task's token budget is spent, and
    stopped before any save once the task says the training loss diverged."""
    diverged = getattr(task, "training_diverged", None)
    reason = diverged(trainer.get_num_updates()) if diverged is not None else None
    if reason:
        last = os.path.join(
            cfg.checkpoint.save_dir, f"checkpoint_last{cfg.checkpoint.checkpoint_suffix}.pt"
        )
        kept = f"{last}, saved before it, is kept" if os.path.exists(last) else "nothing was saved"
        raise UserInputError(
            f"{reason}; {kept}; lower --lr, or clip with --clip-norm or --truncation-clip-norm"
        )
    budget_reached = getattr(task, "training_budget_reached", None)
    spent = budget_reached() if budget_reached is not None else None
    if spent:
        num_updates = trainer.get_num_updates()
        max_update = cfg.optimization.max_update
        if not max_update or num_updates < max_update:
            logger.info(f"Stopping training due to {spent}")
            with open_dict(cfg):
                cfg.optimization.max_update = num_updates
    if end_of_epoch and _validates_on_processed_tokens(task):
        max_epoch = cfg.optimization.max_epoch
        end_of_epoch = bool(max_epoch) and epoch_itr.epoch >= max_epoch
    validation_due = getattr(task, "processed_validation_due", None)
    if validation_due is None or not validation_due():
        return _original_validate_and_save(
            cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch
        )
    task.processed_validation_done()
    saved = cfg.checkpoint.save_interval_updates
    with open_dict(cfg):
        cfg.checkpoint.save_interval_updates = trainer.get_num_updates()  # due at this update
    try:
        return _original_validate_and_save(
            cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch
        )
    finally:
        with open_dict(cfg):
            cfg.checkpoint.save_interval_updates = saved


def _validates_on_processed_tokens(task) -> bool:
    return getattr(getattr(task, "cfg", None), "validate_interval_processed_tokens", 0) > 0
