"""Shared helpers of the data-preparation scripts.

Every preparation ends in the output of ``fairseq-preprocess --only-source``: a directory with
``dict.txt`` and ``{train,valid,test}.{bin,idx}``. The helpers here build that directory in a
temporary sibling and rename it into place only when complete, so an interrupted run never leaves
a partial directory that looks finished. Expected problems (missing file, empty input, bad option,
no network, checksum mismatch) end with ``SystemExit("error: ...")``: one line, no traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

SPLITS: tuple[str, str, str] = ("train", "valid", "test")


def log(message: str) -> None:
    """Print one short progress line to stderr (stdout stays free for data)."""
    print(f"[prepare] {message}", file=sys.stderr, flush=True)


def fail(message: str) -> SystemExit:
    """Return the one-line user-facing error for ``raise fail(...)``."""
    return SystemExit(f"error: {message}")


# --------------------------------------------------------------------------------------------
# Destination handling: refuse to overwrite, stage in a sibling, rename when complete.
# --------------------------------------------------------------------------------------------


def check_destination(dest: Path, force: bool) -> None:
    """Refuse an existing non-empty destination unless ``force`` (checked before any work)."""
    if dest.exists() and not dest.is_dir():
        raise fail(f"destination {dest} exists and is not a directory; choose another --dest")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise fail(
            f"destination {dest} already exists and is not empty; "
            "pass --force to replace it or choose another --dest"
        )


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_directory(dest: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest``; rename it to ``dest`` on success.

    On any exception (including Ctrl-C) the temporary directory is removed and ``dest`` is left
    untouched. With ``force`` an existing ``dest`` is replaced only after the new one is complete.
    """
    dest = Path(dest)
    check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(stage, 0o777 & ~_current_umask())  # mkdtemp makes it private; use normal perms
    try:
        yield stage
        check_destination(dest, force)  # something may have appeared there in the meantime
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(stage, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"wrote {dest}")


@contextlib.contextmanager
def work_directory(dest: Path) -> Iterator[Path]:
    """Yield a scratch directory next to ``dest`` (same disk, large corpora fit); always removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.work-", dir=dest.parent) as work:
        yield Path(work)


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
    """Binarize the train/valid/test text files into ``destdir`` with fairseq-preprocess.

    Each text line becomes one sentence and fairseq appends ``</s>`` to it. The dictionary is
    built from the train split unless ``srcdict`` is given.
    """
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.preprocess",
        "--only-source",
        "--trainpref",
        str(split_files["train"]),
        "--validpref",
        str(split_files["valid"]),
        "--testpref",
        str(split_files["test"]),
        "--destdir",
        str(destdir),
        "--workers",
        "1",
    ]
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
        for name in ["dict.txt"] + [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")]
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
