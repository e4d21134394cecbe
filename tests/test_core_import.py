"""The method is a library: ``import atbptt`` needs no fairseq and changes no global state."""

import subprocess
import sys

from conftest import REPO

# Runs in a fresh interpreter where fairseq cannot be imported (a meta-path finder refuses it), so
# the check holds whether or not fairseq is installed in this environment.
PROBE = """
import sys, importlib.abc

class NoFairseq(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fairseq" or name.startswith("fairseq."):
            raise ImportError("fairseq is hidden in this test")
        return None

sys.meta_path.insert(0, NoFairseq())
import torch
hook = sys.excepthook
safe = list(torch.serialization.get_safe_globals())
modules = set(sys.modules)
import atbptt
assert sys.excepthook is hook, "sys.excepthook changed"
assert list(torch.serialization.get_safe_globals()) == safe, "torch's safe globals changed"
loaded = sorted(name for name in set(sys.modules) - modules if name.split(".")[0] in
                ("fairseq", "atbptt_fairseq", "lightning", "pytorch_lightning", "hydra", "omegaconf"))
assert not loaded, f"import atbptt loaded {loaded}"
print("ok", len(atbptt.__all__))
"""


def test_import_atbptt_without_fairseq_and_without_side_effects():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")
