"""Bad input: one clear last line naming the problem and what to do, a non-zero exit, nothing
half-written; checkpoints are loaded safely (a malicious pickle is refused, not run).

The command-line cases run two at a time (the machine has two cores) in one module fixture.
"""

import dataclasses
import logging
import math
import os
import shutil
import struct
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from conftest import BIN, REPO, TINY_TRAIN, USER_DIR, StubOptimizer, random_sentences, run_cli
from fairseq.data import Dictionary

from atbptt.records import METRICS_FILE
from atbptt_fairseq import fairseq_fixes
from atbptt_fairseq.errors import UserInputError, find_user_error
from atbptt_fairseq.experiments import demo, sweep
from atbptt_fairseq.fairseq_fixes import checkpoint_guard
from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLanguageModel, TbpttLstmLmConfig
from atbptt_fairseq.tasks.adaptive_tbptt_lm import (
    AdaptiveTbpttLmConfig,
    AdaptiveTbpttLmTask,
    check_config,
    dictionary_identity,
)
from atbptt_fairseq.tasks.checkpoint_state import check_resumed_options

# in-process calls into fairseq run as its CLIs do with the plugin: with its fixes
fairseq_fixes.install()

pytestmark = pytest.mark.e2e

TRAIN = [
    *TINY_TRAIN,
    "--batch-size", "4",
    "--truncation-length", "8",
    "--max-update", "3",
    "--cpu",
    "--no-progress-bar",
]  # fmt: skip
EVAL = ["--user-dir", USER_DIR, "--task", "adaptive_tbptt_lm", "--gen-subset", "valid", "--cpu"]


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy_data(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


class Case:
    def __init__(self, tool: str, args: List[str], save_dir: Optional[Path] = None, env=None):
        self.tool, self.args, self.save_dir, self.env = tool, args, save_dir, env or {}
        self.files_before: Dict[str, bytes] = {}
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            self.files_before = {p.name: p.read_bytes() for p in save_dir.iterdir()}
        self.returncode: Optional[int] = None
        self.output = ""

    def run(self) -> "Case":
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            **self.env,
        )
        result = subprocess.run(
            [str(BIN / self.tool), *self.args], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=600,
        )  # fmt: skip
        self.returncode, self.output = result.returncode, result.stdout
        return self

    @property
    def last_line(self) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def assert_clear_failure(
        self, *fragments: str, prefix: str = "atbptt_fairseq: error: "
    ) -> None:
        assert self.returncode not in (0, None), self.output[-3000:]
        assert self.last_line.startswith(prefix), self.output[-3000:]
        for fragment in fragments:
            assert fragment in self.last_line, self.last_line
        if self.save_dir is not None:  # nothing written, nothing changed
            files_after = {p.name: p.read_bytes() for p in self.save_dir.iterdir()}
            assert files_after == self.files_before


@pytest.fixture(scope="module")
def cases(tiny_corpus, tmp_path_factory) -> Dict[str, Case]:
    root = tmp_path_factory.mktemp("bad_input")
    # a good checkpoint of the tiny corpus
    good = root / "good"
    run_cli("fairseq-train", str(tiny_corpus), *TRAIN, "--save-dir", str(good))
    checkpoint = good / "checkpoint_last.pt"
    # data with another dictionary (more types)
    other = root / "other"
    other.mkdir()
    for split in ("train", "valid"):
        (other / f"{split}.txt").write_text("\n".join(random_sentences(100, 60, seed=5)) + "\n")
    run_cli(
        "fairseq-preprocess", "--only-source", "--trainpref", str(other / "train.txt"),
        "--validpref", str(other / "valid.txt"), "--destdir", str(other / "bin"), "--workers", "1",
    )  # fmt: skip
    no_dict = copy_data(tiny_corpus, root / "no_dict")
    (no_dict / "dict.txt").unlink()
    small_dict = copy_data(tiny_corpus, root / "small_dict")
    lines = (small_dict / "dict.txt").read_text().splitlines()
    (small_dict / "dict.txt").write_text("\n".join(lines[:10]) + "\n")
    empty_split = copy_data(tiny_corpus, root / "empty_split")
    (empty_split / "valid.bin").write_bytes(b"")  # what fairseq-preprocess writes for no text
    truncated = root / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    resume_truncated = root / "resume_truncated"
    resume_truncated.mkdir()
    shutil.copy(truncated, resume_truncated / "checkpoint_last.pt")
    evil = root / "evil.pt"
    torch.save({"model": {}, "cfg": None, "payload": Evil(root / "marker_eval")}, evil)
    resume_evil = root / "resume_evil"
    resume_evil.mkdir()
    torch.save({"payload": Evil(root / "marker_resume")}, resume_evil / "checkpoint_last.pt")
    resume_other_dict = root / "resume_other_dict"
    resume_other_dict.mkdir()
    shutil.copy(checkpoint, resume_other_dict / "checkpoint_last.pt")

    def train(name: str, data, *args: str, save_dir: Optional[Path] = None, env=None) -> Case:
        save_dir = save_dir or root / f"save_{name}"
        args = [str(data), *TRAIN, *args, "--save-dir", str(save_dir)]
        return Case("fairseq-train", args, save_dir, env)

    table = {
        "missing_data": train("missing_data", root / "nowhere"),
        "missing_dict": train("missing_dict", no_dict),
        "mismatched_dict": train("mismatched_dict", small_dict),
        "empty_split": train("empty_split", empty_split),
        "short_split": train("short_split", tiny_corpus, "--batch-size", "5000"),
        "bad_delta": train("bad_delta", tiny_corpus, "--target-bias", "1.5"),
        "bad_token_budget": train("bad_token_budget", tiny_corpus, "--max-train-tokens", "-5"),
        "unknown_arch": train("unknown_arch", tiny_corpus, "--arch", "tbptt_lstm_huge"),
        "stateless_arch": train("stateless_arch", tiny_corpus, "--arch", "lstm_lm"),
        "eval_other_dict": Case(
            "fairseq-eval-lm", [str(other / "bin"), *EVAL, "--path", str(checkpoint)]
        ),
        "eval_other_targets": Case(
            "fairseq-eval-lm",
            [str(tiny_corpus), *EVAL, "--path", str(checkpoint), "--target-dir", "targets"],
        ),
        "eval_truncated": Case(
            "fairseq-eval-lm", [str(tiny_corpus), *EVAL, "--path", str(truncated)]
        ),
        # even with torch told to unpickle anything, the plugin refuses
        "eval_evil": Case(
            "fairseq-eval-lm",
            [str(tiny_corpus), *EVAL, "--path", str(evil)],
            env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
        ),  # fmt: skip
        "resume_truncated": train("resume_truncated", tiny_corpus, save_dir=resume_truncated),
        "resume_evil": train("resume_evil", tiny_corpus, save_dir=resume_evil),
        "resume_other_dict": train("resume_other_dict", other / "bin", save_dir=resume_other_dict),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(Case.run, table.values()))
    table["root"] = root  # type: ignore[assignment]
    return table


