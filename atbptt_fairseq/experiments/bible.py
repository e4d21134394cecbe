"""Prepare the King James Bible (Debian package ``bible-kjv``) as a word-level LM corpus.

A real English corpus (31,102 verses, about 0.9M words) that installs offline from the
distribution's packages. The text comes from the package's ``bible`` command:

    bible -f Gen1:1-Rev22:21 < /dev/null

``-f`` turns pretty-printing off, so it prints one verse per line, each preceded by its reference
(``Ge1:1 In the beginning ...``); the range is the whole book; stdin from /dev/null keeps it from
entering its interactive prompt. The reference is stripped, leaving one verse per line.

Tokenization (word level): lowercase; words are runs of letters/digits, with inner apostrophes
and hyphens kept (``lord's``, ``well-favoured``); every other non-space character (punctuation
such as ``, . ; : ? ! ( )``) is a token of its own. The verses are then split contiguously like
prepare_text.py (first 90% train, next 5% valid, last 5% test, i.e. the end of the New Testament
is valid/test) and binarized; fairseq appends </s> to every verse.

    python scripts/prepare_bible.py --dest data-bin/kjv
    python scripts/prepare_bible.py --dest data-bin/kjv_small --max-lines 2000 --install
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

from atbptt_fairseq.experiments.console import fail
from atbptt_fairseq.experiments.data import (
    DataBinRequest,
    add_destination_options,
    check_destination,
    data_bin_request,
    log,
    reported_os_errors,
)
from atbptt_fairseq.experiments.text_corpus import (
    add_split_options,
    prepare_lines,
    resolve_fractions,
)

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


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/prepare_bible.py``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_destination_options(parser)
    parser.add_argument(
        "--max-lines", type=int, default=None, help="use only the first N verses (small subset)"
    )
    add_split_options(parser)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="keep the N most frequent train words, the rest become <unk> (default: all)",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="if `bible` is missing and running as root, apt-get install bible-kjv",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Read, tokenize and binarize the King James Bible into --dest."""
    args = build_parser().parse_args(argv)
    prepare_bible(
        data_bin_request(args),
        fractions=resolve_fractions(args),
        max_lines=args.max_lines,
        vocab_size=args.vocab_size,
        install=args.install,
    )
    return 0
