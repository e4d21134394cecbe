"""Turn any raw text (a file, or a directory of .txt files) into a binarized LM corpus.

The lines are split contiguously: the first lines are train, then valid, and the last lines test
(``--valid-fraction`` / ``--test-fraction``, 5% each by default, or ``--split-ratio 90,5,5``).
Contiguous rather than shuffled so that the text keeps its order, which a recurrent model that
carries its state across lines relies on. Empty lines are dropped; fairseq appends </s> to every
kept line. For a directory of documents whose last files are unlike the rest (the tail of an
alphabetical listing can be one kind of page), ``--split-by-file`` draws whole files for valid and
test from all over the directory instead (:func:`split_files_by_lines`).

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

The line splitting and binarization (:func:`prepare_lines`, :func:`add_split_options`) serve
``scripts/prepare_bible.py`` too.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from atbptt_fairseq.experiments.console import fail
from atbptt_fairseq.experiments.data import (
    SPLITS,
    DataBinRequest,
    Destination,
    add_destination_options,
    check_destination,
    data_bin_request,
    log,
    read_text_lines,
    reported_os_errors,
    run_preprocess,
    split_counts,
    staged_directory,
    work_directory,
    write_lines,
    write_split_files,
)

FAIRSEQ_SPECIAL_SYMBOLS = 4  # <s>, <pad>, </s>, <unk> come first in every fairseq dictionary
SPM_BATCH_LINES = 10000
MAX_FILE_SHARE = 0.25  # --split-by-file: the most of a split's lines one file may hold


def list_input_files(path: Path) -> list[Path]:
    """The text files to read: the file itself, or every *.txt below a directory (any depth).

    Sorted by their path below ``path``; hidden files and folders and linked folders skipped.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise fail(f"input {path} does not exist; give a text file or a directory of .txt files")

    def unreadable(error: OSError) -> None:
        raise error

    files: list[Path] = []
    skipped = 0
    for root, dirs, names in os.walk(path, onerror=unreadable):
        here = Path(root)
        kept_dirs = [d for d in dirs if not d.startswith(".") and not (here / d).is_symlink()]
        skipped += len(dirs) - len(kept_dirs)
        dirs[:] = kept_dirs
        for name in names:
            if name.endswith(".txt") and not name.startswith(".") and (here / name).is_file():
                files.append(here / name)
            else:
                skipped += 1
    files.sort(key=lambda file: file.relative_to(path).parts)
    if not files:
        raise fail(f"directory {path} contains no .txt files; give a text file or directory")
    note = f" (skipped {skipped} other files, hidden files or folders, or linked folders)"
    log(f"reading {len(files)} .txt files below {path}{note if skipped else ''}")
    return files


def normalize_line(line: str, lowercase: bool) -> str:
    """Whitespace-tokenize a line and join the tokens with single spaces."""
    text = " ".join(line.split())
    return text.lower() if lowercase else text


def iter_text_lines(files: list[Path], lowercase: bool) -> Iterator[str]:
    """Non-empty normalized lines of all files, in order."""
    for path in files:
        for line in read_text_lines(path):
            text = normalize_line(line, lowercase)
            if text:
                yield text


