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

The generator (:func:`make_column`) serves ``scripts/bench_gradients.py`` too; the demo calls
:func:`prepare_copy_task`.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from atbptt_fairseq.experiments.console import fail
from atbptt_fairseq.experiments.data import (
    SPLITS,
    DataBinRequest,
    add_destination_options,
    check_destination,
    data_bin_request,
    log,
    reported_os_errors,
    run_preprocess,
    staged_directory,
    write_lines,
)

BLANK = "_"
START = "#"
DATA_SYMBOLS: tuple[str, ...] = ("A", "B", "C", "D")
SYMBOLS: tuple[str, ...] = (BLANK, START) + DATA_SYMBOLS

PAPER_FIXED_LENGTH = 10
PAPER_VARIABLE_LENGTHS = (5, 10)
PAPER_COLUMNS = 64  # the paper's batch: one column a sequence


def make_block(m: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """One input block ``[#, m-1 symbols, m blanks]`` and its target, the block shifted by m."""
    data = [rng.choice(DATA_SYMBOLS) for _ in range(m - 1)]
    inputs = [START] + data + [BLANK] * m
    targets = [BLANK] * m + [START] + data
    return inputs, targets


def make_column(
    steps: int, min_length: int, max_length: int, rng: random.Random
) -> tuple[list[str], list[str]]:
    """Input and target streams of exactly ``steps`` tokens; m ~ U{min..max} for each block."""
    inputs: list[str] = []
    targets: list[str] = []
    while len(inputs) < steps:
        block_in, block_tgt = make_block(rng.randint(min_length, max_length), rng)
        inputs += block_in
        targets += block_tgt
    return inputs[:steps], targets[:steps]


def generate_split(
    steps: int, columns: int, min_length: int, max_length: int, seed: int, split: str
) -> tuple[list[str], list[str]]:
    """Input and target text lines (one per column) of one split.

    Each split has its own random stream derived from (seed, split), so changing the size of
    one split does not change the others.
    """
    rng = random.Random(f"copy-task-{seed}-{split}")
    input_lines: list[str] = []
    target_lines: list[str] = []
    for _ in range(columns):
        inputs, targets = make_column(steps, min_length, max_length, rng)
        input_lines.append(" ".join(inputs))
        target_lines.append(" ".join(targets))
    return input_lines, target_lines


def resolve_lengths(
    fixed_length: int | None, variable: bool, min_length: int | None, max_length: int | None
) -> tuple[int, int]:
    """The (min, max) block length m from --fixed-length / --variable / --min/--max-length."""
    variable = variable or min_length is not None or max_length is not None
    if variable:
        if fixed_length is not None:
            raise fail(
                "--fixed-length cannot be combined with --variable/--min-length/--max-length"
            )
        lo = PAPER_VARIABLE_LENGTHS[0] if min_length is None else min_length
        hi = PAPER_VARIABLE_LENGTHS[1] if max_length is None else max_length
    else:
        lo = hi = PAPER_FIXED_LENGTH if fixed_length is None else fixed_length
    if lo < 1 or lo > hi:
        raise fail(f"block lengths must satisfy 1 <= min <= max, got min {lo} and max {hi}")
    return lo, hi


def write_dictionary(path: Path, train_inputs: list[str]) -> None:
    """Write the fixed 6-symbol dict.txt (order fixes the indices; counts from the train inputs)."""
    counts = Counter(token for line in train_inputs for token in line.split())
    write_lines(path, (f"{symbol} {counts.get(symbol, 0)}" for symbol in SYMBOLS))


def prepare_copy_task(
    request: DataBinRequest,
    *,
    lengths: tuple[int, int],
    steps: Mapping[str, int],
    columns: int,
    seed: int,
) -> None:
    """Generate the three splits (``steps``: tokens per column of each; block lengths m in
    ``lengths``), keep the text in ``raw/`` of the data-bin and binarize inputs and targets as
    ``request`` asks."""
    min_length, max_length = lengths
    for split, n in steps.items():
        if n < 1:
            raise fail(f"--{split}-steps must be at least 1, got {n}")
    if columns < 1:
        raise fail(f"--columns must be at least 1, got {columns}")
    destination = request.destination("prepare_copy_task.py")
    check_destination(destination)

    with reported_os_errors(request.dest), staged_directory(destination) as stage:
        raw = stage / "raw"
        inputs: dict[str, Path] = {}
        targets: dict[str, Path] = {}
        train_inputs: list[str] = []
        for split in SPLITS:
            input_lines, target_lines = generate_split(
                steps[split], columns, min_length, max_length, seed, split
            )
            inputs[split] = raw / f"{split}.input.txt"
            targets[split] = raw / f"{split}.target.txt"
            write_lines(inputs[split], input_lines)
            write_lines(targets[split], target_lines)
            if split == "train":
                train_inputs = input_lines
            log(
                f"{split}: {columns} columns x {steps[split]} steps "
                f"(m in {min_length}..{max_length})"
            )
        symbols = raw / "dict.txt"
        write_dictionary(symbols, train_inputs)
        run_preprocess(stage, inputs, srcdict=symbols, what="inputs")
        run_preprocess(stage / "targets", targets, srcdict=stage / "dict.txt", what="targets")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/prepare_copy_task.py`` (defaults are the paper's sizes)."""
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
        default=PAPER_COLUMNS,
        help="number of columns (lines) in every split (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the three splits, keep the text in DEST/raw and binarize inputs and targets."""
    args = build_parser().parse_args(argv)
    prepare_copy_task(
        data_bin_request(args),
        lengths=resolve_lengths(args.fixed_length, args.variable, args.min_length, args.max_length),
        steps={"train": args.train_steps, "valid": args.valid_steps, "test": args.test_steps},
        columns=args.columns,
        seed=args.seed,
    )
    return 0
