"""Every change the plugin makes to fairseq, torch and the interpreter, in one place.

The fairseq command-line tools need these fixes to run the plugin safely and to report bad input
in one line. :func:`install` applies them, only where fairseq runs the plugin: when fairseq's
``--user-dir`` imports ``atbptt_fairseq``, when an ``atbptt-*`` command starts, and when fairseq
sets up the plugin's task (a plain ``import atbptt_fairseq`` changes nothing). :data:`PATCHES`
lists every attribute it replaces, with the upstream bug or limitation each works around; the
README's "Changes to fairseq" section lists them too. The replacements live in the modules of this
package, which say more.
"""

import argparse
import atexit
import sys
from dataclasses import dataclass
from typing import Any, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import eval_lm as eval_lm_cli
from fairseq_cli import hydra_train as hydra_train_cli
from fairseq_cli import train as train_cli

from atbptt_fairseq.fairseq_fixes import (
    checkpoint_guard,
    checks_first,
    distributed_fixes,
    eval_lm_guard,
    training_budget,
    user_errors,
)


@dataclass(frozen=True)
class Patch:
    """``target.attribute`` is replaced by ``replacement`` because of ``reason``."""

    target: Any
    attribute: str
    replacement: Any
    reason: str


PATCHES: Tuple[Patch, ...] = (
    Patch(
        checkpoint_utils,
        "load_checkpoint_to_cpu",
        checkpoint_guard.load_checkpoint_to_cpu,
        "fairseq calls torch.load without weights_only, so the environment "
        "(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can make it unpickle code; a damaged, truncated or "
        "unsafe file ends in a long traceback. Checks the zip CRCs and the pickle's globals "
        "first, forces weights-only loading and reports one line",
    ),
    Patch(
        checkpoint_utils,
        "load_checkpoint",
        checkpoint_guard.load_checkpoint,
        "fairseq gives the task its checkpoint state only without --reset-* options; the task "
        "must check (task.check_checkpoint_dict) that a resumed checkpoint fits its data",
    ),
    Patch(
        checkpoint_utils,
        "save_checkpoint",
        checkpoint_guard.save_checkpoint,
        "fairseq asks only rank 0 for the task's checkpoint state, but every rank carries its "
        "own columns' recurrent state: all ranks gather it first (task.gather_checkpoint_state)",
    ),
    Patch(
        checkpoint_utils,
        "torch_persistent_save",
        checkpoint_guard.torch_persistent_save,
        "fairseq retries a failed write for 5 s, logs a traceback and leaves the partial .tmp "
        "file; one try here, the partial file removed, one line naming the file and cause",
    ),
    Patch(
        checkpoint_utils,
        "verify_checkpoint_directory",
        checkpoint_guard.verify_checkpoint_directory,
        "fairseq creates --save-dir before the task checks its options, fails with a traceback "
        "when it is not writable, and never removes .tmp files of a killed run",
    ),
    Patch(
        checkpoint_utils,
        "PathManager",
        checkpoint_guard.AtomicCopyPathManager,
        "fairseq copies checkpoint_last.pt / checkpoint_best.pt with shutil.copyfile: a kill "
        "during the copy leaves a truncated checkpoint that cannot be resumed",
    ),
    Patch(
        distributed_utils,
        "_infer_torch_distributed_launch_init",
        distributed_fixes._infer_torch_distributed_launch_init,
        "fairseq divides by torch.cuda.device_count(): torchrun without a GPU dies with a "
        "ZeroDivisionError; without GPUs use device 0 and gloo",
    ),
    Patch(
        distributed_utils,
        "_broadcast_object_slow",
        distributed_fixes._broadcast_object_slow,
        "under torch >= 2.6's weights-only default the other ranks refuse the checkpoint that "
        "rank 0 broadcasts (its OmegaConf config), so every multi-rank resume fails",
    ),
    Patch(
        train_cli,
        "validate_and_save",
        training_budget.validate_and_save,
        "fairseq-train stops only on updates, epochs or time; the task's token budgets "
        "(--max-train-tokens, --max-processed-tokens, --validate-interval-processed-tokens) "
        "stop and validate through fairseq's own path; a diverged training loss (ppl inf) "
        "would be trained on and saved with exit status 0",
    ),
    Patch(
        eval_lm_cli,
        "main",
        eval_lm_guard.main,
        "fairseq-eval-lm --context-window reads the task's tokens_per_sample before setting "
        "the task up: a traceback about a missing config key for this task",
    ),
    Patch(
        train_cli,
        "main",
        checks_first.main,
        "fairseq-train logs its whole configuration (hundreds of lines) before it sets the task "
        "up, so the one line reporting bad input came after the dump: the task is checked first",
    ),
    Patch(
        hydra_train_cli,
        "pre_main",
        checks_first.main,
        "fairseq-hydra-train runs fairseq-train's main under this name: the same check first, "
        "before the configuration is logged",
    ),
    Patch(
        hydra_train_cli,
        "_hydra_main",
        user_errors.hydra_main,
        "hydra reports every exception of fairseq-hydra-train with its own traceback, before "
        "the excepthook that turns the plugin's bad-input errors into one line could",
    ),
)


def install() -> None:
    """Apply every fix (idempotent)."""
    for patch in PATCHES:
        setattr(patch.target, patch.attribute, patch.replacement)
    # fairseq's CLIs print a traceback for every exception: a UserInputError becomes one line
    sys.excepthook = user_errors.user_error_excepthook(sys.excepthook)
    # fairseq's own (legacy) checkpoints pickle an argparse.Namespace, which torch >= 2.6 refuses
    # under its default weights_only loading: allowlist it so they still load
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
    # fairseq never destroys its process group: gloo aborts at interpreter exit
    # (pytorch/pytorch#190489) after training has finished, and torchrun reports a failure
    atexit.unregister(distributed_fixes.destroy_gloo_process_group)
    atexit.register(distributed_fixes.destroy_gloo_process_group)