def test_missing_data_directory(cases):
    cases["missing_data"].assert_clear_failure("does not exist", "fairseq-preprocess")


def test_missing_dictionary(cases):
    cases["missing_dict"].assert_clear_failure("dict.txt is missing", "fairseq-preprocess")


def test_token_ids_beyond_the_dictionary(cases):
    cases["mismatched_dict"].assert_clear_failure("token ids up to", "--srcdict")


def test_empty_split(cases):
    case = cases["empty_split"]
    case.assert_clear_failure("is empty", "binarize it again")
    assert "Exception ignored" not in case.output


def test_split_shorter_than_one_segment_for_the_batch_size(cases):
    cases["short_split"].assert_clear_failure("5000 columns", "smaller batch size")


def test_target_bias_outside_zero_one(cases):
    cases["bad_delta"].assert_clear_failure("--target-bias", "strictly between 0 and 1")


def test_negative_token_budget(cases):
    cases["bad_token_budget"].assert_clear_failure("--max-train-tokens must be at least 0", "-5")


def test_unknown_architecture(cases):
    # fairseq's argument parser: one line, exit status 2, the plugin's architectures among the choices
    cases["unknown_arch"].assert_clear_failure(
        "invalid choice: 'tbptt_lstm_huge'", "'tbptt_lstm_lm_ptb'", prefix="fairseq-train: error: "
    )
    assert cases["unknown_arch"].returncode == 2


def test_stateless_architecture(cases):
    cases["stateless_arch"].assert_clear_failure(
        "needs a stateful model", "--arch tbptt_lstm_lm_ptb"
    )


def test_eval_with_another_dictionary(cases):
    cases["eval_other_dict"].assert_clear_failure("dictionary of", "data directory (dict.txt)")


def test_eval_on_other_targets_than_trained(cases):
    cases["eval_other_targets"].assert_clear_failure(
        "trained to predict the next token", "leave the option out"
    )


def test_resume_with_another_dictionary(cases):
    # fairseq wraps the model's error in its own; the plugin's message is still the last line
    cases["resume_other_dict"].assert_clear_failure("dictionary of", "data directory (dict.txt)")


def test_truncated_checkpoint(cases):
    cases["eval_truncated"].assert_clear_failure("truncated or corrupt")
    cases["resume_truncated"].assert_clear_failure("truncated or corrupt", "checkpoint_last.pt")


def test_malicious_checkpoint_is_refused_without_running_it(cases):
    root = cases["root"]
    cases["eval_evil"].assert_clear_failure("refusing to load", "posix.system")
    cases["resume_evil"].assert_clear_failure("refusing to load", "posix.system")
    assert not (root / "marker_eval").exists() and not (root / "marker_resume").exists()


def test_guard_refuses_in_process_and_keeps_torch_weights_only(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"payload": Evil(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from fairseq import checkpoint_utils

    with pytest.raises(checkpoint_guard.CheckpointError, match="refusing"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    # the static check is bypassed: the forced weights-only unpickler still refuses
    monkeypatch.setattr(checkpoint_guard, "check_checkpoint_file", lambda path: None)
    with pytest.raises(checkpoint_guard.CheckpointError, match="not plain data"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored afterwards
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04" + b"\0" * 64])
def test_garbage_checkpoint_files_are_reported_in_process(tmp_path, content):
    from fairseq import checkpoint_utils

    path = tmp_path / "checkpoint_last.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint_guard.CheckpointError, match="empty|truncated or corrupt"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_checkpoint_copies_are_atomic(tmp_path, monkeypatch):
    source, target = tmp_path / "checkpoint_1_5.pt", tmp_path / "checkpoint_last.pt"
    source.write_bytes(b"new" * 1000)
    target.write_bytes(b"old")

    def interrupted_copy(src, dst):
        Path(dst).write_bytes(b"ne")  # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_guard.AtomicCopyPathManager.copy(str(source), str(target), overwrite=True)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == [
        source.name,
        target.name,
    ]
    monkeypatch.undo()
    assert checkpoint_guard.AtomicCopyPathManager.copy(str(source), str(target), overwrite=True)
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"target_bias": 0.0}, "strictly between 0 and 1"),
        ({"target_bias": 1.0}, "strictly between 0 and 1"),
        (
            {"target_bias": 0.5, "min_truncation_length": 30, "max_truncation_length": 20},
            "is larger than",
        ),
        ({"target_bias": 0.5, "truncation_length": 5}, "lies outside"),  # K_min 10 by default
        ({"target_bias": 0.5, "truncation_length": 350}, "lies outside"),  # K_max 300
        (
            {"target_bias": 0.5, "max_truncation_length": 50, "estimate_window": 40},
            "--estimate-window (40)",
        ),
        ({"truncation_length": 0}, "--truncation-length must be at least 1"),
        ({"estimate_interval": -1}, "--estimate-interval must be at least 0"),
        ({"estimate_budget": 0.0}, "--estimate-budget"),
        ({"estimate_budget": 1.5}, "--estimate-budget"),
        ({"eval_batch_size": 0}, "--eval-batch-size must be at least 1"),
        ({"truncation_clip_norm": math.nan}, "--truncation-clip-norm must be a finite number"),
        ({"truncation_clip_norm": math.inf}, "--truncation-clip-norm must be a finite number"),
        ({"estimate_budget": math.nan}, "--estimate-budget must be a finite number"),
        ({"target_bias": math.nan}, "--target-bias"),
        ({"max_truncation_change": 1.0}, "--max-truncation-change must be 0"),
        ({"max_truncation_change": math.inf}, "--max-truncation-change must be a finite"),
    ],
)
def test_inconsistent_options_are_named_by_their_flags(overrides, fragment):
    config = AdaptiveTbpttLmConfig(data="unused", seed=1, train_subset="train", **overrides)
    with pytest.raises(UserInputError) as error:
        check_config(config)
    assert fragment in str(error.value)


def test_estimate_window_longer_than_the_training_split_fails_at_start(tiny_corpus):
    config = AdaptiveTbpttLmConfig(
        data=str(tiny_corpus), seed=1, train_subset="train", truncation_length=10,
        target_bias=0.5, max_truncation_length=3000, estimate_window=5000,
    )  # fmt: skip
    task = AdaptiveTbpttLmTask.setup_task(config)
    task.load_dataset("train")
    with pytest.raises(UserInputError, match="lower --estimate-window"):
        task.get_batch_iterator(task.dataset("train"), max_sentences=2)


def test_user_errors_are_found_inside_fairseq_wrappers():
    try:
        try:
            raise UserInputError("the real problem")
        except UserInputError:
            raise Exception("Cannot load model parameters from checkpoint")  # as fairseq does
    except Exception as wrapped:
        assert str(find_user_error(wrapped)) == "the real problem"
    assert find_user_error(RuntimeError("other")) is None


