"""Launching a run's fairseq subprocesses: they die with the sweep (parent-death signal, a
process group of their own), hold the run's lock, and report progress lines."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .fairseq_logs import float_field, parse_eval
from .fairseq_process import OutputLine, child_env, run_fairseq

_SAY_LOCK = threading.Lock()  # whole lines, whichever of the --jobs threads prints them


def say(message: str) -> None:
    """One progress line (or block of lines) on stdout, never interleaved with another."""
    with _SAY_LOCK:
        print(message, flush=True)


def fmt_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class RunFailed(RuntimeError):
    """A fairseq subprocess of a run exited with an error."""


PR_SET_DEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread that started it
    ends (Linux's PR_SET_DEATHSIG; elsewhere nothing), so that ``kill -9`` of the sweep does not
    leave its fairseq-train running; a child whose parent is already gone exits at once."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return lambda: None

    def set_death_signal() -> None:
        prctl(PR_SET_DEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)

    return set_death_signal


class ChildProcesses:
    """The fairseq subprocesses the sweep has running (one run's, or ``--jobs`` runs'), so that
    stopping the sweep (Ctrl-C, SIGTERM) stops every one of them, not only the main thread's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(
        self, cmd: Sequence[str], keep_fds: Sequence[int] = (), **popen_args: Any
    ) -> subprocess.Popen:
        """Start ``cmd`` in a process group of its own that dies with the thread that starts it
        (:func:`die_with_parent`); ``keep_fds`` stay open in it (the run's lock)."""
        with self._lock:
            if self.stopping:
                raise RunFailed("the sweep is stopping")
            process = subprocess.Popen(
                list(cmd),
                process_group=0,
                # only prctl and getppid run between fork and exec (no locks, no imports)
                preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509
                pass_fds=tuple(keep_fds),
                **popen_args,
            )
            self._running.add(process)
        return process

    def wait(self, process: subprocess.Popen) -> int:
        code = process.wait()
        with self._lock:
            self._running.discard(process)
        return code

    def stop_all(self) -> None:
        """Terminate every running subprocess and start no more."""
        with self._lock:
            self.stopping = True
            for process in self._running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)


def _progress_line(
    name: str, tag: str, record: dict[str, Any], of: str, train: dict[str, Any]
) -> str:
    """A short progress line from a valid or train_inner record (``train``: the last one;
    ``of``: ``"/N"`` after the update number under a budget of N updates, else empty)."""
    parts = [f"K {train.get('trunc_k', '?')}"]
    if "bias_hat" in train:
        parts.append(f"delta_hat {train['bias_hat']}")
    if tag == "valid":
        loss = float_field(record, "valid_loss")
        head = f"valid @ {record.get('valid_num_updates')}{of}: ppl {2.0**loss:.4g}"
    else:
        head = f"update {record.get('num_updates')}{of}: train loss {record.get('loss')}"
        parts.append(f"wall {fmt_seconds(float_field(record, 'wall'))}")
    return f"    [{name}] {head} ({', '.join(parts)})"


def run_train(
    cmd: Sequence[str],
    log_path: Path,
    name: str,
    of: str,
    progress_seconds: float,
    threads: int = 0,
    children: ChildProcesses | None = None,
    lock_fd: int | None = None,
) -> None:
    """Run fairseq-train, appending its output to ``log_path``; print validations as they come
    and at most one training line every ``progress_seconds``. ``lock_fd``: the run's lock, which
    the trainer holds too (:func:`run_lock`)."""
    children = children or ChildProcesses()
    last_shown = time.perf_counter()  # the clock of OutputLine.arrival
    last_train: dict[str, Any] = {}
    # line-buffered: a sweep killed from outside (a session's end) loses no line it has read
    with log_path.open("a", buffering=1) as log:

        def on_line(line: OutputLine) -> None:
            nonlocal last_shown, last_train
            log.write(line.text + "\n")
            if line.record is None:
                return
            tag, record = line.record
            if tag == "train_inner":
                last_train = record
                if line.arrival - last_shown < progress_seconds:
                    return
            if tag in ("train_inner", "valid"):
                say(_progress_line(name, tag, record, of, last_train))
                last_shown = line.arrival

        stamp = datetime.now().isoformat(timespec="seconds")
        log.write(f"# sweep attempt {stamp}: {' '.join(cmd)}\n")
        log.flush()
        code = run_fairseq(
            cmd,
            on_line,
            threads=threads,
            start=functools.partial(children.start, keep_fds=() if lock_fd is None else (lock_fd,)),
            wait=children.wait,
        )
    if code != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise RunFailed(f"fairseq-train exited {code}; end of {log_path}:\n" + "\n".join(tail))


def run_evals(
    cmds: dict[str, list[str]],
    run_dir: Path,
    cores: int = 0,
    children: ChildProcesses | None = None,
    lock_fd: int | None = None,
) -> dict[str, tuple[float, float]]:
    """Run the fairseq-eval-lm commands side by side, sharing ``cores`` (0: all of the
    machine's); parse their results."""
    children = children or ChildProcesses()
    env = child_env(max(1, (cores or os.cpu_count() or 2) // len(cmds)))
    processes = {}
    for subset, cmd in cmds.items():
        log = (run_dir / f"eval_{subset}.log").open("w")
        log.write(f"# {' '.join(cmd)}\n")
        log.flush()
        processes[subset] = (
            children.start(
                cmd,
                keep_fds=() if lock_fd is None else (lock_fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            ),
            log,
        )
    results = {}
    for subset, (process, log) in processes.items():
        code = children.wait(process)
        log.close()
        text = (run_dir / f"eval_{subset}.log").read_text()
        if code != 0:
            tail = "\n".join(text.splitlines()[-15:])
            raise RunFailed(f"fairseq-eval-lm on {subset} exited {code}:\n{tail}")
        results[subset] = parse_eval(text)
    return results
