"""Download (or take from disk) and binarize a standard word-level language-modelling corpus.

Corpora:
    ptb          Mikolov's Penn Treebank (ptb.train.txt / ptb.valid.txt / ptb.test.txt; 10k words,
                 rare words already replaced by <unk>)
    wikitext2    WikiText-2 v1, tokenized (wikitext-2/wiki.{train,valid,test}.tokens)
    wikitext103  WikiText-103 v1, tokenized (wikitext-103/wiki.{train,valid,test}.tokens)

Word level: lines are kept as they are and fairseq appends the end-of-sentence symbol </s> to every
line; the empty lines of WikiText are dropped. The dictionary is built from the train split with no
cut-off (both corpora come with their own <unk> replacement).

    python scripts/prepare_lm_corpus.py --corpus ptb --dest data-bin/ptb
    python scripts/prepare_lm_corpus.py --corpus wikitext2 --dest data-bin/wikitext2 \\
        --source-dir ~/data/wikitext-2          # an already-extracted copy, no download

Downloads are checked against the MD5 sums that torchtext uses and kept in --download-dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atbptt_fairseq.experiments.data import add_destination_options, data_bin_request
from atbptt_fairseq.experiments.lm_corpora import CORPORA, prepare_lm_corpus


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=sorted(CORPORA), required=True, help="which corpus")
    add_destination_options(parser)
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=None,
        help="use an already-downloaded/extracted copy in the release's layout (no download)",
    )
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="where downloads are kept and reused (default: DEST's parent/downloads)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help="fetch the release files by name from this base URL instead (checksums still checked)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Get the corpus, check it and binarize it into --dest."""
    args = build_parser().parse_args(argv)
    prepare_lm_corpus(
        args.corpus,
        data_bin_request(args),
        source_dir=args.source_dir,
        download_dir=args.download_dir,
        base_url=args.base_url,
    )


if __name__ == "__main__":
    main()