class NonFiniteStepModel(TbpttLstmLanguageModel):
    """The logits the bias estimator reads out are not finite (as a diverged model's would be)."""

    value = math.nan

    def step(self, tokens, state):
        logits, state = super().step(tokens, state)
        return logits + self.value, state

    def readout(self, state):
        return super().readout(state) + self.value


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_estimate_keeps_k_warns_and_training_continues(tiny_corpus, caplog, value):
    config = AdaptiveTbpttLmConfig(
        data=str(tiny_corpus), seed=1, train_subset="train", truncation_length=6,
        target_bias=0.5, min_truncation_length=2, max_truncation_length=12,
        estimate_window=12, estimate_interval=2, estimate_sequences=2, estimate_repeats=2,
    )  # fmt: skip
    task = AdaptiveTbpttLmTask.setup_task(config)
    task.load_dataset("train")
    slots = list(task.get_batch_iterator(task.dataset("train"), max_sentences=2).next_epoch_itr())
    torch.manual_seed(0)
    model_config = TbpttLstmLmConfig(embed_dim=8, hidden_size=8, num_layers=1, dropout=0.0)
    model = NonFiniteStepModel.build_model(model_config, task)
    model.value = value
    from atbptt_fairseq.criterions.tbptt_cross_entropy import TbpttCrossEntropyCriterion

    criterion = TbpttCrossEntropyCriterion(task, sentence_avg=False)
    optimizer = StubOptimizer(model)
    with caplog.at_level(logging.WARNING):
        for update in range(4):  # estimates at updates 2 (and the training steps go on)
            loss, _, logging_output = task.train_step(
                slots[update], model, criterion, optimizer, update
            )
            assert math.isfinite(float(loss.detach()))
    assert task.controller.truncation_length == 6
    assert math.isnan(task.controller.last_decision.relative_bias)
    assert any("not finite" in record.getMessage() for record in caplog.records)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------- other data, damaged checkpoints, a K beyond the data
# (reliability, round two: every case is refused in one line or warned about, never silent)


def permute_dictionary(data: Path) -> None:
    """Reorder ``dict.txt`` in place: the same size and symbols, other meanings of the ids."""
    lines = (data / "dict.txt").read_text().splitlines()
    (data / "dict.txt").write_text("\n".join(lines[1::2] + lines[0::2]) + "\n")


def storage_member(checkpoint: Path, tensor: torch.Tensor) -> str:
    """The archive member that holds ``tensor``'s storage."""
    with zipfile.ZipFile(checkpoint) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and archive.read(info) == tensor.numpy().tobytes():
                return info.filename
    raise AssertionError("no archive member holds the tensor")


def flip_bits(source: Path, destination: Path, member: str) -> None:
    """Copy ``source`` with one bit of every 4-byte word of ``member`` flipped in place, the
    CRC-32 in the archive left as it was (as a disk or a copy would damage it)."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo(member)
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    for offset in range(start + 3, start + info.file_size, 4):
        data[offset] ^= 0x40  # an exponent bit of a float32
    destination.write_bytes(bytes(data))


def rewrite_pickle(source: Path, destination: Path, edit) -> None:
    """Copy ``source`` with ``edit`` applied to its ``data.pkl``, the archive's CRCs updated."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(destination, "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            out.writestr(info.filename, edit(data) if info.filename.endswith("/data.pkl") else data)


def without_dictionary_identity(source: Path, destination: Path) -> None:
    """A checkpoint as the plugin wrote it before it recorded the dictionary."""
    state = torch.load(source)
    del state["extra_state"]["AdaptiveTbpttLmTask"]["dictionary"]
    del state["task_state"]["dictionary_identity"]
    torch.save(state, destination)


