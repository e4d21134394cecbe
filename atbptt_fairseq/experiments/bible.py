"""The King James Bible (Debian package ``bible-kjv``) as a word-level LM corpus.

What ``scripts/prepare_bible.py`` does: read every verse from the package's ``bible`` command
(installing it with apt-get when allowed), strip the references, lowercase and split punctuation
off, then split and binarize the verses as :mod:`text_corpus` does; its docstring says more.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from atbptt_fairseq.experiments.console import fail
from atbptt_fairseq.experiments.data import (
    DataBinRequest,
    check_destination,
    log,
    reported_os_errors,
)
from atbptt_fairseq.experiments.text_corpus import prepare_lines

BIBLE_COMMAND = ("bible", "-f", "Gen1:1-Rev22:21")
REFERENCE = re.compile(r"^\S*?\d+:\d+\s+")
TOKEN = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*|[^\w\s]|_")
MISSING = "the `bible` command is missing; install it with `apt-get install bible-kjv`"


def install_bible() -> None:
    """Install bible-kjv with apt-get (running `apt-get update` first only if needed)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "bible-kjv"]
    log("installing bible-kjv with apt-get")
    if subprocess.run(install, check=False, env=env, capture_output=True).returncode == 0:
        return
    log("apt-get install failed; running apt-get update and retrying")
    subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True)
    proc = subprocess.run(install, check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        raise fail(f"apt-get install -y bible-kjv failed: {lines[-1]}")


def ensure_bible(install: bool) -> None:
    """Make sure the `bible` command exists, installing it when allowed (root and --install)."""
    if shutil.which(BIBLE_COMMAND[0]) is not None:
        return
    if not install:
        raise fail(f"{MISSING} (or rerun with --install as root)")
    if os.geteuid() != 0:
        raise fail(f"{MISSING} as root; --install only works when running as root")
    install_bible()
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise fail("bible-kjv was installed but the `bible` command is still not on PATH")


def read_verses() -> list[str]:
    """Every verse of the King James Bible, one per line, without its reference."""
    proc = subprocess.run(
        BIBLE_COMMAND, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise fail(f"`{' '.join(BIBLE_COMMAND)}` failed with exit status {proc.returncode}")
    verses = []
    for line in proc.stdout.splitlines():
        match = REFERENCE.match(line)
        if match:
            verses.append(line[match.end() :].strip())
    if not verses:
        raise fail(f"`{' '.join(BIBLE_COMMAND)}` printed no verses; is bible-kjv-text installed?")
    return verses


def tokenize(verse: str) -> str:
    """Lowercase and split punctuation off as separate tokens."""
    return " ".join(TOKEN.findall(verse.lower()))


def prepare_bible(
    request: DataBinRequest,
    *,
    fractions: tuple[float, float],
    max_lines: int | None = None,
    vocab_size: int | None = None,
    install: bool = False,
) -> None:
    """Read, tokenize, split (``fractions``: of valid and test) and binarize the King James
    Bible (its first ``max_lines`` verses) as ``request`` asks."""
    if max_lines is not None and max_lines < 3:
        raise fail(f"--max-lines must be at least 3 (one line per split), got {max_lines}")
    destination = request.destination("prepare_bible.py")
    with reported_os_errors(request.dest):
        check_destination(destination)
        ensure_bible(install)
        verses = read_verses()
        log(f"read {len(verses)} verses from `{' '.join(BIBLE_COMMAND)}`")
        lines = [text for text in (tokenize(verse) for verse in verses[:max_lines]) if text]
        prepare_lines(
            lambda: iter(lines),
            destination,
            valid_fraction=fractions[0],
            test_fraction=fractions[1],
            vocab_size=vocab_size,
        )