def split_files_by_lines(
    line_counts: Sequence[int], fractions: tuple[float, float], seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Indices of the (train, valid, test) files: valid and test take whole files, drawn in a
    seeded random order, each file only if it fits in what the split still lacks of its
    fraction of the lines and holds at most a quarter of them (so that a split holds at least
    four files and no one unusual file fills it); train keeps the rest. Every split keeps its
    files in their order."""
    total = sum(line_counts)
    order = list(range(len(line_counts)))
    random.Random(seed).shuffle(order)
    chosen: list[list[int]] = []
    taken: set[int] = set()
    for fraction in fractions:
        room = round(total * fraction)
        largest = room * MAX_FILE_SHARE
        picked = []
        for index in order:
            if index not in taken and 0 < line_counts[index] <= min(room, largest):
                picked.append(index)
                taken.add(index)
                room -= line_counts[index]
        if not picked:
            raise fail(
                "--split-by-file found no file small enough for a split of "
                f"{fraction:g} of {total} lines; give more files or larger fractions"
            )
        chosen.append(sorted(picked))
    train = [index for index in range(len(line_counts)) if index not in taken]
    if not any(line_counts[index] for index in train):
        raise fail("--split-by-file left no lines for train; give more files or smaller fractions")
    return train, chosen[0], chosen[1]


def parse_split_ratio(text: str) -> tuple[float, float]:
    """(valid, test) fractions from 'train,valid,test' weights such as '90,5,5' or '0.8:0.1:0.1'."""
    parts = text.replace(":", ",").split(",")
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) <= 0:
        raise fail(f"--split-ratio wants three positive numbers like 90,5,5, got {text!r}")
    total = sum(weights)
    return weights[1] / total, weights[2] / total


def resolve_fractions(args: argparse.Namespace) -> tuple[float, float]:
    """(valid, test) fractions from --split-ratio or --valid-/--test-fraction."""
    if args.split_ratio is not None:
        if args.valid_fraction is not None or args.test_fraction is not None:
            raise fail("--split-ratio cannot be combined with --valid-fraction/--test-fraction")
        return parse_split_ratio(args.split_ratio)
    valid = 0.05 if args.valid_fraction is None else args.valid_fraction
    test = 0.05 if args.test_fraction is None else args.test_fraction
    if not (0 < valid < 1 and 0 < test < 1 and valid + test < 1):
        raise fail(
            f"fractions must be in (0, 1) with valid + test < 1, got valid {valid} and test {test}"
        )
    return valid, test


def train_sentencepiece(train: Path, model_prefix: Path, vocab_size: int, model_type: str) -> Path:
    """Train a SentencePiece model on the train split; returns the .model path."""
    import sentencepiece as spm

    log(f"training SentencePiece ({model_type}, vocabulary {vocab_size}) on {train.name}")
    try:
        spm.SentencePieceTrainer.train(
            input=str(train),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            bos_id=-1,
            eos_id=-1,
            minloglevel=2,
        )
    except (RuntimeError, OSError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        message = lines[-1].rsplit("] ", 1)[-1]  # drop sentencepiece's source location
        raise fail(f"SentencePiece training failed: {message}")
    return model_prefix.with_suffix(".model")


def encode_file(model: Path, source: Path, target: Path) -> None:
    """Encode every line of ``source`` to space-separated pieces in ``target``."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model))

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        with open(source, encoding="utf-8") as handle:
            for line in handle:
                batch.append(line.rstrip("\n"))
                if len(batch) == SPM_BATCH_LINES:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def pieces() -> Iterator[str]:
        for batch in batches():
            for encoded in processor.encode(batch, out_type=str):
                yield " ".join(encoded)

    write_lines(target, pieces())


def check_request(
    destination: Destination, vocab_size: int | None, spm_vocab_size: int | None
) -> None:
    """Fail on a bad tokenization or destination before any input is read (reading can be long)."""
    if vocab_size is not None and spm_vocab_size is not None:
        raise fail("--vocab-size and --spm-vocab-size exclude each other; choose one")
    for name, value in (("--vocab-size", vocab_size), ("--spm-vocab-size", spm_vocab_size)):
        if value is not None and value < 1:
            raise fail(f"{name} must be a positive number, got {value}")
    check_destination(destination)


def prepare_lines(
    read_lines: Callable[[], Iterable[str]],
    destination: Destination,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    vocab_size: int | None = None,
    spm_vocab_size: int | None = None,
    spm_model_type: str = "unigram",
    counts: tuple[int, int, int] | None = None,
) -> None:
    """Split normalized non-empty lines into train/valid/test, tokenize and binarize them.

    ``read_lines`` is called twice (count, then write) so large inputs are streamed, not held.
    ``counts``: the (train, valid, test) lines, instead of the fractions' contiguous split (the
    caller counted them: the lines are then read once).
    """
    check_request(destination, vocab_size, spm_vocab_size)
    if counts is None:
        n_lines = sum(1 for _ in read_lines())
        counts = split_counts(n_lines, valid_fraction, test_fraction)
    else:
        n_lines = sum(counts)
    log(f"read {n_lines} non-empty lines")

    with work_directory(destination.path) as work, staged_directory(destination) as stage:
        splits = write_split_files(read_lines(), counts, work)
        if spm_vocab_size is None:
            nwords = None if vocab_size is None else vocab_size + FAIRSEQ_SPECIAL_SYMBOLS
            run_preprocess(stage, splits, nwordssrc=nwords, what="words")
            return
        model = train_sentencepiece(splits["train"], stage / "spm", spm_vocab_size, spm_model_type)
        encoded = {split: work / f"{split}.spm" for split in SPLITS}
        for split in SPLITS:
            encode_file(model, splits[split], encoded[split])
        with open(encoded["train"], encoding="utf-8") as handle:
            n_pieces = sum(len(line.split()) for line in handle)
        log(f"train: {n_pieces} pieces")
        run_preprocess(stage, encoded, what="pieces")


def add_split_options(parser: argparse.ArgumentParser) -> None:
    """--valid-fraction, --test-fraction and --split-ratio (shared with prepare_bible.py)."""
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help="fraction of lines (after train) for valid (default 0.05)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="fraction of lines (the last ones) for test (default 0.05)",
    )
    parser.add_argument(
        "--split-ratio",
        default=None,
        help="train,valid,test weights instead of the fractions, e.g. 90,5,5",
    )