@pytest.fixture(scope="module")
def round_two(cases, tiny_corpus) -> Dict[str, Case]:
    root: Path = cases["root"]  # type: ignore[assignment]
    checkpoint = root / "good" / "checkpoint_last.pt"
    permuted = copy_data(tiny_corpus, root / "permuted_dict")
    permute_dictionary(permuted)
    embedding = torch.load(checkpoint)["model"]["decoder.embed_tokens.weight"]
    flipped = root / "flipped.pt"
    flip_bits(checkpoint, flipped, storage_member(checkpoint, embedding))
    old = root / "without_identity.pt"
    without_dictionary_identity(checkpoint, old)
    resume_permuted = root / "resume_permuted"
    resume_permuted.mkdir()
    shutil.copy(checkpoint, resume_permuted / "checkpoint_last.pt")
    table = {
        "eval_permuted": Case("fairseq-eval-lm", [str(permuted), *EVAL, "--path", str(checkpoint)]),
        "resume_permuted": Case(
            "fairseq-train",
            [str(permuted), *TRAIN, "--save-dir", str(resume_permuted)],
            resume_permuted,
        ),
        "eval_flipped": Case("fairseq-eval-lm", [str(tiny_corpus), *EVAL, "--path", str(flipped)]),
        "eval_old": Case("fairseq-eval-lm", [str(tiny_corpus), *EVAL, "--path", str(old)]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(Case.run, table.values()))
    table["paths"] = {"checkpoint": checkpoint, "flipped": flipped, "permuted": permuted}
    return table


def test_checkpoint_of_another_dictionary_of_the_same_size_is_refused(round_two, tiny_corpus):
    trained = dictionary_identity(Dictionary.load(str(tiny_corpus / "dict.txt")))
    other = dictionary_identity(Dictionary.load(str(round_two["paths"]["permuted"] / "dict.txt")))
    assert trained["types"] == other["types"]  # the size check alone let these through
    for name in ("eval_permuted", "resume_permuted"):  # the resume changed no file
        round_two[name].assert_clear_failure(
            f"{trained['types']} types (sha256 {trained['sha256'][:12]})",
            f"permuted_dict/dict.txt ({other['types']} types, sha256 {other['sha256'][:12]})",
            "data directory (dict.txt)",
        )


def test_checkpoint_without_dictionary_identity_loads_with_one_warning(round_two, tiny_corpus):
    case = round_two["eval_old"]
    assert case.returncode == 0 and "Perplexity" in case.output, case.output[-3000:]
    assert case.output.count("records no dictionary identity") == 1
    # resuming from one: the same single warning
    task = AdaptiveTbpttLmTask.setup_task(
        AdaptiveTbpttLmConfig(data=str(tiny_corpus), seed=1, train_subset="train")
    )
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    task_logger = logging.getLogger("atbptt_fairseq.tasks.adaptive_tbptt_lm")
    task_logger.addHandler(handler)
    try:
        task.check_checkpoint_dict({"cursor": {}})
        task.check_checkpoint_dict({"cursor": {}})
    finally:
        task_logger.removeHandler(handler)
    assert sum("records no dictionary identity" in message for message in warnings) == 1


def test_flipped_bits_in_tensor_data_are_reported_as_corrupt(round_two):
    paths = round_two["paths"]
    # torch itself loads the damaged file: the flipped bits change a parameter
    damaged = torch.load(paths["flipped"])["model"]["decoder.embed_tokens.weight"]
    intact = torch.load(paths["checkpoint"])["model"]["decoder.embed_tokens.weight"]
    assert not torch.equal(damaged, intact)
    case = round_two["eval_flipped"]
    case.assert_clear_failure(f"checkpoint {paths['flipped']} is corrupt", "CRC-32")
    assert case.returncode == 1 and case.output.count("atbptt_fairseq: error:") == 1


@pytest.mark.parametrize(
    "edit",
    [
        lambda pickle: pickle[:2] + b"\xff" + pickle[3:],  # no such opcode
        lambda pickle: pickle.replace(b"_rebuild_tensor_v2", b"_rebuild_tensoq_v2", 1),
        lambda pickle: pickle.replace(b"collections\nOrderedDict", b"collectionz\nOrderedDict", 1),
    ],
    ids=["opcode", "function", "module"],
)
def test_damaged_pickle_is_corrupt_not_unsafe(round_two, tmp_path, edit):
    damaged = tmp_path / "checkpoint_last.pt"
    rewrite_pickle(round_two["paths"]["checkpoint"], damaged, edit)
    from fairseq import checkpoint_utils

    with pytest.raises(checkpoint_guard.CheckpointError) as error:
        checkpoint_utils.load_checkpoint_to_cpu(str(damaged))
    message = str(error.value)
    assert "corrupt" in message and str(damaged) in message and "refusing" not in message
    # the archive itself is sound: only the pickle is damaged
    with zipfile.ZipFile(damaged) as archive:
        assert archive.testzip() is None


def test_stale_checkpoint_temporaries_are_removed_at_start(tmp_path, caplog):
    from fairseq import checkpoint_utils

    stale = ["checkpoint_last.pt.tmp", "checkpoint_2_40.pt.tmp", "checkpoint_best.pt.tmp"]
    kept = ["checkpoint_last.pt", "notes.pt.tmp", "checkpoint_last.pt.tmp.bak", "data.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "checkpoint_last.pt.tmp").write_bytes(b"x")  # not in the save dir
    with caplog.at_level(logging.INFO, logger="atbptt_fairseq.fairseq_fixes.checkpoint_guard"):
        checkpoint_utils.verify_checkpoint_directory(str(tmp_path))  # what fairseq-train runs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["sub"])
    assert (tmp_path / "sub" / "checkpoint_last.pt.tmp").exists()
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed ")]
    assert sorted(removed) == sorted(
        f"removed {tmp_path / name}, a checkpoint left half-written by a killed run"
        for name in stale
    )


def test_target_stream_binarized_with_another_dictionary_is_refused(tiny_corpus, tmp_path):
    data = copy_data(tiny_corpus, tmp_path / "data")
    (data / "targets").mkdir()
    for name in ("dict.txt", "train.bin", "train.idx"):
        shutil.copy(data / name, data / "targets" / name)
    config = AdaptiveTbpttLmConfig(
        data=str(data), seed=1, train_subset="train", target_dir="targets"
    )
    AdaptiveTbpttLmTask.setup_task(config)  # the same dictionary: fine
    permute_dictionary(data / "targets")
    with pytest.raises(UserInputError, match="is read with the input dictionary") as error:
        AdaptiveTbpttLmTask.setup_task(config)
    assert "targets/dict.txt (48 types" in str(error.value) and "--srcdict" in str(error.value)


def test_truncation_length_longer_than_a_column_logs_and_scales_the_applied_k(tiny_corpus, caplog):
    config = AdaptiveTbpttLmConfig(
        data=str(tiny_corpus), seed=1, train_subset="train", truncation_length=5000,
        lr_scaling="sqrt", lr_scaling_reference=1,
    )  # fmt: skip
    task = AdaptiveTbpttLmTask.setup_task(config)
    task.load_dataset("train")
    slots = list(task.get_batch_iterator(task.dataset("train"), max_sentences=4).next_epoch_itr())
    column = task.loop.column_length
    assert column < 5000 and len(slots) == 1
    torch.manual_seed(0)
    model_config = TbpttLstmLmConfig(embed_dim=8, hidden_size=8, num_layers=1, dropout=0.0)
    model = TbpttLstmLanguageModel.build_model(model_config, task)
    from atbptt_fairseq.criterions.tbptt_cross_entropy import TbpttCrossEntropyCriterion

    criterion = TbpttCrossEntropyCriterion(task, sentence_avg=False)
    with caplog.at_level(logging.WARNING):
        for update in range(3):  # three passes over the one-segment columns
            _, _, logging_output = task.train_step(
                slots[0], model, criterion, StubOptimizer(model), update
            )
            assert logging_output["trunc_k"] == column
            assert logging_output["lr_scale"] == pytest.approx(math.sqrt(column))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"K = 5000 is longer than a training column ({column} tokens" in warnings[0]
    assert f"K = {column} applies" in warnings[0]


# ------------------------------------------------------------------------------------------------
# Reliability, round two: no lost inputs, no silently wrong results, no tracebacks
# (data-bin destinations, --out, text encodings, full disks, eval-lm --context-window,
# fairseq-train's --save-dir)
# ------------------------------------------------------------------------------------------------

import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from conftest import load_script  # noqa: E402

from atbptt_fairseq.experiments import data as data_bin  # noqa: E402
from atbptt_fairseq.experiments import text_corpus  # noqa: E402

prepare_bible = load_script("prepare_bible")
prepare_copy_task = load_script("prepare_copy_task")
prepare_lm_corpus = load_script("prepare_lm_corpus")
prepare_text = load_script("prepare_text")

TEXT_LINES = [f"the cat number {i} sat on the mat ." for i in range(60)]


def prepare_error(main, *args: str) -> str:
    """The one-line ``error: ...`` a preparation script (or sweep/demo) ends with, in-process."""
    with pytest.raises(SystemExit) as excinfo:
        main([str(arg) for arg in args])
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def tree_bytes(root: Path) -> Dict[str, bytes]:
    """Every file below ``root`` (hidden ones included) with its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def hidden_leftovers(parent: Path) -> List[str]:
    """Staging or scratch directories of a preparation left next to its destination."""
    staging = (".tmp-", ".work-", ".old-")
    return [p.name for p in parent.iterdir() if any(tag in p.name for tag in staging)]


def limit_file_size(limit: int):
    """preexec_fn: files of the child (and its children) cannot grow beyond ``limit`` bytes.

    The kernel then fails every write past the limit (EFBIG, "File too large"), as a full disk
    fails them with ENOSPC; SIGXFSZ is ignored so that the write fails instead of killing.
    """

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.fixture
def texts(tmp_path) -> Path:
    """A directory of the user's texts, ``texts/a.txt`` and ``texts/more/b.txt``."""
    root = tmp_path / "texts"
    (root / "more").mkdir(parents=True)
    (root / "a.txt").write_text("\n".join(TEXT_LINES[:40]) + "\n")
    (root / "more" / "b.txt").write_text("\n".join(TEXT_LINES[40:]) + "\n")
    return root


def test_force_never_replaces_an_input_or_the_working_or_home_directory(
    texts, tmp_path, monkeypatch
):
    before = tree_bytes(tmp_path)
    corpus = texts / "a.txt"
    cases = [
        # (arguments, fragment of the line)
        (["--input", texts, "--dest", texts, "--force"], "it is the input"),
        (["--input", corpus, "--dest", texts, "--force"], "it contains the input"),
        (["--input", corpus, "--dest", corpus, "--force"], "it is the input"),
        (["--input", texts, "--dest", texts / "bin", "--force"], "inside the input directory"),
        (["--input", corpus, "--dest", ".", "--force"], "it is the working directory"),
        (["--input", corpus, "--dest", "..", "--force"], "contains the working directory"),
        (["--input", corpus, "--dest", "/", "--force"], "contains the working directory"),
        (["--input", corpus, "--dest", tmp_path / "users" / "me", "--force"], "is your home"),
        (["--input", corpus, "--dest", tmp_path / "users", "--force"], "contains your home"),
    ]
    monkeypatch.setenv("HOME", str(tmp_path / "users" / "me"))
    (tmp_path / "users" / "me").mkdir(parents=True)
    (tmp_path / "elsewhere" / "work").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "work")
    for args, fragment in cases:
        message = prepare_error(prepare_text.main, *args)
        assert fragment in message and "pass --force" not in message, message
    # the other scripts share the rule
    source = tmp_path / "ptb"
    for main, args, fragment in [
        (prepare_lm_corpus.main, ["--corpus", "ptb", "--source-dir", source, "--dest", source],
         "it is the input"),
        (prepare_lm_corpus.main, ["--corpus", "ptb", "--download-dir", tmp_path / "d" / "dl",
                                  "--dest", tmp_path / "d"], "it contains the input"),
        (prepare_copy_task.main, ["--dest", "."], "working directory"),
        (prepare_bible.main, ["--dest", ".."], "working directory"),
    ]:  # fmt: skip
        assert fragment in prepare_error(main, *args, "--force")
    assert tree_bytes(tmp_path) == before and not hidden_leftovers(tmp_path)


def test_force_replaces_only_a_data_bin_these_scripts_recognise(texts, tmp_path, tiny_corpus):
    dest = tmp_path / "bin"
    prepare_text.main(["--input", str(texts), "--dest", str(dest)])
    marker = json.loads((dest / data_bin.DATA_BIN_MARKER).read_text())
    assert marker["written_by"] == "prepare_text.py"
    assert marker["inputs"] == [str(texts.resolve())]
    assert set(marker["files"]) == {p.as_posix() for p in
        [Path("dict.txt"), Path("preprocess.log")] + [Path(f"{s}.{e}") for s in
        ("train", "valid", "test") for e in ("bin", "idx")]}  # fmt: skip
    # recognised: --force is offered, and works
    message = prepare_error(prepare_text.main, "--input", texts, "--dest", dest)
    assert "written by prepare_text.py); pass --force" in message
    # anything added to it makes it the user's: --force is neither offered nor obeyed
    (dest / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        message = prepare_error(prepare_text.main, "--input", texts, "--dest", dest, *force)
        assert "did not write (notes.txt)" in message and "pass --force" not in message
    assert (dest / "notes.txt").read_text() == "mine"
    (dest / "notes.txt").unlink()
    (texts / "a.txt").write_text("\n".join(TEXT_LINES[:20]) + "\n")
    prepare_text.main(["--input", str(texts), "--dest", str(dest), "--force"])
    assert len((dest / "train.idx").read_bytes()) > 0 and not hidden_leftovers(tmp_path)

    # a plain fairseq-preprocess output (dict.txt, *.bin, *.idx, preprocess.log) is recognised
    plain = copy_data(tiny_corpus, tmp_path / "plain")
    check = data_bin.check_destination
    check(data_bin.Destination(plain, True, "test"))
    with pytest.raises(SystemExit, match=r"written by fairseq-preprocess\); pass --force"):
        check(data_bin.Destination(plain, False, "test"))
    (plain / "train.txt").write_text("the text it came from\n")
    with pytest.raises(SystemExit, match=r"did not write \(train.txt\)"):
        check(data_bin.Destination(plain, True, "test"))
    # a damaged marker does not make a directory replaceable
    (dest / data_bin.DATA_BIN_MARKER).write_text("{not json")
    with pytest.raises(SystemExit, match="did not write"):
        check(data_bin.Destination(dest, True, "test"))


def test_disk_full_while_writing_a_data_bin(texts, tmp_path, tiny_corpus, monkeypatch):
    # In-process: the split file being written is /dev/full, so the real write gets ENOSPC
    # from the kernel; the existing data-bin that --force would replace stays as it was.
    dest = copy_data(tiny_corpus, tmp_path / "bin")
    before = tree_bytes(dest)
    real_write_split_files = text_corpus.write_split_files

    def write_onto_a_full_disk(lines, counts, out_dir, suffix="txt"):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"train.{suffix}").symlink_to("/dev/full")
        return real_write_split_files(lines, counts, out_dir, suffix)

    monkeypatch.setattr(text_corpus, "write_split_files", write_onto_a_full_disk)
    message = prepare_error(prepare_text.main, "--input", texts, "--dest", dest, "--force")
    assert f"preparing {dest} failed: No space left on device" in message
    assert "free some space" in message
    assert tree_bytes(dest) == before and not hidden_leftovers(tmp_path)
    monkeypatch.undo()

    # A real process whose files cannot grow past 1 kB (the kernel fails the write itself)
    fresh = tmp_path / "fresh"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_text.py"), "--input", str(texts),
         "--dest", str(fresh)],
        capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size(1000),
    )  # fmt: skip
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"error: preparing {fresh} failed: File too large"), last
    assert not fresh.exists() and not hidden_leftovers(tmp_path)


