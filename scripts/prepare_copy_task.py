"""Generate and binarize the copy task of Aicher, Foti & Fox (UAI 2019).

Six symbols: blank ``_``, start marker ``#`` and four data symbols ``A B C D``. A block of length m
is ``[#, m-1 random data symbols, m blanks]`` (2m tokens); its target block is the same block
shifted right by m: ``[m blanks, #, the m-1 symbols]``. To predict the target the model must
remember the symbols for m steps, so the task needs a truncation length of about m or more.

Each of ``--columns`` columns is one text line of exactly ``steps`` tokens (blocks concatenated,
the last block cut at the line end). Inputs and targets are two token-aligned streams:

    DEST/                 binarized inputs (dict.txt, {train,valid,test}.{bin,idx})
    DEST/targets/         binarized targets, same dict.txt (read with --target-dir targets)
    DEST/raw/             the text files and the 6-symbol dictionary, for inspection

fairseq-preprocess appends ``</s>`` to every line of both streams, so they stay aligned.

    python scripts/prepare_copy_task.py --dest data-bin/copy_m10                 # fixed m = 10
    python scripts/prepare_copy_task.py --dest data-bin/copy_var --variable      # m ~ U{5..10}
"""

from __future__ import annotations

import argparse

from atbptt_fairseq.experiments.copy_task import (
    PAPER_FIXED_LENGTH,
    prepare_copy_task,
    resolve_lengths,
)
from atbptt_fairseq.experiments.data import add_destination_options, data_bin_request


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (defaults are the paper's sizes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_destination_options(parser)
    parser.add_argument(
        "--fixed-length",
        type=int,
        default=None,
        help=f"fixed block length m (default {PAPER_FIXED_LENGTH})",
    )
    parser.add_argument(
        "--variable",
        action="store_true",
        help="variable m ~ U{min..max} per block, paper's 5..10 unless --min/--max-length given",
    )
    parser.add_argument("--min-length", type=int, default=None, help="smallest m (variable mode)")
    parser.add_argument("--max-length", type=int, default=None, help="largest m (variable mode)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=4000,
        help="tokens per train column (default %(default)s)",
    )
    parser.add_argument(
        "--valid-steps",
        type=int,
        default=1000,
        help="tokens per valid column (default %(default)s)",
    )
    parser.add_argument(
        "--test-steps", type=int, default=1000, help="tokens per test column (default %(default)s)"
    )
    parser.add_argument(
        "--columns",
        type=int,
        default=64,
        help="number of columns (lines) in every split (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Generate the three splits, keep the text in DEST/raw and binarize inputs and targets."""
    args = build_parser().parse_args(argv)
    prepare_copy_task(
        data_bin_request(args),
        lengths=resolve_lengths(args.fixed_length, args.variable, args.min_length, args.max_length),
        steps={"train": args.train_steps, "valid": args.valid_steps, "test": args.test_steps},
        columns=args.columns,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
