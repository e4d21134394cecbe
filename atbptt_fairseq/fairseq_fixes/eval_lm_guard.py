"""fairseq-eval-lm's ``--context-window``, and a ``--path`` that is not a file: refused in one
line for the plugin's task.

fairseq-eval-lm's ``--context-window N`` scores each block of ``--tokens-per-sample`` tokens with
the N tokens before it as extra context, for models that forget everything between blocks. Its
``main`` subtracts N from the task's ``tokens_per_sample`` before it even sets the task up, which
``adaptive_tbptt_lm`` does not have: the run died in a traceback about a missing config key. The
option has nothing to add to this task: its evaluation carries the recurrent state over the whole
split, so every token is already scored with all the tokens before it as context. The check runs
before fairseq-eval-lm's ``main`` (which the command looks up after parsing its command line,
and so after ``--user-dir`` imported the plugin), and again in the task's ``eval_lm_dataloader``.

fairseq-eval-lm checks that ``--path`` exists only when it loads the model, with a traceback
(``OSError: Model file not found``); a directory passes that check. Both are refused before
fairseq's ``main`` runs, each in its own line, and so is bad input to the task (a missing data
directory): its set-up runs first, as fairseq-train's does (:mod:`.checks_first`), instead of after
fairseq's dump of its whole configuration.
"""

import functools
from argparse import Namespace

from fairseq import checkpoint_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.file_io import PathManager
from fairseq_cli import eval_lm as eval_lm_cli

from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.fairseq_fixes import checkpoint_guard, checks_first


def check_context_window(context_window: int) -> None:
    """Raise :class:`UserInputError` for a positive ``--context-window``."""
    if context_window and context_window > 0:
        raise UserInputError(
            f"fairseq-eval-lm --context-window ({context_window}) is not supported by the "
            "adaptive_tbptt_lm task, and not needed: its evaluation carries the recurrent state "
            "over the whole split, so every token is already scored with all the tokens before "
            "it as context; leave the option out"
        )


_original_main = eval_lm_cli.main


@functools.wraps(_original_main)
def main(cfg, **kwargs):
    """fairseq-eval-lm's ``main``, after :func:`check_context_window` and
    :func:`check_model_paths` for the plugin's task."""
    if isinstance(cfg, Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    if checks_first.plugin_task_class(cfg) is not None:
        check_context_window(cfg.eval_lm.context_window)
        check_model_paths(cfg)
        checks_first.check_task(cfg)  # bad input in one line, before fairseq's config dump
    return _original_main(cfg, **kwargs)


def check_model_paths(cfg) -> None:
    """Raise :class:`UserInputError` unless every file ``--path`` stands for (each shard's, with
    ``--checkpoint-suffix``) exists: fairseq's own check ends in a traceback (``OSError: Model
    file not found``), and a directory passed it, to fail later on as if it did not exist."""
    if not cfg.common_eval.path:
        raise UserInputError("fairseq-eval-lm needs --path, the checkpoint file to evaluate")
    shards = cfg.checkpoint.checkpoint_shard_count
    for shard in range(shards):
        path = checkpoint_utils.get_maybe_sharded_checkpoint_filename(
            cfg.common_eval.path, cfg.checkpoint.checkpoint_suffix, shard, shards
        )
        if not PathManager.path_requires_pathmanager(path):
            checkpoint_guard.check_checkpoint_path(path)
