"""The fixes to fairseq: one table, installed once, idempotent, and the excepthook chain; a plain
import of the plugin changes nothing, fairseq's --user-dir and the task's set-up install them."""

import subprocess
import sys

from conftest import REPO

# a fresh interpreter: importing the plugin changes nothing, install() applies every fix, and a
# second install changes nothing
PROBE = """
import argparse, atexit, sys
import torch
import fairseq_cli.eval_lm, fairseq_cli.hydra_train, fairseq_cli.train  # their own registrations
previous = sys.excepthook
safe_globals = list(torch.serialization.get_safe_globals())
exit_handlers = atexit._ncallbacks()
import atbptt_fairseq
from atbptt_fairseq import fairseq_fixes

for patch in fairseq_fixes.PATCHES:
    assert getattr(patch.target, patch.attribute) is not patch.replacement, patch.attribute
assert sys.excepthook is previous
assert list(torch.serialization.get_safe_globals()) == safe_globals
assert atexit._ncallbacks() == exit_handlers
fairseq_fixes.install()
assert argparse.Namespace in torch.serialization.get_safe_globals()
for patch in fairseq_fixes.PATCHES:
    assert getattr(patch.target, patch.attribute) is patch.replacement, patch.attribute
    assert len(patch.reason) > 40, patch.attribute
hook = sys.excepthook
assert hook is not previous and hook.reports_user_input_errors
fairseq_fixes.install()
assert sys.excepthook is hook, "a second install chained the hook again"
assert len({(id(p.target), p.attribute) for p in fairseq_fixes.PATCHES}) == len(fairseq_fixes.PATCHES)

from atbptt_fairseq.errors import UserInputError
try:
    try:
        raise UserInputError("the data directory is missing")
    except UserInputError as error:
        raise RuntimeError("fairseq wrapped it") from error
except RuntimeError as error:
    seen = []
    sys.excepthook = fairseq_fixes.user_errors.user_error_excepthook(lambda *a: seen.append(a))
    sys.excepthook(type(error), error, error.__traceback__)
    assert not seen, "a user error went to the previous hook"
    sys.excepthook(ValueError, ValueError("other"), None)
    assert len(seen) == 1, "another error did not go to the previous hook"
print("ok")
"""


def test_install_applies_every_patch_once_and_chains_the_excepthook():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
    assert "atbptt_fairseq: error: the data directory is missing" in result.stderr


# fairseq's own ways in: its --user-dir import (a CLI's), and setting the plugin's task up
USER_DIR_PROBE = """
import argparse, sys
from fairseq import checkpoint_utils, utils
original = checkpoint_utils.load_checkpoint_to_cpu
utils.import_user_module(argparse.Namespace(user_dir=sys.argv[1]))
assert checkpoint_utils.load_checkpoint_to_cpu is not original
print("ok")
"""
SETUP_PROBE = """
import sys
import atbptt_fairseq
from fairseq import checkpoint_utils
from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmConfig, AdaptiveTbpttLmTask
original = checkpoint_utils.load_checkpoint_to_cpu
try:
    AdaptiveTbpttLmTask.setup_task(AdaptiveTbpttLmConfig(data="/nowhere"))
except UserInputError:
    pass
assert checkpoint_utils.load_checkpoint_to_cpu is not original
print("ok")
"""


def test_fairseq_user_dir_and_the_task_set_up_install_the_fixes(tmp_path):
    for probe, args in ((USER_DIR_PROBE, [str(REPO / "atbptt_fairseq")]), (SETUP_PROBE, [])):
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_the_readme_lists_every_change_to_fairseq():
    from atbptt_fairseq import fairseq_fixes

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Changes to fairseq", 1)[1].split("\n## ", 1)[0]
    for patch in fairseq_fixes.PATCHES:
        assert f"| `{patch.target.__name__}.{patch.attribute}` |" in section, patch.attribute
    for other in ("sys.excepthook", "add_safe_globals", "atexit"):
        assert other in section


def test_importing_the_plugin_leaves_the_root_logger_as_it_was():
    """fairseq's import calls logging.basicConfig(level=DEBUG); a program that imports the plugin
    (a sweep, the demo) would print every library's debug lines without the guard."""
    probe = (
        "import logging; import atbptt_fairseq.experiments.demo; root = logging.getLogger(); "
        "print(root.level, len(root.handlers))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(30), "0"]
    assert "DEBUG" not in result.stderr
