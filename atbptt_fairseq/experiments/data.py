"""What every data preparation shares: destinations, staging, markers, text, fairseq-preprocess.

Every preparation ends in the output of ``fairseq-preprocess --only-source``: a directory with
``dict.txt`` and ``{train,valid,test}.{bin,idx}``. The helpers here build that directory in a
temporary sibling and rename it into place only when complete, so an interrupted run (or a full
disk) never leaves a partial directory that looks finished. Every finished data-bin carries a
marker file, ``.atbptt-data-bin.json``, naming the script, its inputs and options, and every file
it wrote; ``--force`` replaces only such a data-bin (or a plain fairseq-preprocess output), never
a directory with anything else in it, the inputs, the working directory or the home directory.
Expected problems (missing file, empty input, bad option, no network, checksum mismatch, input
that is not text, a full disk) end with ``SystemExit("error: ...")``: one line, no traceback.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atbptt_fairseq.experiments import console
from atbptt_fairseq.experiments.console import fail

SPLITS: tuple[str, str, str] = ("train", "valid", "test")


def log(message: str) -> None:
    """One progress line of a preparation on stderr (stdout stays free for data)."""
    console.log(message, "prepare")


# --------------------------------------------------------------------------------------------
# Destination handling: replace only what these scripts wrote; stage in a sibling and rename
# into place when complete.
# --------------------------------------------------------------------------------------------

DATA_BIN_MARKER = ".atbptt-data-bin.json"
# Everything that `fairseq-preprocess --only-source` writes into its --destdir
_PREPROCESS_OUTPUT = re.compile(r"dict\.txt|preprocess\.log|[^/]+\.(bin|idx)")
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class Destination:
    """Where a preparation writes its data-bin (``--dest``), and what must survive that.

    ``--force`` replaces ``--dest`` as a whole, so ``--dest`` may neither be nor contain one of
    the ``inputs`` (files and directories the preparation reads). ``scanned_dirs`` are input
    directories read as a whole: ``--dest`` may not lie inside one either, or the next run would
    read the data-bin as input. ``tool`` and ``options`` are recorded in the data-bin's marker.
    """

    path: Path
    force: bool
    tool: str
    inputs: tuple[Path, ...] = ()
    scanned_dirs: tuple[Path, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataBinRequest:
    """What a preparation's command line asks of its output: the data-bin ``dest`` (``--dest``),
    whether ``force`` (``--force``) may replace one there, and the ``options`` to record in its
    marker."""

    dest: Path
    force: bool
    options: Mapping[str, Any]

    def destination(
        self, tool: str, inputs: tuple[Path, ...] = (), scanned_dirs: tuple[Path, ...] = ()
    ) -> Destination:
        """The :class:`Destination` of preparation ``tool`` reading ``inputs``."""
        return Destination(self.dest, self.force, tool, inputs, scanned_dirs, self.options)


def add_destination_options(parser: argparse.ArgumentParser) -> None:
    """``--dest`` and ``--force``, the options of every preparation."""
    parser.add_argument("--dest", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --dest that holds a data-bin written by these scripts",
    )


def data_bin_request(args: argparse.Namespace) -> DataBinRequest:
    """The request of a preparation's parsed command line; every option but --dest and --force
    is recorded in the marker."""
    options = {name: value for name, value in vars(args).items() if name not in ("dest", "force")}
    return DataBinRequest(args.dest, args.force, options)


def _files_below(directory: Path) -> list[str]:
    """Relative paths of everything below ``directory`` except directories (links included)."""

    def unreadable(error: OSError) -> None:
        raise error

    found = []
    for root, dirs, files in os.walk(directory, onerror=unreadable):
        here = Path(root)
        links = [name for name in dirs if (here / name).is_symlink()]
        for name in files + links:
            found.append((here / name).relative_to(directory).as_posix())
    return sorted(found)


def _writer_and_foreign_files(directory: Path) -> tuple[str, list[str]]:
    """Which tool wrote ``directory``, and the files in it that this tool did not write.

    A data-bin of these scripts carries the marker, which lists every file they wrote. A
    directory without it counts as fairseq-preprocess output if it holds dict.txt, and then
    every file that ``fairseq-preprocess --only-source`` does not write is foreign. Without
    either, every file is foreign.
    """
    present = _files_below(directory)
    try:
        marker = json.loads((directory / DATA_BIN_MARKER).read_text(encoding="utf-8"))
        writer, written = str(marker["written_by"]), set(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        writer, written = "", set()
    if writer:
        return writer, [name for name in present if name not in written | {DATA_BIN_MARKER}]
    if "dict.txt" in present:
        return "fairseq-preprocess", [n for n in present if not _PREPROCESS_OUTPUT.fullmatch(n)]
    return "", present


def _protected_place(path: Path) -> str | None:
    """Why the resolved ``path`` may never be a destination (None if it may)."""
    cwd = Path.cwd().resolve()
    if path == cwd:
        return "it is the working directory"
    if cwd.is_relative_to(path):
        return "it contains the working directory"
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home directory known
        return None
    if path == home:
        return "it is your home directory"
    if home.is_relative_to(path):
        return "it contains your home directory"
    return None


def _listing(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_destination(destination: Destination) -> None:
    """Refuse a ``--dest`` whose (re)placement could lose anything these scripts did not write.

    Checked before any work, and again just before the finished data-bin is renamed into place.
    An existing non-empty ``--dest`` is replaced only with ``--force``, and only when it holds
    nothing but a data-bin written by these scripts or by fairseq-preprocess.
    """
    with reported_os_errors(destination.path):  # e.g. a folder in it that cannot be listed
        _check_destination(destination)


def _check_destination(destination: Destination) -> None:
    dest = destination.path
    option = f"--dest {dest}"
    if dest.is_symlink():
        raise fail(f"{option} is a symbolic link; give the directory itself")
    resolved = dest.resolve()
    why = _protected_place(resolved)
    if why is not None:
        raise fail(
            f"refusing {option}: {why}; give a directory of its own for the data-bin, "
            "e.g. data-bin/NAME"
        )
    for item in destination.inputs:
        if resolved == item.resolve() or item.resolve().is_relative_to(resolved):
            verb = "is" if resolved == item.resolve() else "contains"
            raise fail(
                f"refusing {option}: it {verb} the input {item}; choose a --dest outside the input"
            )
    for directory in destination.scanned_dirs:
        if resolved.is_relative_to(directory.resolve()):
            raise fail(
                f"refusing {option}: it lies inside the input directory {directory}, whose text "
                "files are all read (a later run would read the data-bin as text); choose a "
                "--dest outside it"
            )
    existing = next(path for path in (resolved, *resolved.parents) if path.exists())
    if not existing.is_dir():
        if existing == resolved:
            raise fail(f"{option} is a file, not a directory; choose another --dest")
        raise fail(f"cannot create {option}: {existing} is a file; choose another --dest")
    if existing != resolved or not any(resolved.iterdir()):
        return
    writer, foreign = _writer_and_foreign_files(resolved)
    if foreign:
        raise fail(
            f"{option} already exists and holds files that these scripts did not write "
            f"({_listing(foreign)}); choose another --dest or move them out (--force only "
            "replaces a data-bin written by these scripts or by fairseq-preprocess)"
        )
    if not destination.force:
        raise fail(
            f"{option} already holds a data-bin (written by {writer}); pass --force to replace "
            "it or choose another --dest"
        )


def os_error_line(error: OSError, dest: Path) -> str:
    """The one-line message for a failed read or write while preparing ``dest``."""
    where = f"{error.filename}: " if error.filename else ""
    if error.errno in _NO_SPACE:
        hint = "free some space or choose a --dest on another disk"
    elif error.errno in _NO_ACCESS:
        hint = "check that the input is readable and that --dest's folder is writable"
    else:
        hint = "fix the cause and run again"
    return (
        f"preparing {dest} failed: {where}{error.strerror or error}; nothing was written to "
        f"{dest}; {hint}"
    )


@contextlib.contextmanager
def reported_os_errors(dest: Path) -> Iterator[None]:
    """Turn an OSError (disk full, no permission, ...) into one ``error:`` line naming ``dest``.

    The staging helpers below have already removed what they wrote when this sees the error.
    """
    try:
        yield
    except OSError as error:
        raise fail(os_error_line(error, dest)) from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_marker(stage: Path, destination: Destination) -> None:
    """Record in a finished data-bin who wrote it, from what, and every file it holds."""
    record = {
        "written_by": destination.tool,
        "inputs": [str(path.resolve()) for path in destination.inputs],
        "options": dict(destination.options),
        "files": _files_below(stage),
    }
    text = json.dumps(record, indent=2, default=str) + "\n"
    (stage / DATA_BIN_MARKER).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def staged_directory(destination: Destination) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``--dest``; rename it to ``--dest`` on success.

    On success the marker (:func:`write_marker`) is added before the rename. On any exception
    (including Ctrl-C and a full disk) the temporary directory is removed and ``--dest`` is left
    untouched. With ``force`` an existing ``--dest`` is replaced only after the new one is
    complete, and only as :func:`check_destination` allows.
    """
    check_destination(destination)
    dest = destination.path.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        os.chmod(stage, 0o777 & ~_current_umask())  # mkdtemp makes it private; use normal perms
        yield stage
        write_marker(stage, destination)
        check_destination(destination)  # something may have appeared there in the meantime
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        try:
            os.replace(stage, dest)
        except BaseException:
            if old is not None:
                os.replace(old, dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"wrote {dest}")


