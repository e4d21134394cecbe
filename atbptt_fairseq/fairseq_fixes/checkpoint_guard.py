"""Safe, clear checkpoint loading and complete checkpoint files for fairseq.

Loading. fairseq-fixed's ``checkpoint_utils.load_checkpoint_to_cpu`` (used by fairseq-train to
resume and by fairseq-eval-lm, fairseq-validate, ...) calls ``torch.load`` without
``weights_only``. With torch >= 2.6 that means ``weights_only=True``, which refuses pickled code,
but only as long as nobody sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` in the environment, and a
refusal or a truncated file ends in a long traceback. The wrapper installed here runs it behind
the core's checks (:mod:`atbptt.checkpoint`, which every front end loads through): the zip's
CRC-32 of every member and the pickle's globals are checked before anything is unpickled (torch's
allowlist, plus ``argparse.Namespace``, allowlisted by the plugin for fairseq's own legacy
checkpoints), a legacy non-zip file is refused, fairseq's loader unpickles weights-only whatever
the environment says, and every problem ends in one :class:`CheckpointError` line (a
:class:`~atbptt_fairseq.errors.UserInputError`) that names the file and what to do.
It then lets the checkpoint's task class upgrade the task state of an older checkpoint
(``upgrade_checkpoint_state``), as fairseq upgrades its own older formats: fairseq hands a task
only that state (``task.load_state_dict``) when it loads a trained model.

Resuming. The wrapper of ``checkpoint_utils.load_checkpoint`` lets the task check the state it
stored (``task.check_checkpoint_dict``: e.g. the dictionary the checkpoint was trained with)
after fairseq restored it and before the first update, whatever ``--reset-*`` options say.

Saving with several ranks. fairseq asks only rank 0 for the task's checkpoint state, but every
rank carries its own columns' recurrent state. The wrapper of ``checkpoint_utils.save_checkpoint``
(which every rank calls at the same point) first lets the task gather the state of all ranks
(``task.gather_checkpoint_state()``), so that rank 0 saves all of it.

Stale temporary files. fairseq and the plugin write every checkpoint file as ``<name>.pt.tmp``
and rename it; a process killed while writing leaves the ``.tmp`` behind. The wrapper of
``checkpoint_utils.verify_checkpoint_directory`` (which fairseq-train calls on its first worker at
start, with ``--save-dir``) removes such files from the save directory, with one log line each.

Copies. fairseq writes the first checkpoint of a save atomically (``.tmp`` then rename) but copies
it to ``checkpoint_last.pt`` / ``checkpoint_best.pt`` with ``shutil.copyfile``: a process killed
during that copy leaves a truncated ``checkpoint_last.pt``, and the next run cannot resume. The
copy used by ``checkpoint_utils`` goes through a temporary file and ``os.replace`` here, so every
checkpoint file is either the old one or the complete new one.

Failed writes. When a checkpoint cannot be written (a full disk, a read-only --save-dir), fairseq
retries twice, logs a traceback and leaves the partial ``.tmp`` file behind. Here the write is
tried once, the partial file removed, and the failure ends in one line naming the file and the
cause; the file keeps its previous content. A --save-dir that cannot be written ends
in one line too, and a --save-dir that the run created is removed again if the run fails while
it is still empty (a failed start leaves nothing behind).
"""

import atexit
import contextlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Iterator, Optional

import torch
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager
from fairseq.tasks import TASK_REGISTRY

from atbptt import checkpoint
from atbptt_fairseq.errors import UserInputError

logger = logging.getLogger(__name__)


