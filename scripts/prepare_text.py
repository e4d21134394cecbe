"""Turn any raw text (a file, or a directory of .txt files) into a binarized LM corpus.

The lines are split contiguously: the first lines are train, then valid, and the last lines test
(``--valid-fraction`` / ``--test-fraction``, 5% each by default, or ``--split-ratio 90,5,5``).
Contiguous rather than shuffled so that the text keeps its order, which a recurrent model that
carries its state across lines relies on. Empty lines are dropped; fairseq appends </s> to every
kept line.

Two tokenizations:
    word level (default)   whitespace tokens, optional --lowercase; --vocab-size N keeps the N most
                           frequent train words, the rest become <unk> (fairseq --nwordssrc)
    subwords               --spm-vocab-size N trains SentencePiece on the train split, saves the
                           model as DEST/spm.model and encodes every split to pieces

    python scripts/prepare_text.py --input book.txt --dest data-bin/book --lowercase
    python scripts/prepare_text.py --input texts/ --dest data-bin/texts_spm --spm-vocab-size 8000

A directory is read as every *.txt file below it, at any depth, in the order of their paths
below it (sorted, so the same tree gives the same corpus); hidden files and folders (a name
starting with ".") and symbolic links to folders are skipped, and the log says how many files were
skipped. Text must be UTF-8; a file that starts with a byte-order mark is read in the encoding the
mark names (UTF-8, UTF-16 or UTF-32, the mark dropped). Anything else (invalid UTF-8, NUL bytes as
in binary data or UTF-16 without a mark) is refused with a line naming the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atbptt_fairseq.experiments.data import add_destination_options, data_bin_request
from atbptt_fairseq.experiments.text_corpus import (
    add_split_options,
    prepare_text,
    resolve_fractions,
)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a text file, or a directory: every .txt file below it (hidden ones skipped)",
    )
    add_destination_options(parser)
    add_split_options(parser)
    parser.add_argument("--lowercase", action="store_true", help="lowercase the text")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="word level: keep the N most frequent train words, the rest become <unk>",
    )
    parser.add_argument(
        "--spm-vocab-size",
        type=int,
        default=None,
        help="use SentencePiece subwords with this vocabulary size (model saved as DEST/spm.model)",
    )
    parser.add_argument(
        "--spm-model-type",
        choices=("unigram", "bpe", "char", "word"),
        default="unigram",
        help="SentencePiece model type (with --spm-vocab-size)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Read the input, split it contiguously and binarize it into --dest."""
    args = build_parser().parse_args(argv)
    prepare_text(
        args.input,
        data_bin_request(args),
        fractions=resolve_fractions(args),
        lowercase=args.lowercase,
        vocab_size=args.vocab_size,
        spm_vocab_size=args.spm_vocab_size,
        spm_model_type=args.spm_model_type,
    )


if __name__ == "__main__":
    main()
