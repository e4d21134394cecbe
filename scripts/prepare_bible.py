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

from atbptt_fairseq.experiments.bible import prepare_bible
from atbptt_fairseq.experiments.data import add_destination_options, data_bin_request
from atbptt_fairseq.experiments.text_corpus import add_split_options, resolve_fractions


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
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


def main(argv: list[str] | None = None) -> None:
    """Read, tokenize and binarize the King James Bible into --dest."""
    args = build_parser().parse_args(argv)
    prepare_bible(
        data_bin_request(args),
        fractions=resolve_fractions(args),
        max_lines=args.max_lines,
        vocab_size=args.vocab_size,
        install=args.install,
    )


if __name__ == "__main__":
    main()