@contextlib.contextmanager
def work_directory(dest: Path) -> Iterator[Path]:
    """Yield a scratch directory next to ``dest`` (same disk, large corpora fit); always removed."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.work-", dir=dest.parent) as work:
        yield Path(work)


# --------------------------------------------------------------------------------------------
# Reading text: UTF-8 (or a byte-order mark saying otherwise), never binary data.
# --------------------------------------------------------------------------------------------

# Longest first: the UTF-32-LE mark begins with the UTF-16-LE one
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def text_encoding(path: Path) -> str:
    """UTF-8, unless the file starts with a byte-order mark of UTF-8, -16 or -32 (then skipped)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return next((name for mark, name in _BYTE_ORDER_MARKS if head.startswith(mark)), "utf-8")


def read_text_lines(path: Path) -> Iterator[str]:
    """The lines of a text file; a one-line error for anything that is not text.

    Without a byte-order mark the file must be valid UTF-8 without NUL characters: binary data,
    and UTF-16/32 text without a mark (half its bytes NUL for Latin text), would otherwise
    become a dictionary of garbage tokens.
    """
    encoding = text_encoding(path)
    label = "UTF-8" if encoding == "utf-8" else encoding.upper().replace("-SIG", " with BOM")
    try:
        with open(path, encoding=encoding) as handle:
            for number, line in enumerate(handle, 1):
                if "\0" in line:
                    raise fail(
                        f"{path} is not text: line {number} holds a NUL character (binary "
                        "data, or UTF-16/32 text without a byte-order mark); convert it to UTF-8"
                    )
                yield line
    except UnicodeDecodeError as exc:
        guess = "; Latin-1, or UTF-16 without a byte-order mark?" if encoding == "utf-8" else ""
        raise fail(f"{path} is not {label} text ({exc.reason}{guess}); convert it to UTF-8")


