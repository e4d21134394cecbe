"""What a run was trained with, and who trains it: ``run.json`` (command, code version, data
identity), the comparison that refuses to mix configurations, and the run's lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .fairseq_process import REPO
from .runs import RunSpec, SweepSettings, train_command

# the packages whose source is the code a run trains with
SOURCE_PACKAGES = ("atbptt", "atbptt_fairseq")
# ... but for this package, which starts and reads the runs and trains nothing
NOT_TRAINING_CODE = ("atbptt_fairseq/experiments",)


# options that only say where files go: a sweep directory moved elsewhere is the same sweep
LOCATION_OPTIONS = ("--save-dir", "--user-dir", "--tensorboard-logdir")


def code_version(repo: Path = REPO) -> dict[str, str | None]:
    """The code a run trains with: a sha256 over the plugin's and the method's Python sources
    (what decides whether runs are comparable; the experiment machinery left out) and, for
    people, the git commit if there is one."""
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            if path.relative_to(repo).as_posix().startswith(NOT_TRAINING_CODE):
                continue
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"source_sha256": digest.hexdigest(), "git_commit": commit}


def data_identity(data: Path) -> dict[str, Any]:
    """What a data-bin holds, by content: a sha256 over its dictionaries and index files
    (``dict.txt`` and ``*.idx``, the target stream's under ``targets/`` too), so that a data-bin
    rebuilt in place with other text or another dictionary is not taken for the one a run was
    trained on. The ``.bin`` token files are left out (large); their ``.idx`` holds every
    sentence's size and offset."""
    digest = hashlib.sha256()
    files = sorted(
        path for path in data.rglob("*") if path.name == "dict.txt" or path.suffix == ".idx"
    )
    for path in files:
        digest.update(str(path.relative_to(data)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"sha256": digest.hexdigest(), "files": len(files)}


def command_options(cmd: Sequence[str]) -> dict[str, str]:
    """A fairseq-train command as ``{option: value}`` (the last value where an option repeats, as
    fairseq reads it; ``"set"`` for a flag), the data path under ``data``; locations left out."""
    options = {"data": cmd[1]}
    args = list(cmd[2:])
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, _, inline = arg.partition("=")
        if inline:
            options[name] = inline
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            options[name] = args[index + 1]
        else:
            options[name] = "set"
    for option in LOCATION_OPTIONS:
        options.pop(option, None)
    return options


def same_value(old: str | None, new: str | None) -> bool:
    """Whether two option values say the same: the same text, or the same number written two
    ways (``1e-7`` and ``1e-07``: YAML's text and hydra's float)."""
    if old == new:
        return True
    try:
        return old is not None and new is not None and float(old) == float(new)
    except ValueError:
        return False


def record_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two run records (``{"command": [...], "code": {...}, "data":
    {...}}``), e.g. ``--lr 1.0 -> 0.5``; a record without code or data identity (an older
    sweep's) is compared on what it has."""
    old, new = command_options(recorded["command"]), command_options(current["command"])
    differences = [
        f"{name} {old.get(name, 'unset')} -> {new.get(name, 'unset')}"
        for name in sorted(set(old) | set(new))
        if not same_value(old.get(name), new.get(name))
    ]
    old_code, new_code = recorded.get("code"), current["code"]
    if old_code and old_code["source_sha256"] != new_code["source_sha256"]:
        differences.append(
            f"code {old_code['source_sha256'][:12]} -> {new_code['source_sha256'][:12]} "
            f"(commit {old_code.get('git_commit') or '?'} -> {new_code.get('git_commit') or '?'})"
        )
    old_data, new_data = recorded.get("data"), current.get("data")
    if old_data and new_data and old_data["sha256"] != new_data["sha256"]:
        differences.append(
            f"data content {old_data['sha256'][:12]} -> {new_data['sha256'][:12]} (the data-bin "
            "was rebuilt)"
        )
    return differences


def recorded_run(run_dir: Path) -> dict[str, Any] | None:
    """The record of what a run directory was trained with: ``run.json``, or for a run of an
    older sweep the ``command.txt`` it wrote (command only); None for a run not started."""
    if (run_dir / "run.json").is_file():
        return json.loads((run_dir / "run.json").read_text())
    if (run_dir / "command.txt").is_file():
        return {"command": (run_dir / "command.txt").read_text().split(), "code": None}
    return None


def changed_runs(
    specs: Sequence[RunSpec],
    settings: SweepSettings,
    code: dict[str, Any],
    data: dict[str, Any],
) -> dict[str, list[str]]:
    """The runs under ``--out`` recorded with another command, code or data, with what
    differs."""
    changed = {}
    for spec in specs:
        run_dir = settings.out / "runs" / spec.name
        recorded = recorded_run(run_dir)
        if recorded is None:
            continue
        current = {"command": train_command(spec, settings, run_dir), "code": code, "data": data}
        differences = record_differences(recorded, current)
        if differences:
            changed[spec.name] = differences
    return changed


def refuse_changed_runs(changed: dict[str, list[str]], out: Path) -> None:
    """One error line naming the first changed run, what differs, and how to go on."""
    first, differences = next(iter(changed.items()))
    others = f" (and {len(changed) - 1} more runs)" if len(changed) > 1 else ""
    raise SystemExit(
        f"error: run {first} in {out} was trained with another configuration{others}: "
        f"{'; '.join(differences)}; use another --out, or --rerun-changed to train such runs "
        f"again in fresh directories (the old ones move to {out / 'replaced'})"
    )


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[int | None]:
    """Hold the run's lock (``run_dir/lock``) while the block runs and yield its file descriptor,
    or None if another process holds it (a sweep, or a trainer of the run whose sweep is gone).


    The lock (``flock``) belongs to the open file, not to this process: the subprocesses of the
    run inherit the descriptor (``ChildProcesses.start(keep_fds=...)``), so the lock stays held
    for as long as anything trains or evaluates the run, and a rerun cannot train it twice."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield handle.fileno()


def move_aside(run_dir: Path, out: Path) -> Path:
    """Move a run directory to ``out/replaced/<name>-<time>``, out of results.csv's way."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    destination = out / "replaced" / f"{run_dir.name}-{stamp}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(destination))
    return destination