def test_dest_and_out_that_are_files_or_cannot_be_written(texts, tmp_path, tiny_corpus):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    corpus = texts / "a.txt"
    assert "is a file, not a directory" in prepare_error(
        prepare_text.main, "--input", corpus, "--dest", a_file
    )
    message = prepare_error(prepare_copy_task.main, "--dest", a_file / "sub")
    assert "cannot create --dest" in message and "a_file is a file" in message
    sweep_args = ["--data", tiny_corpus, "--fixed", "8", "--budget-updates", "2"]
    for out in (a_file, a_file / "sub"):
        message = prepare_error(sweep.main, *sweep_args, "--out", out)
        assert f"--out {out.resolve()}" in message and "is a file" in message
        assert "is a file" in prepare_error(sweep.main, *sweep_args, "--out", out, "--dry-run")
        assert "is a file" in prepare_error(demo.main, "--out", out)
    assert a_file.read_text() == "not a directory"


def test_dest_and_out_in_a_folder_nobody_may_write(texts, tmp_path, tiny_corpus):
    """Root-proof: sysfs takes no new folders, not even from root."""
    probe = Path("/sys/atbptt-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys takes new folders here")
    message = prepare_error(
        prepare_text.main, "--input", texts / "a.txt", "--dest", "/sys/atbptt-data"
    )
    assert message.startswith("error: preparing /sys/atbptt-data failed: ")
    assert "nothing was written" in message and "writable" in message
    message = prepare_error(
        sweep.main, "--data", tiny_corpus, "--fixed", "8", "--budget-updates", "2",
        "--out", "/sys/atbptt-sweep",
    )  # fmt: skip
    assert message.startswith("error: cannot write into --out /sys/atbptt-sweep: ")
    assert "cannot write into --out /sys/atbptt-demo" in prepare_error(
        demo.main, "--out", "/sys/atbptt-demo"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (chmod 555)")
def test_dest_and_out_in_a_read_only_folder(texts, tmp_path, tiny_corpus):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        message = prepare_error(
            prepare_text.main, "--input", texts / "a.txt", "--dest", locked / "bin"
        )
        assert "Permission denied" in message and "writable" in message
        message = prepare_error(
            sweep.main, "--data", tiny_corpus, "--fixed", "8", "--budget-updates", "2",
            "--out", locked / "sweep",
        )  # fmt: skip
        assert "cannot write into --out" in message and "Permission denied" in message
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("a b\x00c\n".encode() * 5, "line 1 holds a NUL character"),
        ("\n".join(TEXT_LINES).encode("utf-16-le"), "holds a NUL character"),  # no BOM
        ("caf\u00e9 au lait\n".encode("latin-1") * 5, "is not UTF-8 text"),
    ],
    ids=["nul-bytes", "utf16-without-bom", "latin1"],
)
def test_text_that_is_not_utf8_is_refused(tmp_path, content, fragment):
    source = tmp_path / "in.txt"
    source.write_bytes(content)
    message = prepare_error(prepare_text.main, "--input", source, "--dest", tmp_path / "bin")
    assert f"error: {source} is not" in message and fragment in message, message
    assert "convert it to UTF-8" in message
    assert not (tmp_path / "bin").exists() and not hidden_leftovers(tmp_path)
    # the same check guards a corpus from disk
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.{split}.txt").write_bytes(content if split == "valid" else b"a b\n")
    message = prepare_error(
        prepare_lm_corpus.main, "--corpus", "ptb", "--source-dir", tmp_path, "--dest",
        tmp_path / "ptb",
    )  # fmt: skip
    assert f"{tmp_path / 'ptb.valid.txt'} is not" in message


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_text_with_a_byte_order_mark_is_decoded(tmp_path, encoding):
    source = tmp_path / "in.txt"
    source.write_bytes("Caf\u00e9 au lait\nzwei Zeilen\n".encode(encoding))  # mark + text
    assert list(data_bin.read_text_lines(source)) == ["Caf\u00e9 au lait\n", "zwei Zeilen\n"]


