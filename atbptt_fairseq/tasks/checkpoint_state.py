"""The loop's state in the fairseq task's checkpoints (``get_checkpoint_dict`` /
``set_checkpoint_dict``): the format of the checkpoints written before the one loop, kept so that
they resume bitwise (``tests/test_checkpoint_compat.py``)."""

import logging
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from atbptt import (
    RESUME_BREAKING_OPTIONS,
    StreamCursor,
    TbpttConfig,
    TbpttLoop,
    describe_changes,
    resume_changes,
)
from atbptt.estimators import Carry
from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.tasks.config import option_flag
from atbptt_fairseq.tasks.estimators import task_layout

logger = logging.getLogger(__name__)


def checkpoint_layout(loop: TbpttLoop) -> Optional[Tuple[Tensor, ...]]:
    """The loop's carried state in the checkpoints' layout (batch along dim 1), or None."""
    state = loop.carried_state
    return None if state is None else task_layout(state, loop.state_batch_dim)


def loop_checkpoint(
    loop: TbpttLoop, world_size: int, gathered: Optional[Tuple[Dict[str, Any], List[Tensor]]]
) -> Dict[str, Any]:
    """The loop's part of the task's checkpoint dict. With several workers the carried state is
    the one ``gathered`` from all of them (with the cursor it was gathered at), if it still is
    the loop's; a checkpoint without it starts a new pass on resume."""
    carried, cursor = checkpoint_layout(loop), loop.cursor.state_dict()
    carried_state = None
    if world_size == 1:
        if carried is not None:
            carried_state = [tensor.detach().cpu() for tensor in carried]
    elif gathered is not None and gathered[0] == cursor:
        carried_state = [tensor.cpu() for tensor in gathered[1]]
    elif carried is not None:
        logger.warning("no carried state in this checkpoint: it was not gathered from all ranks")
    estimator, carry = loop.estimator, loop.estimator_carry
    state = {
        "cursor": cursor,
        "carried_state": carried_state,
        "controller": loop.controller.state_dict(),
        "scored_tokens": loop.scored_tokens,
        "processed_tokens": loop.processed_tokens,
    }
    if estimator.checkpointed:  # --gradient-estimator: its name, RNG and carry (sensitivities)
        state["gradient_estimator"] = {
            "name": estimator.name,
            "state": estimator.state_dict(),
            "carry": None if carry is None else carry.state_dict(),
        }
    return state


def restore_loop(
    loop: TbpttLoop,
    state: Dict[str, Any],
    world_size: int,
    rank: int,
    train_shard: Optional[int],
) -> Optional[int]:
    """Restore the stream position, carried state, controller, token counts and estimator from
    the task's checkpoint dict; returns the training shard to continue.

    The stored carried state covers all columns; this rank keeps its own. A checkpoint written at
    the end of an epoch on another data shard (colon-separated data paths) starts that shard from
    its beginning with a zero state, as an uninterrupted run does when it moves to the next shard.
    A checkpoint of another global batch size (columns = --batch-size x workers) starts a new pass
    over the data, as the columns differ.
    """
    cursor = StreamCursor.from_state_dict(state["cursor"])
    carried = state.get("carried_state")
    saved_shard = state.get("train_shard")
    columns = loop.column_count or None
    saved_columns = None if carried is None else carried[0].size(1)
    if saved_columns is not None and columns is not None and saved_columns != columns * world_size:
        logger.warning(
            f"the checkpoint's carried state covers {saved_columns} columns but this run "
            f"trains {columns * world_size} (--batch-size x workers): starting a new pass over "
            "the training data from a zero state"
        )
        cursor, carried = StreamCursor(passes=cursor.passes + 1), None
    elif saved_shard is not None and train_shard not in (None, saved_shard):
        cursor, carried = StreamCursor(passes=cursor.passes), None
    else:
        if carried is not None:
            rows = slice(rank * columns, (rank + 1) * columns) if columns else slice(None)
            carried = tuple(tensor[:, rows].contiguous() for tensor in carried)
        if saved_shard is not None:
            train_shard = saved_shard
    estimator, saved = loop.estimator, state.get("gradient_estimator")
    estimator_state, carry = None, None
    if estimator.checkpointed and (saved is None or saved.get("name") != estimator.name):
        logger.warning(
            f"the checkpoint holds no {estimator.name} state (it was trained with "
            f"another --gradient-estimator): the estimator starts afresh at a new pass"
        )
        cursor, carried = StreamCursor(passes=cursor.passes + 1), None
    elif estimator.checkpointed:
        estimator_state = saved["state"]
        # a carry that does not continue the restored stream (a new pass or shard) is dropped
        if saved.get("carry") is not None and carried is not None:
            carry = Carry.from_state_dict(saved["carry"])
    loop.restore(
        cursor,
        carried,
        state["controller"],
        # checkpoints before the processed-token budget: estimates not counted, windows are
        state.get("scored_tokens", 0),
        state.get("processed_tokens", 0),
        estimator_state,
        carry,
    )
    return train_shard


def check_resumed_options(
    saved: Optional[Dict[str, Any]], method: TbpttConfig, without_effect: Dict[str, Any]
) -> None:
    """Say in one line which method options differ from the checkpoint's; refuse those that
    would give the carried state another meaning (checkpoints before this check: none)."""
    changes = resume_changes(saved, method)
    breaking = [  # an option without effect (e.g. the style of --gradient-estimator) breaks none
        change
        for change in changes
        if change[0] in RESUME_BREAKING_OPTIONS and change[0] not in without_effect
    ]
    if breaking:
        raise UserInputError(
            f"cannot resume with {describe_changes(breaking, option_flag)}: the checkpoint's "
            "carried state belongs to the saved value; resume with it, or start a new run "
            "(another --save-dir, or --reset-dataloader to start a new pass)"
        )
    if changes:
        logger.warning(f"resuming with changed options: {describe_changes(changes, option_flag)}")
