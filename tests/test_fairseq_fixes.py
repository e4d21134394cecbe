"""The fixes to fairseq: one table, installed once, idempotent, and the excepthook chain."""

import subprocess
import sys

from conftest import REPO

# a fresh interpreter: what importing the plugin changes, and that a second install changes nothing
PROBE = """
import sys
previous = sys.excepthook
import atbptt_fairseq
from atbptt_fairseq import fairseq_fixes

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
