"""fairseq's command-line tools as subprocesses: their environment and their JSON log lines."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the plugin (``--user-dir``) and, in a checkout, the repository around it
PLUGIN_DIR = Path(__file__).resolve().parents[1]
REPO = PLUGIN_DIR.parent
# the progress records of fairseq-train's --log-format json (valid: also fairseq-validate's)
LOG_TAGS = ("train_inner", "valid", "train")


def json_record(line: str, tags: Sequence[str] = LOG_TAGS) -> tuple[str, dict[str, Any]] | None:
    """``(tag, record)`` of a fairseq ``--log-format json`` line with one of ``tags``, in the
    simple format (``... | INFO | train_inner | {...}``) or hydra's
    (``[train_inner][INFO] - {...}``); None for any other line."""
    for tag in tags:
        for marker in (f"| {tag} | ", f"[{tag}][INFO] - "):
            if marker in line:
                try:
                    return tag, json.loads(line.split(marker, 1)[1])
                except json.JSONDecodeError:
                    return None
    return None


def json_records(output: str, tag: str) -> list[dict[str, Any]]:
    """Every record that fairseq logged under ``tag`` in ``output``, in order."""
    parsed = (json_record(line, (tag,)) for line in output.splitlines())
    return [record for record in parsed if record is not None for record in [record[1]]]


def child_env(threads: int = 0) -> dict[str, str]:
    """Environment of the fairseq subprocesses: this interpreter's bin first on PATH (its
    fairseq-train), Python warnings off and, if ``threads`` > 0, that many intra-op threads
    (torch reads OMP_NUM_THREADS at start-up, fairseq never sets it; MKL gets the same)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env