# --------------------------------------------------------------------------------------------
# fairseq-preprocess
# --------------------------------------------------------------------------------------------


def run_preprocess(
    destdir: Path,
    split_files: dict[str, Path],
    *,
    srcdict: Path | None = None,
    nwordssrc: int | None = None,
    thresholdsrc: int | None = None,
    what: str = "text",
) -> None:
    """Binarize the text files of ``split_files`` (split name -> file; train and any of valid and
    test) into ``destdir`` with fairseq-preprocess.

    Each text line becomes one sentence and fairseq appends ``</s>`` to it. The dictionary is
    built from the train split unless ``srcdict`` is given.
    """
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source"]
    for split in SPLITS:
        if split in split_files:
            cmd += [f"--{split}pref", str(split_files[split])]
    cmd += ["--destdir", str(destdir), "--workers", "1"]
    if srcdict is not None:
        cmd += ["--srcdict", str(srcdict)]
    if nwordssrc is not None:
        cmd += ["--nwordssrc", str(nwordssrc)]
    if thresholdsrc is not None:
        cmd += ["--thresholdsrc", str(thresholdsrc)]
    log(f"binarizing {what} with fairseq-preprocess")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise fail(f"fairseq-preprocess failed (exit {proc.returncode}): {last}")
    missing = [
        name
        for name in ["dict.txt"] + [f"{s}.{ext}" for s in split_files for ext in ("bin", "idx")]
        if not (destdir / name).is_file()
    ]
    if missing:
        raise fail(f"fairseq-preprocess did not write {', '.join(missing)} in {destdir}")