def prepare_text(
    input_path: Path,
    request: DataBinRequest,
    *,
    fractions: tuple[float, float],
    lowercase: bool = False,
    vocab_size: int | None = None,
    spm_vocab_size: int | None = None,
    spm_model_type: str = "unigram",
    split_seed: int | None = None,
) -> None:
    """Read ``input_path`` (a file or a directory), split it into train, valid and test
    (``fractions``: of valid and test; contiguously, or with ``split_seed`` by whole files,
    :func:`split_files_by_lines`) and binarize it as ``request`` asks."""
    destination = request.destination(
        "prepare_text.py",
        inputs=(input_path,),
        scanned_dirs=(input_path,) if input_path.is_dir() else (),
    )
    with reported_os_errors(request.dest):
        files = list_input_files(input_path)
        counts = None
        if split_seed is not None:
            if not input_path.is_dir():
                raise fail("--split-by-file needs a directory of .txt files as --input")
            check_request(destination, vocab_size, spm_vocab_size)  # before counting every file
            per_file = [sum(1 for _ in iter_text_lines([file], lowercase)) for file in files]
            groups = split_files_by_lines(per_file, fractions, split_seed)
            counts = tuple(sum(per_file[index] for index in group) for group in groups)
            log(
                "split by file: "
                + ", ".join(f"{split} {len(g)} files" for split, g in zip(SPLITS, groups))
            )
            files = [files[index] for group in groups for index in group]
        prepare_lines(
            lambda: iter_text_lines(files, lowercase),
            destination,
            counts=counts,
            valid_fraction=fractions[0],
            test_fraction=fractions[1],
            vocab_size=vocab_size,
            spm_vocab_size=spm_vocab_size,
            spm_model_type=spm_model_type,
        )


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/prepare_text.py``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a text file, or a directory: every .txt file below it (hidden ones skipped)",
    )
    add_destination_options(parser)
    add_split_options(parser)
    parser.add_argument(
        "--split-by-file",
        type=int,
        default=None,
        metavar="SEED",
        help="a directory: draw whole files for valid and test from all over it (seeded) "
        "instead of taking its last lines",
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    """Read the input, split it (contiguously, or by file) and binarize it into --dest."""
    args = build_parser().parse_args(argv)
    prepare_text(
        args.input,
        data_bin_request(args),
        fractions=resolve_fractions(args),
        lowercase=args.lowercase,
        vocab_size=args.vocab_size,
        spm_vocab_size=args.spm_vocab_size,
        spm_model_type=args.spm_model_type,
        split_seed=args.split_by_file,
    )
    return 0