def test_directory_input_is_read_recursively_in_sorted_order(tmp_path, capsys):
    root = tmp_path / "texts"
    for name in ["b.txt", "a/z.txt", "a/deeper/y.txt", "c/x.txt", "notes.md", ".hidden.txt",
                 ".git/x.txt", "a/.ipynb_checkpoints/z-checkpoint.txt"]:  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"{name}\n")
    (root / "linked").symlink_to(root / "c")
    files = text_corpus.list_input_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == [
        "a/deeper/y.txt", "a/z.txt", "b.txt", "c/x.txt",
    ]  # fmt: skip
    # skipped: notes.md, .hidden.txt, .git/, a/.ipynb_checkpoints/ and the link to c/
    log = capsys.readouterr().err
    assert "reading 4 .txt files below" in log and "(skipped 5 " in log
    lines = list(text_corpus.iter_text_lines(files, lowercase=False))
    assert lines == ["a/deeper/y.txt", "a/z.txt", "b.txt", "c/x.txt"]


def test_checkpoint_write_on_a_full_disk_leaves_the_old_checkpoint(tmp_path):
    """A real ENOSPC: the temporary file being written is /dev/full."""
    from fairseq import checkpoint_utils

    target = tmp_path / "checkpoint_last.pt"
    target.write_bytes(b"the previous checkpoint")
    Path(f"{target}.tmp").symlink_to("/dev/full")
    with pytest.raises(checkpoint_guard.CheckpointWriteError) as error:
        checkpoint_utils.torch_persistent_save({"weights": torch.zeros(10000)}, str(target))
    assert f"cannot write checkpoint {target}: No space left on device" in str(error.value)
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pt"]
    # the copy to checkpoint_last.pt / checkpoint_best.pt likewise
    source = tmp_path / "checkpoint_1_5.pt"
    source.write_bytes(b"new" * 10000)
    Path(f"{target}.tmp").symlink_to("/dev/full")
    with pytest.raises(checkpoint_guard.CheckpointWriteError, match="No space left on device"):
        checkpoint_guard.AtomicCopyPathManager.copy(str(source), str(target), overwrite=True)
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == [source.name, target.name]


