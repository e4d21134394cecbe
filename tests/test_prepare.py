"""Tests of the data-preparation scripts (tiny inputs; e2e ones run fairseq-preprocess)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import load_script

from atbptt_fairseq.experiments import bible, copy_task, lm_corpora, text_corpus
from atbptt_fairseq.experiments import data as data_bin

prepare_bible = load_script("prepare_bible")
prepare_copy_task = load_script("prepare_copy_task")
prepare_lm_corpus = load_script("prepare_lm_corpus")
prepare_text = load_script("prepare_text")

SPLITS = ("train", "valid", "test")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def load_split(dest: Path, split: str) -> list[list[str]]:
    """Token strings of every sentence of a binarized split (with the trailing </s>)."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(dest / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(dest / split), dictionary)
    assert dataset is not None, f"no binarized {split} in {dest}"
    return [[dictionary[i] for i in dataset[k].tolist()] for k in range(len(dataset))]


def check_blocks(inputs: list[str], targets: list[str]) -> list[int]:
    """Assert every block's target is the input block shifted by m; return the complete blocks' m.

    Blocks start at the '#' markers of the input; the last block is cut at the line end, and its
    m is where its target's '#' is (if the cut left it in).
    """
    assert len(inputs) == len(targets)
    starts = [i for i, tok in enumerate(inputs) if tok == "#"]
    assert starts and starts[0] == 0
    lengths = []
    for begin, end in zip(starts, starts[1:] + [len(inputs)]):
        block, target = inputs[begin:end], targets[begin:end]
        complete = end < len(inputs)
        if complete:
            m = (end - begin) // 2
            assert end - begin == 2 * m
            lengths.append(m)
        elif "#" in target:
            m = target.index("#")
        else:  # cut before the copy starts: the target is blank so far
            assert set(target) == {"_"} and set(block[1:]) <= set("ABCD_")
            continue
        assert set(block[1:m]) <= set("ABCD") and set(block[m:]) <= {"_"}
        assert target == (["_"] * m + block[:m])[: len(target)]
    return lengths


def error_of(excinfo: pytest.ExceptionInfo) -> str:
    """The message of a user-facing SystemExit (must be a one-line 'error: ...')."""
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def write_text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def fake_corpus_lines(n: int, offset: int = 0) -> list[str]:
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "<unk>", "N", "ran"]
    return [
        " " + " ".join(words[(i * 7 + j * 3 + offset) % len(words)] for j in range(3 + i % 5))
        for i in range(n)
    ]


def no_leftovers(parent: Path) -> None:
    """No staging or scratch directories left next to the destination."""
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------
# copy task
# ------------------------------------------------------------------------------------------------


def test_copy_task_fixed_shapes_and_shift() -> None:
    inputs, targets = copy_task.generate_split(57, 3, 10, 10, seed=1, split="train")
    assert len(inputs) == len(targets) == 3
    for inp, tgt in zip(inputs, targets):
        inp_tokens, tgt_tokens = inp.split(), tgt.split()
        assert len(inp_tokens) == len(tgt_tokens) == 57
        assert set(check_blocks(inp_tokens, tgt_tokens)) == {10}


def test_copy_task_variable_lengths() -> None:
    inputs, targets = copy_task.generate_split(400, 4, 5, 10, seed=3, split="valid")
    lengths = []
    for inp, tgt in zip(inputs, targets):
        assert len(inp.split()) == 400
        lengths += check_blocks(inp.split(), tgt.split())
    assert set(lengths) <= set(range(5, 11)) and len(set(lengths)) > 2


def test_copy_task_determinism() -> None:
    first = copy_task.generate_split(100, 2, 5, 10, seed=7, split="train")
    assert first == copy_task.generate_split(100, 2, 5, 10, seed=7, split="train")
    assert first != copy_task.generate_split(100, 2, 5, 10, seed=8, split="train")
    assert first != copy_task.generate_split(100, 2, 5, 10, seed=7, split="test")


