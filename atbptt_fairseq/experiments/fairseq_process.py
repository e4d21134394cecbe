"""fairseq's command-line tools as subprocesses: their environment and their JSON log lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class OutputLine:
    """One line of a fairseq tool's output, as it arrived."""

    text: str  # without its newline
    arrival: float  # time.perf_counter() of this process when the line was read
    record: tuple[str, dict[str, Any]] | None  # (tag, record) of a JSON log line, else None


def run_fairseq(
    cmd: Sequence[str],
    on_line: Callable[[OutputLine], None],
    *,
    threads: int = 0,
    cwd: Path | None = None,
    tags: Sequence[str] = LOG_TAGS,
    start: Callable[..., subprocess.Popen] = subprocess.Popen,
    wait: Callable[[subprocess.Popen], int] = subprocess.Popen.wait,
) -> int:
    """Run a fairseq command-line tool (stdout and stderr merged, :func:`child_env` with
    ``threads``) and hand every line of its output to ``on_line`` as it arrives, parsed by
    :func:`json_record` with ``tags``; return its exit status.

    If reading or ``on_line`` raises (Ctrl-C included), the tool is terminated and reaped before
    the exception goes on. ``start(cmd, **popen_options)`` and ``wait(process)`` start and reap
    it: ``subprocess.Popen`` by default; a caller that must stop its children from elsewhere
    (a sweep on Ctrl-C) passes its own.
    """
    process = start(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=child_env(threads),
        cwd=cwd,
    )
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            on_line(OutputLine(raw.rstrip("\n"), time.perf_counter(), json_record(raw, tags)))
    except BaseException:
        process.terminate()
        wait(process)
        raise
    return wait(process)