@pytest.fixture(scope="module")
def cli_round_two(tiny_corpus, tmp_path_factory) -> Dict[str, subprocess.CompletedProcess]:
    """The fairseq command lines of this section, run two at a time in two rounds (the second
    needs the checkpoint that the first round trains)."""
    root = tmp_path_factory.mktemp("round_two")
    good = root / "good"
    (root / "a_file").write_text("not a directory")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def run(item):
        name, (command, preexec) = item
        result = subprocess.run(
            [str(BIN / command[0]), *command[1:]], cwd=root, env=env, capture_output=True,
            text=True, timeout=600, preexec_fn=preexec,
        )  # fmt: skip
        return name, result

    first = {
        "good": (["fairseq-train", str(tiny_corpus), *TRAIN, "--save-dir", str(good)], None),
        "bad_option_new_save_dir": (["fairseq-train", str(tiny_corpus), *TRAIN, "--target-bias",
                                     "2", "--save-dir", str(root / "new" / "checkpoints")], None),
        "save_dir_is_a_file": (["fairseq-train", str(tiny_corpus), *TRAIN, "--save-dir",
                                str(root / "a_file")], None),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, first.items()))
    assert results["good"].returncode == 0, results["good"].stderr[-3000:]
    full = copy_data(good, root / "full")
    second = {
        # resume, train 3 more updates, then save where files stop growing at 16 kB
        "disk_full": (["fairseq-train", str(tiny_corpus), *TRAIN, "--max-update", "6",
                       "--save-dir", str(full)], limit_file_size(16000)),
        "context_window": (["fairseq-eval-lm", str(tiny_corpus), *EVAL, "--path",
                            str(good / "checkpoint_last.pt"), "--context-window", "5"], None),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        results.update(pool.map(run, second.items()))
    results["root"] = root  # type: ignore[assignment]
    return results


def assert_one_line_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and lines, output[-3000:]
    assert lines[-1].startswith("atbptt_fairseq: error: "), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def test_disk_full_while_saving_a_checkpoint(cli_round_two):
    full, good = cli_round_two["root"] / "full", cli_round_two["root"] / "good"
    line = assert_one_line_failure(cli_round_two["disk_full"], "then resume")
    # the first file of the save (best, if validation improved, else last) names the cause
    written = re.escape(str(full))
    assert re.search(rf"cannot write checkpoint {written}/checkpoint_(best|last)\.pt: File too "
                     "large", line), line  # fmt: skip
    # nothing half-written: the checkpoints of the first run are there, unchanged, and alone;
    # the metrics records go on (a resume drops those after its checkpoint's update)
    saved, first = tree_bytes(full), tree_bytes(good)
    records, first_records = saved.pop(METRICS_FILE), first.pop(METRICS_FILE)
    assert saved == first and records.startswith(first_records)


def test_failed_start_leaves_no_save_dir_behind(cli_round_two):
    assert_one_line_failure(cli_round_two["bad_option_new_save_dir"], "--target-bias")
    assert not (cli_round_two["root"] / "new").exists()  # created by the run, removed again


def test_save_dir_that_is_a_file(cli_round_two):
    assert_one_line_failure(
        cli_round_two["save_dir_is_a_file"], "cannot write checkpoints into --save-dir", "a_file"
    )
    assert (cli_round_two["root"] / "a_file").read_text() == "not a directory"


def test_eval_lm_context_window_is_refused(cli_round_two):
    assert_one_line_failure(
        cli_round_two["context_window"],
        "--context-window (5) is not supported by the adaptive_tbptt_lm task",
        "already scored with all the tokens before it",
    )


# ------------------------------------------------------------------------------------------------
# Reliability, round three (issue 24): checkpoints named but missing, options a combination
# ignores, --lr beyond float32, fairseq-eval-lm --path and --gen-subset train
# ------------------------------------------------------------------------------------------------

from atbptt.checkpoint import CheckpointError, check_checkpoint_path  # noqa: E402
from atbptt_fairseq.tasks.config import (  # noqa: E402
    check_option_combinations,
    options_without_effect,
)


@pytest.fixture(scope="module")
def round_three(cases, tiny_corpus) -> Dict[str, Case]:
    """The command lines of this section on the tiny corpus, two at a time; each fails at start
    or trains one or two updates."""
    root: Path = cases["root"]  # type: ignore[assignment]
    checkpoint = root / "good" / "checkpoint_last.pt"
    resumed = copy_data(root / "good", root / "resume_relative")
    one = ["--max-update", "1"]

    def train(name: str, *args: str, save_dir: Optional[Path] = None) -> Case:
        """A run into ``save_dir`` (checked unchanged), else into a new one of its ``name``."""
        target = save_dir or root / "round_three" / name
        command = [str(tiny_corpus), *TRAIN, *one, *args, "--save-dir", str(target)]
        return Case("fairseq-train", command, save_dir)

    def evaluate(*args: str) -> Case:
        return Case("fairseq-eval-lm", [str(tiny_corpus), *EVAL, *args])

    table = {
        "restore_missing": train("restore_missing", "--restore-file", str(root / "nope.pt")),
        # relative to the working directory (the repository), not --save-dir, where it is
        "restore_relative": train(
            "restore_relative", "--restore-file", "checkpoint_best.pt", save_dir=resumed
        ),
        "artbp_k1": train("artbp_k1", "--gradient-estimator", "artbp", "--truncation-length", "1"),
        "uoro_monitor": train("uoro_monitor", "--gradient-estimator", "uoro", "--monitor-bias"),
        "artbp_ignored": train(
            "artbp_ignored",
            "--gradient-estimator",
            "artbp",
            "--tbptt-style",
            "overlap",
            "--estimate-window",
            "50",
        ),  # fmt: skip
        "lr_1e300": train("lr_1e300", "--lr", "1e300"),
        "lr_3e38": train("lr_3e38", "--lr", "3e38", "--max-update", "2"),
        "valid_on_train": train("valid_on_train", "--valid-subset", "valid,train"),
        "eval_missing": evaluate("--gen-subset", "valid", "--path", str(root / "nope.pt")),
        "eval_directory": evaluate("--gen-subset", "valid", "--path", str(root / "good")),
        "eval_train": evaluate(
            "--gen-subset", "train", "--path", str(checkpoint), "--batch-size", "4"
        ),  # fmt: skip
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(Case.run, table.values()))
    table["root"] = root  # type: ignore[assignment]
    return table


def assert_nothing_written(round_three, name: str) -> None:
    """The failed start left no --save-dir (and so no crash.pt) behind."""
    assert not (round_three["root"] / "round_three" / name).exists()


def test_restore_file_that_does_not_exist_is_refused(round_three):
    root = round_three["root"]
    round_three["restore_missing"].assert_clear_failure(
        f"--restore-file: checkpoint {root / 'nope.pt'} does not exist"
    )
    assert_nothing_written(round_three, "restore_missing")
    # a name relative to --save-dir: refused, pointing at the file there; nothing changed
    round_three["restore_relative"].assert_clear_failure(
        "checkpoint checkpoint_best.pt does not exist",
        "read from the working directory, not --save-dir",
        f"did you mean {root / 'resume_relative' / 'checkpoint_best.pt'}?",
    )


def test_artbp_with_truncation_length_one_is_refused_before_anything_is_written(round_three):
    round_three["artbp_k1"].assert_clear_failure(
        "--gradient-estimator artbp", "--truncation-length must be at least 2 (got 1)"
    )
    assert_nothing_written(round_three, "artbp_k1")


def test_estimator_with_monitor_bias_is_refused(round_three):
    round_three["uoro_monitor"].assert_clear_failure(
        "--gradient-estimator uoro does not take --monitor-bias"
    )
    assert_nothing_written(round_three, "uoro_monitor")


def test_options_an_estimator_ignores_are_named_in_one_warning(round_three):
    case = round_three["artbp_ignored"]
    assert case.returncode == 0, case.output[-3000:]
    warnings = [line for line in case.output.splitlines() if "options without effect" in line]
    assert len(warnings) == 1, case.output[-3000:]
    assert "--estimate-window 50 (--gradient-estimator artbp runs no bias estimate)" in warnings[0]
    assert (
        "--tbptt-style overlap (--gradient-estimator artbp trains disjoint segments)"
        in (warnings[0])
    )


def test_learning_rates_beyond_float32_end_in_one_line(round_three):
    round_three["lr_1e300"].assert_clear_failure(
        "--lr 1e+300 is beyond the largest float32 number (3.4e+38)", "lower --lr"
    )
    assert_nothing_written(round_three, "lr_1e300")
    # representable, and diverges in its first update: the divergence check's line
    round_three["lr_3e38"].assert_clear_failure("training diverged at update", "lower --lr")
    for name in ("lr_1e300", "lr_3e38"):
        assert "Traceback" not in round_three[name].output


def test_validating_on_the_training_split_is_refused(round_three):
    round_three["valid_on_train"].assert_clear_failure(
        "--valid-subset valid,train names the training split train",
        "fairseq-eval-lm --gen-subset train",
    )
    assert_nothing_written(round_three, "valid_on_train")


def test_eval_lm_path_that_is_missing_or_a_directory(round_three):
    root = round_three["root"]
    round_three["eval_missing"].assert_clear_failure(
        f"checkpoint {root / 'nope.pt'} does not exist; give the path of a checkpoint file"
    )
    round_three["eval_directory"].assert_clear_failure(
        f"checkpoint {root / 'good'} is a directory (it holds checkpoint",
        "give the path of a checkpoint file",
    )
    for name in ("eval_missing", "eval_directory"):
        assert "Traceback" not in round_three[name].output


def test_eval_lm_scores_the_training_split(round_three, tiny_corpus):
    case = round_three["eval_train"]
    assert case.returncode == 0, case.output[-3000:]
    train_tokens = int(re.search(r"train: ([\d,]+) tokens from", case.output)[1].replace(",", ""))
    # one stateful pass: every token but the first is scored
    assert f"Evaluated {train_tokens - 1:,} tokens" in case.output, case.output[-3000:]
    assert "Perplexity" in case.output


def test_check_checkpoint_path_tells_a_directory_from_a_missing_file(tmp_path):
    (tmp_path / "checkpoint_best.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"is a directory \(it holds checkpoint_best.pt\)"):
        check_checkpoint_path(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint_path(tmp_path / "nope.pt")
    check_checkpoint_path(tmp_path / "checkpoint_best.pt")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"gradient_estimator": "artbp", "truncation_length": 1}, "must be at least 2 (got 1)"),
        ({"gradient_estimator": "kf-rtrl", "monitor_bias": True}, "does not take --monitor-bias"),
        ({"lr": [1e39]}, "--lr 1e+39 is beyond the largest float32 number"),
        # 2e38 alone fits, scaled by sqrt(300 / 35) at K_max it does not
        ({"lr": [2e38], "target_bias": 0.5, "lr_scaling": "sqrt"}, "x 2.93 (--lr-scaling at K = 300)"),
        ({"lr": [0.5, -0.1]}, "--lr must be at least 0 (got -0.1)"),
        ({"valid_subset": "train"}, "--valid-subset train names the training split train"),
    ],
)  # fmt: skip
def test_refused_combinations_are_named_by_their_flags(overrides, fragment):
    config = AdaptiveTbpttLmConfig(data="unused", seed=1, train_subset="train", **overrides)
    with pytest.raises(UserInputError) as error:
        check_config(config)
    assert fragment in str(error.value)