# --------------------------------------------------------------------------------------------
# Text: split by lines and write.
# --------------------------------------------------------------------------------------------


def split_counts(n_lines: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Numbers of (train, valid, test) lines for a contiguous split; each split gets >= 1 line."""
    if n_lines == 0:
        raise fail("the input has no non-empty lines; give a file with text in it")
    n_valid = max(1, round(n_lines * valid_fraction))
    n_test = max(1, round(n_lines * test_fraction))
    n_train = n_lines - n_valid - n_test
    if n_train < 1:
        raise fail(
            f"the input has only {n_lines} non-empty lines, too few for a train/valid/test "
            "split; give more text or smaller fractions"
        )
    return n_train, n_valid, n_test


def write_split_files(
    lines: Iterable[str], counts: Sequence[int], out_dir: Path, suffix: str = "txt"
) -> dict[str, Path]:
    """Write consecutive lines to ``out_dir/{train,valid,test}.suffix`` (first train, last test).

    Logs the number of lines and whitespace tokens of each split.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {split: out_dir / f"{split}.{suffix}" for split in SPLITS}
    iterator = iter(lines)
    for split, count in zip(SPLITS, counts):
        tokens = 0
        written = 0
        with open(paths[split], "w", encoding="utf-8") as out:
            for line in iterator:
                out.write(line.rstrip("\n") + "\n")
                tokens += len(line.split())
                written += 1
                if written == count:
                    break
        log(f"{split}: {written} lines, {tokens} tokens")
    return paths


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write one line per item (newline added) and return the number of lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# Checksums, downloads, archives.
# --------------------------------------------------------------------------------------------


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, expected: str, algorithm: str = "md5") -> None:
    """Raise a one-line error when the file's digest differs from ``expected``."""
    actual = file_digest(path, algorithm)
    if actual.lower() != expected.lower():
        raise fail(
            f"checksum mismatch for {path.name}: expected {algorithm} {expected}, got {actual}; "
            "the file is corrupt or not the expected release (delete it and retry)"
        )


def download(
    url: str,
    path: Path,
    expected: str,
    algorithm: str = "md5",
    hint: str = "",
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``path`` and verify its checksum; reuse a verified earlier download.

    The data go to ``path.part`` first, so a broken transfer never looks like a finished file.
    ``hint`` is appended to the offline error (e.g. how to supply the files by hand).
    """
    path = Path(path)
    if path.is_file() and file_digest(path, algorithm) == expected.lower():
        log(f"using verified {path}")
        return path
    part = path.with_name(path.name + ".part")
    log(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise fail(f"cannot download {url} ({reason}); check the network connection{hint}")
    try:
        verify_checksum(part, expected, algorithm)
    except SystemExit:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)
    log(f"downloaded {path.name} ({path.stat().st_size} bytes, {algorithm} ok)")
    return path


def extract_archive(archive: Path, out_dir: Path) -> Path:
    """Extract a .zip, .tgz, .tar.gz or .tar archive into ``out_dir`` (no paths outside it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    log(f"extracting {archive.name}")
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(out_dir)  # zipfile drops absolute paths and '..' components
        elif name.endswith((".tgz", ".tar.gz", ".tar")):
            with tarfile.open(archive) as tf:
                root = out_dir.resolve()
                for member in tf.getmembers():
                    target = (out_dir / member.name).resolve()
                    if not target.is_relative_to(root) or member.issym() or member.islnk():
                        raise fail(f"refusing unsafe member {member.name!r} in {archive.name}")
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(out_dir, **safe)
        else:
            raise fail(f"unknown archive type {archive.name}; expected .zip, .tgz or .tar.gz")
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise fail(f"cannot extract {archive.name} ({exc}); delete it and retry")
    return out_dir