class CheckpointError(UserInputError, checkpoint.CheckpointError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or unsafe to unpickle."""


_WHAT_TO_DO = (
    "resume from an older checkpoint (copy e.g. checkpoint_<epoch>_<updates>.pt or "
    "checkpoint<epoch>.pt over checkpoint_last.pt), or remove it to start afresh"
)


@contextlib.contextmanager
def _reported_as_user_error() -> Iterator[None]:
    """The core's :class:`atbptt.checkpoint.CheckpointError` as this plugin's one-line error."""
    try:
        yield
    except checkpoint.CheckpointError as error:
        if isinstance(error, UserInputError):
            raise
        raise CheckpointError(str(error)) from error


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete zip checkpoint of plain data
    (:func:`atbptt.checkpoint.check_checkpoint_file`; nothing is unpickled)."""
    with _reported_as_user_error():
        checkpoint.check_checkpoint_file(path, _WHAT_TO_DO)


def check_checkpoint_path(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` names a file (a missing path and a directory
    are told apart: :func:`atbptt.checkpoint.check_checkpoint_path`)."""
    with _reported_as_user_error():
        checkpoint.check_checkpoint_path(path)


_original_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu


def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
    """fairseq's loader after :func:`check_checkpoint_file`, with weights-only unpickling forced,
    and the task state of an older checkpoint brought up to date (:func:`upgrade_task_state`)."""
    check_checkpoint_file(PathManager.get_local_path(path))
    with _reported_as_user_error(), checkpoint.weights_only_unpickling(path, _WHAT_TO_DO):
        state = _original_load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)
    upgrade_task_state(state)
    return state


def upgrade_task_state(state: Mapping) -> None:
    """Let the task class a checkpoint was trained with upgrade its stored task state.

    fairseq upgrades its own older checkpoint formats when loading (``_upgrade_state_dict``) but
    has no such hook for a task's state; a task class that defines
    ``upgrade_checkpoint_state(state)`` gets the loaded checkpoint here (the plugin's task adds
    what checkpoints of older versions stored only in their config).
    """
    stored = state.get("cfg") if isinstance(state, Mapping) else None
    task_config = stored.get("task") if stored is not None else None
    name = task_config.get("_name") if task_config is not None else None
    upgrade = getattr(TASK_REGISTRY.get(name), "upgrade_checkpoint_state", None)
    if upgrade is not None:
        upgrade(state)


_original_load_checkpoint = checkpoint_utils.load_checkpoint


def load_checkpoint(cfg, trainer, **passthrough_args):
    """fairseq-train's resume, after :func:`check_named_checkpoints`, then the task's check that
    the checkpoint fits its data.

    Runs for every resumed checkpoint, ``--reset-dataloader`` and ``--finetune-from-model``
    included (fairseq gives the task its checkpoint state only without them), and before the
    first update, so a refused checkpoint leaves every file as it was.
    """
    check_named_checkpoints(cfg, trainer.checkpoint_suffix)
    extra_state, epoch_itr = _original_load_checkpoint(cfg, trainer, **passthrough_args)
    check = getattr(trainer.task, "check_checkpoint_dict", None)
    if extra_state is not None and check is not None:
        check(extra_state.get(type(trainer.task).__name__) or {})
    return extra_state, epoch_itr


def check_named_checkpoints(cfg, suffix: str) -> None:
    """Refuse a checkpoint to start from that the user named and that is not a file.

    fairseq trains from scratch, with exit status 0, when the checkpoint it would resume from
    does not exist. That is right for its default, ``checkpoint_last.pt`` in ``--save-dir`` (absent
    when a run starts), and wrong for a ``--restore-file`` or ``--continue-once`` the user gave
    (mistyped, or relative to another directory); a missing ``--finetune-from-model`` ends in
    fairseq's traceback. fairseq's own refusals of these options' combinations become one line too.
    """
    if cfg.finetune_from_model is not None:
        resets = [flag for flag in _RESETS if getattr(cfg, flag[2:].replace("-", "_"))]
        if resets:
            raise UserInputError(
                "--finetune-from-model resets the optimizer, lr scheduler, meters and dataloader "
                f"itself: leave out {', '.join(resets)}"
            )
    if cfg.restore_file != "checkpoint_last.pt":
        if cfg.finetune_from_model:
            raise UserInputError(
                "--finetune-from-model and --restore-file cannot be given together: give one"
            )
        # resolved as fairseq does, with --checkpoint-suffix
        flag, path = "--restore-file", cfg.restore_file.replace(".pt", (suffix or "") + ".pt")
    elif PathManager.exists(os.path.join(cfg.save_dir, f"checkpoint_last{suffix or ''}.pt")):
        return  # a resume from --save-dir: what fairseq loads
    elif getattr(cfg, "continue_once", None) is not None:
        flag, path = "--continue-once", cfg.continue_once
    elif cfg.finetune_from_model is not None:
        flag, path = "--finetune-from-model", cfg.finetune_from_model
    else:
        return  # a fresh start
    if PathManager.path_requires_pathmanager(path):
        return  # a remote path: fairseq's PathManager reads it
    try:
        checkpoint.check_checkpoint_path(path)
    except checkpoint.CheckpointError as error:
        in_save_dir = os.path.join(cfg.save_dir, path)
        hint = ""
        if not os.path.isabs(path) and os.path.isfile(in_save_dir):
            hint = (
                " (a relative path is read from the working directory, not --save-dir: did you "
                f"mean {in_save_dir}?)"
            )
        raise CheckpointError(f"{flag}: {error}{hint}") from None


_RESETS = ("--reset-optimizer", "--reset-lr-scheduler", "--reset-meters", "--reset-dataloader")


class CheckpointWriteError(CheckpointError):
    """A checkpoint or the save directory that cannot be written (full disk, no permission)."""


def _write_error(path: str, error: OSError) -> CheckpointWriteError:
    cause = error.strerror or str(error)
    return CheckpointWriteError(
        f"cannot write checkpoint {path}: {cause}; the file keeps its previous content (if it "
        "had one); free some space or give another --save-dir, then resume"
    )


_original_save_checkpoint = checkpoint_utils.save_checkpoint


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
    """fairseq's ``save_checkpoint``, after the task gathered its state on every rank."""
    if not cfg.no_save and hasattr(trainer.task, "gather_checkpoint_state"):
        trainer.task.gather_checkpoint_state()
    return _original_save_checkpoint(cfg, trainer, epoch_itr, val_loss)


# the temporary names under which fairseq (``torch_persistent_save``) and the plugin
# (``AtomicCopyPathManager.copy``) write checkpoint files before renaming them
_STALE_TEMPORARY = re.compile(r"checkpoint.*\.pt\.tmp")

_original_torch_persistent_save = checkpoint_utils.torch_persistent_save


def torch_persistent_save(obj, filename: str, async_write: bool = False) -> None:
    """Save ``obj`` to ``filename`` through ``filename.tmp`` and a rename, in one try.

    A failed write removes the partial ``.tmp`` file and raises :class:`CheckpointWriteError`
    (fairseq's own version retries for 5 s, logs a traceback and leaves the ``.tmp`` file).
    """
    if async_write or not PathManager.supports_rename(filename):
        return _original_torch_persistent_save(obj, filename, async_write)
    temporary = filename + ".tmp"
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
        os.replace(temporary, filename)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(error, OSError):
            raise _write_error(filename, error) from error
        raise


_original_verify_checkpoint_directory = checkpoint_utils.verify_checkpoint_directory


def _first_missing_directory(path: str) -> Optional[str]:
    """The outermost directory of ``path`` (itself included) that does not exist yet."""
    missing = None
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_created_directories(save_dir: str, outermost: str, only_after_failure: bool) -> None:
    """Remove ``save_dir`` and its parents up to ``outermost`` (all created by this run) while
    they are empty; with ``only_after_failure``, only when the process ends on an exception."""
    if only_after_failure and getattr(sys, "last_value", None) is None:
        return
    directory = os.path.abspath(save_dir)
    while True:
        try:
            os.rmdir(directory)  # only an empty directory
        except OSError:
            return
        if directory == outermost:
            return
        directory = os.path.dirname(directory)


def verify_checkpoint_directory(save_dir: str) -> None:
    """fairseq's check that checkpoints can be written into ``save_dir``, reported in one line.

    fairseq creates ``save_dir`` here, before the task checks its options: a run that then
    fails removes it again (and the parents it created) if nothing was written into it. The
    checkpoint ``.tmp`` files that a killed run left there are removed (fairseq-train calls this
    at start, on one worker).
    """
    outermost = _first_missing_directory(save_dir)
    try:
        _original_verify_checkpoint_directory(save_dir)
    except OSError as error:
        if outermost is not None:
            _remove_created_directories(save_dir, outermost, only_after_failure=False)
        raise CheckpointWriteError(
            f"cannot write checkpoints into --save-dir {save_dir}: {error.strerror or error}; "
            "give a --save-dir you can write to"
        ) from error
    if outermost is not None:
        atexit.register(_remove_created_directories, save_dir, outermost, True)
    remove_stale_temporaries(save_dir)


def remove_stale_temporaries(save_dir: str) -> None:
    """Delete ``checkpoint*.pt.tmp`` files directly in ``save_dir``, logging each."""
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if _STALE_TEMPORARY.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                logger.info(f"removed {path}, a checkpoint left half-written by a killed run")


class AtomicCopyPathManager(PathManager):
    """fairseq's ``PathManager`` whose ``copy`` of a local file never leaves a partial target."""

    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not PathManager.supports_rename(dst_path):
            return PathManager.copy(src_path, dst_path, overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        temporary = dst_path + ".tmp"
        try:
            shutil.copyfile(src_path, temporary)
            os.replace(temporary, dst_path)
        except BaseException as error:
            if os.path.lexists(temporary):
                os.remove(temporary)
            if isinstance(error, OSError):
                raise _write_error(dst_path, error) from error
            raise
        return True