def test_valid_subset_train_is_fine_without_validation_and_lr_zero_is_accepted():
    for overrides in ({"valid_subset": "train", "disable_validation": True}, {"lr": [0.0, 3e38]}):
        check_config(
            AdaptiveTbpttLmConfig(data="unused", seed=1, train_subset="train", **overrides)
        )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, None),  # the defaults: nothing ignored is given
        ({"gradient_estimator": "uoro", "tbptt_style": "disjoint"}, None),
        ({"target_bias": 0.1, "min_truncation_length": 5, "estimate_window": 100}, None),
        ({"monitor_bias": True, "estimate_window": 100}, None),
        ({"gradient_estimator": "uoro"},
         "--tbptt-style overlap (--gradient-estimator uoro trains disjoint segments)"),
        ({"min_truncation_length": 5, "estimate_window": 100},
         "--min-truncation-length 5 (K stays fixed without --target-bias); --estimate-window 100 "
         "(a fixed K without --monitor-bias runs no bias estimate)"),
        ({"target_bias": 0.1, "monitor_bias": True},
         "--monitor-bias (an adaptive K estimates the bias anyway)"),
        ({"target_bias": 0.1, "estimate_interval": 5, "estimate_budget": 0.1},
         "--estimate-budget 0.1 (--estimate-interval schedules the estimates by updates)"),
        ({"lr_scaling_reference": 1}, "--lr-scaling-reference 1 (--lr-scaling none scales nothing)"),
        ({"first_estimate": "scheduled"},
         "--first-estimate scheduled (a fixed K without --monitor-bias runs no bias estimate)"),
        ({"lr_scaling": "sqrt"},
         "--lr-scaling sqrt (K stays at K0, where --lr-scaling-reference 0 applies --lr unscaled)"),
    ],
)  # fmt: skip
def test_options_a_combination_ignores_are_warned_about_in_one_line(overrides, expected, caplog):
    config = AdaptiveTbpttLmConfig(data="unused", seed=1, train_subset="train", **overrides)
    with caplog.at_level(logging.WARNING, logger="atbptt_fairseq.tasks.config"):
        check_option_combinations(config)
    messages = [record.getMessage() for record in caplog.records]
    if expected is None:
        assert messages == []
    else:
        assert messages == [f"options without effect in this combination: {expected}"]


def test_resume_of_an_estimator_ignores_the_style_it_does_not_train_with(tiny_corpus, caplog):
    config = AdaptiveTbpttLmConfig(
        data=str(tiny_corpus), seed=1, train_subset="train", gradient_estimator="artbp",
        tbptt_style="disjoint",
    )  # fmt: skip
    assert "tbptt_style" in options_without_effect(config)
    task = AdaptiveTbpttLmTask.setup_task(config)
    saved = dataclasses.asdict(task.method)
    saved["tbptt_style"] = "overlap"  # the default the run was started with
    with caplog.at_level(logging.WARNING):
        # no refusal: artbp trains disjoint segments either way
        check_resumed_options(saved, task.method, options_without_effect(task.cfg))
    assert "--tbptt-style 'overlap' -> 'disjoint'" in caplog.text
    # the same change in a truncated BPTT run is refused
    tbptt = AdaptiveTbpttLmTask.setup_task(
        AdaptiveTbpttLmConfig(data=str(tiny_corpus), seed=1, train_subset="train",
                              tbptt_style="disjoint")
    )  # fmt: skip
    with pytest.raises(UserInputError, match="cannot resume with --tbptt-style"):
        check_resumed_options(saved, tbptt.method, options_without_effect(tbptt.cfg))