def test_copy_task_length_options(tmp_path: Path) -> None:
    def lengths(argv: list[str]) -> tuple[int, int]:
        args = copy_task.build_parser().parse_args(argv)
        return copy_task.resolve_lengths(
            args.fixed_length, args.variable, args.min_length, args.max_length
        )

    assert lengths(["--dest", "x"]) == (10, 10)
    assert lengths(["--dest", "x", "--variable"]) == (5, 10)
    assert lengths(["--dest", "x", "--max-length", "8"]) == (5, 8)
    for bad in (["--min-length", "7", "--max-length", "3"], ["--fixed-length", "4", "--variable"]):
        with pytest.raises(SystemExit) as excinfo:
            prepare_copy_task.main(["--dest", str(tmp_path / "c"), *bad])
        error_of(excinfo)
    assert not (tmp_path / "c").exists()


@pytest.mark.e2e
def test_copy_task_binarized(tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    sizes = ["--train-steps", "60", "--valid-steps", "30", "--test-steps", "25", "--columns", "4"]
    prepare_copy_task.main(["--dest", str(dest), "--variable", "--seed", "5", *sizes])
    targets_dir = dest / "targets"
    assert (dest / "dict.txt").read_text() == (targets_dir / "dict.txt").read_text()
    symbols = [line.split()[0] for line in (dest / "dict.txt").read_text().splitlines()]
    assert symbols == ["_", "#", "A", "B", "C", "D"]
    for split, steps in zip(SPLITS, (60, 30, 25)):
        inputs, targets = load_split(dest, split), load_split(targets_dir, split)
        assert len(inputs) == len(targets) == 4
        raw = (dest / "raw" / f"{split}.input.txt").read_text().splitlines()
        for k, (inp, tgt) in enumerate(zip(inputs, targets)):
            assert len(inp) == len(tgt) == steps + 1 and inp[-1] == tgt[-1] == "</s>"
            assert inp[:-1] == raw[k].split()
            check_blocks(inp[:-1], tgt[:-1])
    no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------
# common helpers
# ------------------------------------------------------------------------------------------------


def test_split_counts() -> None:
    assert data_bin.split_counts(100, 0.05, 0.05) == (90, 5, 5)
    assert data_bin.split_counts(3, 0.05, 0.05) == (1, 1, 1)
    with pytest.raises(SystemExit) as excinfo:
        data_bin.split_counts(2, 0.05, 0.05)
    assert "too few" in error_of(excinfo)


def test_download_checksum_ok_mismatch_offline(tmp_path: Path) -> None:
    source = write_text(tmp_path / "remote" / "file.txt", ["hello world"])
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    target = tmp_path / "downloads" / "file.txt"
    data_bin.download(source.as_uri(), target, md5)
    assert target.read_bytes() == source.read_bytes()
    target.unlink()
    with pytest.raises(SystemExit) as excinfo:
        data_bin.download(source.as_uri(), target, "0" * 32)
    assert "checksum mismatch" in error_of(excinfo)
    assert not target.exists() and not target.with_name("file.txt.part").exists()
    with pytest.raises(SystemExit) as excinfo:
        data_bin.download((tmp_path / "missing.zip").as_uri(), target, md5)
    assert "cannot download" in error_of(excinfo)


def test_staged_directory_cleans_up_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    destination = data_bin.Destination(dest, False, "test")
    with pytest.raises(RuntimeError), data_bin.staged_directory(destination) as stage:
        (stage / "train.bin").write_text("partial")
        raise RuntimeError("interrupted")
    assert not dest.exists()
    no_leftovers(tmp_path)


def test_interrupted_preprocess_leaves_no_destination(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_corpus, "run_preprocess", broken)
    source = write_text(tmp_path / "in.txt", ["a b c"] * 30)
    with pytest.raises(KeyboardInterrupt):
        prepare_text.main(["--input", str(source), "--dest", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    source = write_text(tmp_path / "in.txt", ["a b c"] * 30)
    for main, args in (
        (prepare_text.main, ["--input", str(source)]),
        (prepare_copy_task.main, []),
        (prepare_lm_corpus.main, ["--corpus", "ptb", "--source-dir", str(tmp_path)]),
        (prepare_bible.main, []),
    ):
        for force in ([], ["--force"]):  # --force does not replace what the scripts did not write
            with pytest.raises(SystemExit) as excinfo:
                main([*args, "--dest", str(dest), *force])
            message = error_of(excinfo)
            assert "did not write (keep.txt)" in message and "pass --force" not in message
    assert (dest / "keep.txt").read_text() == "precious"


# ------------------------------------------------------------------------------------------------
# prepare_text
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_text_empty_input(tmp_path: Path, content: str) -> None:
    source = tmp_path / "empty.txt"
    source.write_text(content)
    with pytest.raises(SystemExit) as excinfo:
        prepare_text.main(["--input", str(source), "--dest", str(tmp_path / "out")])
    assert "no non-empty lines" in error_of(excinfo)
    assert not (tmp_path / "out").exists()


def test_text_bad_inputs_and_options(tmp_path: Path) -> None:
    dest = ["--dest", str(tmp_path / "out")]
    (tmp_path / "nothing").mkdir()
    source = write_text(tmp_path / "in.txt", ["a b"] * 20)
    for args in (
        ["--input", str(tmp_path / "missing.txt")],
        ["--input", str(tmp_path / "nothing")],
        ["--input", str(source), "--valid-fraction", "0.6", "--test-fraction", "0.5"],
        ["--input", str(source), "--split-ratio", "90,5"],
        ["--input", str(source), "--split-ratio", "8,1,1", "--test-fraction", "0.1"],
        ["--input", str(source), "--vocab-size", "10", "--spm-vocab-size", "10"],
        ["--input", str(source), "--vocab-size", "0"],
    ):
        with pytest.raises(SystemExit) as excinfo:
            prepare_text.main([*args, *dest])
        error_of(excinfo)
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_text_word_level_vocab_and_force(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    lines = [f"The Cat {'sat ' * (i % 3)}on mat{i % 40} ." for i in range(200)]
    write_text(texts / "a.txt", lines[:120] + ["", "   "])
    write_text(texts / "b.txt", lines[120:])
    (texts / "notes.md").write_text("ignored\n")
    dest = tmp_path / "words"
    args = ["--input", str(texts), "--dest", str(dest), "--lowercase", "--split-ratio", "8,1,1"]
    prepare_text.main([*args, "--vocab-size", "5"])
    train, valid, test = (load_split(dest, split) for split in SPLITS)
    assert (len(train), len(valid), len(test)) == (160, 20, 20)
    real_words = [w for w in (dest / "dict.txt").read_text().split()[::2] if "madeup" not in w]
    assert len(real_words) == 5 and "the" in real_words and "The" not in real_words
    for sentence, line in ((valid[0], lines[160]), (test[-1], lines[-1])):
        expected = [w if w in real_words else "<unk>" for w in line.lower().split()]
        assert sentence == expected + ["</s>"]
    assert any("<unk>" in sentence for sentence in train)

    with pytest.raises(SystemExit) as excinfo:
        prepare_text.main(args)
    assert "--force" in error_of(excinfo)
    prepare_text.main([*args, "--force"])
    assert len([w for w in (dest / "dict.txt").read_text().split()[::2] if "madeup" not in w]) > 5
    assert not any("<unk>" in sentence for sentence in load_split(dest, "train"))
    no_leftovers(tmp_path)


def test_split_by_file_draws_whole_files_that_fit_from_anywhere() -> None:
    counts = [30, 24] + [6] * 30 + [400]  # 634 lines: a split of 5% holds 32, 8 per file at most
    train, valid, test = text_corpus.split_files_by_lines(counts, (0.05, 0.05), seed=3)
    assert sorted(train + valid + test) == list(range(len(counts)))
    assert {0, 1, 32} <= set(train)  # too large for a quarter of a split
    for split in (valid, test):
        assert split == sorted(split) and 24 <= sum(counts[i] for i in split) <= 32
    assert (train, valid, test) != text_corpus.split_files_by_lines(counts, (0.05, 0.05), seed=4)
    with pytest.raises(SystemExit, match="no file small enough"):
        text_corpus.split_files_by_lines([100, 100], (0.05, 0.05), seed=1)


def test_text_split_by_file_checks_options_before_reading_any_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = tmp_path / "texts"
    write_text(texts / "doc.txt", ["a line"])
    occupied = tmp_path / "occupied"
    write_text(occupied / "notes.txt", ["not a data-bin"])

    def unread(*_: object) -> None:
        raise AssertionError("read a file before checking the options")

    monkeypatch.setattr(text_corpus, "iter_text_lines", unread)
    args = ["--input", str(texts), "--split-by-file", "1"]
    for extra, message in (
        (["--dest", str(tmp_path / "out"), "--vocab-size", "0"], "--vocab-size must be a positive"),
        (["--dest", str(occupied)], "--dest"),
    ):
        with pytest.raises(SystemExit) as excinfo:
            prepare_text.main([*args, *extra])
        assert message in error_of(excinfo)


@pytest.mark.e2e
def test_text_split_by_file_keeps_each_file_whole_and_in_order(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    for index in range(40):  # a line names its file in digits, words every split's dictionary has
        lines = [f"{index // 10} {index % 10} line {j}" for j in range(10)]
        write_text(texts / f"doc{index:02d}.txt", lines)
    dest = tmp_path / "by_file"
    args = ["--input", str(texts), "--dest", str(dest), "--split-ratio", "8,1,1"]
    prepare_text.main([*args, "--split-by-file", "7"])
    files = {}
    for split in SPLITS:
        sentences = load_split(dest, split)
        files[split] = sorted({int(s[0]) * 10 + int(s[1]) for s in sentences})
        assert sentences == [
            [str(f // 10), str(f % 10), "line", str(j), "</s>"]
            for f in files[split]
            for j in range(10)
        ]
    assert [len(files[split]) for split in SPLITS] == [32, 4, 4]
    assert max(files["valid"] + files["test"]) - min(files["valid"] + files["test"]) > 8
    with pytest.raises(SystemExit) as excinfo:
        prepare_text.main(
            [*args, "--split-by-file", "7", "--force", "--input", str(texts / "doc00.txt")]
        )
    assert "needs a directory" in error_of(excinfo)
    no_leftovers(tmp_path)


@pytest.mark.e2e
def test_text_sentencepiece(tmp_path: Path) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    lines = [
        " ".join(words[(i + j) % 8] + words[(i * j) % 8] for j in range(6)) for i in range(120)
    ]
    source = write_text(tmp_path / "in.txt", lines)
    dest = tmp_path / "spm"
    prepare_text.main(["--input", str(source), "--dest", str(dest), "--spm-vocab-size", "30"])
    assert (dest / "spm.model").is_file()
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(dest / "spm.model"))
    train = load_split(dest, "train")
    test = load_split(dest, "test")
    assert len(train) == 108 and len(test) == 6
    assert all(piece != "<unk>" for sentence in train for piece in sentence)
    assert processor.decode(train[0][:-1]) == lines[0]
    assert processor.decode(test[-1][:-1]) == lines[-1]


# ------------------------------------------------------------------------------------------------
# prepare_lm_corpus
# ------------------------------------------------------------------------------------------------


def make_wikitext(root: Path, name: str = "wikitext-2") -> dict[str, list[str]]:
    """A tiny WikiText-like release below ``root`` (with the empty lines of the real one)."""
    kept = {}
    for k, split in enumerate(SPLITS):
        lines = fake_corpus_lines(12 - 3 * k, offset=k)
        text = [" = Heading = ", ""] + [line for line in lines for line in (line, "")]
        write_text(root / name / f"wiki.{split}.tokens", text)
        kept[split] = [" = Heading = "] + lines
    return kept


@pytest.mark.e2e
def test_lm_corpus_ptb_source_dir(tmp_path: Path) -> None:
    data = tmp_path / "simple-examples" / "data"
    lines = {split: fake_corpus_lines(n, k) for k, (split, n) in enumerate(zip(SPLITS, (20, 6, 5)))}
    for split in SPLITS:
        write_text(data / f"ptb.{split}.txt", lines[split])
    dest = tmp_path / "bin" / "ptb"
    prepare_lm_corpus.main(["--corpus", "ptb", "--source-dir", str(tmp_path), "--dest", str(dest)])
    for split in SPLITS:
        sentences = load_split(dest, split)
        assert [s[:-1] for s in sentences] == [line.split() for line in lines[split]]
    assert "<unk>" not in (dest / "dict.txt").read_text().split()  # a special symbol already
    no_leftovers(tmp_path / "bin")


@pytest.mark.e2e
def test_lm_corpus_wikitext_source_dir_drops_empty_lines(tmp_path: Path) -> None:
    kept = make_wikitext(tmp_path / "src")
    dest = tmp_path / "wt2"
    prepare_lm_corpus.main(
        ["--corpus", "wikitext2", "--source-dir", str(tmp_path / "src" / "wikitext-2")]
        + ["--dest", str(dest)]
    )
    for split in SPLITS:
        assert [s[:-1] for s in load_split(dest, split)] == [x.split() for x in kept[split]]


def fake_wikitext_download(tmp_path: Path, monkeypatch, md5: str | None = None) -> Path:
    """Serve a generated wikitext-2-v1.zip from a file:// URL in place of the real one."""
    make_wikitext(tmp_path / "build")
    archive = tmp_path / "remote" / "wikitext-2-v1.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "build").rglob("*")):
            zf.write(path, path.relative_to(tmp_path / "build").as_posix())
    shutil.rmtree(tmp_path / "build")
    remote = lm_corpora.Remote(
        archive.name, archive.as_uri(), md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    )
    corpus = dataclasses.replace(lm_corpora.CORPORA["wikitext2"], remotes=(remote,))
    monkeypatch.setitem(lm_corpora.CORPORA, "wikitext2", corpus)
    return archive


@pytest.mark.e2e
def test_lm_corpus_fake_download_ok(tmp_path: Path, monkeypatch) -> None:
    fake_wikitext_download(tmp_path, monkeypatch)
    dest = tmp_path / "bin" / "wt2"
    prepare_lm_corpus.main(["--corpus", "wikitext2", "--dest", str(dest)])
    assert (tmp_path / "bin" / "downloads" / "wikitext-2-v1.zip").is_file()
    assert len(load_split(dest, "train")) == 13
    no_leftovers(tmp_path / "bin")


def test_lm_corpus_fake_download_checksum_mismatch(tmp_path: Path, monkeypatch) -> None:
    fake_wikitext_download(tmp_path, monkeypatch, md5="0123456789abcdef0123456789abcdef")
    dest = tmp_path / "bin" / "wt2"
    with pytest.raises(SystemExit) as excinfo:
        prepare_lm_corpus.main(["--corpus", "wikitext2", "--dest", str(dest)])
    assert "checksum mismatch for wikitext-2-v1.zip" in error_of(excinfo)
    assert not dest.exists()
    assert not list((tmp_path / "bin" / "downloads").iterdir())


def test_lm_corpus_base_url_uses_real_checksums(tmp_path: Path) -> None:
    for split in SPLITS:
        write_text(tmp_path / "mirror" / f"ptb.{split}.txt", fake_corpus_lines(5))
    with pytest.raises(SystemExit) as excinfo:
        prepare_lm_corpus.main(
            ["--corpus", "ptb", "--base-url", (tmp_path / "mirror").as_uri()]
            + ["--dest", str(tmp_path / "ptb")]
        )
    assert "expected md5 f26c4b92c5fdc7b3f8c7cdcb991d8420" in error_of(excinfo)


def test_lm_corpus_missing_source_files(tmp_path: Path) -> None:
    write_text(tmp_path / "ptb.train.txt", ["a b"])
    with pytest.raises(SystemExit) as excinfo:
        prepare_lm_corpus.main(
            ["--corpus", "ptb", "--source-dir", str(tmp_path), "--dest", str(tmp_path / "out")]
        )
    assert "cannot find" in error_of(excinfo)


# ------------------------------------------------------------------------------------------------
# prepare_bible
# ------------------------------------------------------------------------------------------------


def test_bible_tokenize_and_missing_command(monkeypatch, tmp_path: Path) -> None:
    assert bible.tokenize("And God said, Let there be light: and LORD'S well-favoured.") == (
        "and god said , let there be light : and lord's well-favoured ."
    )
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as excinfo:
        prepare_bible.main(["--dest", str(tmp_path / "kjv")])
    assert "apt-get install bible-kjv" in error_of(excinfo)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv is not installed")
def test_bible_subset(tmp_path: Path) -> None:
    dest = tmp_path / "kjv"
    prepare_bible.main(["--dest", str(dest), "--max-lines", "200"])
    train, valid, test = (load_split(dest, split) for split in SPLITS)
    assert (len(train), len(valid), len(test)) == (180, 10, 10)
    first_verse = "in the beginning god created the heaven and the earth ."
    assert train[0] == [*first_verse.split(), "</s>"]
    assert not any(token[0].isupper() for sentence in train for token in sentence[:-1])
