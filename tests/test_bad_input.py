"""Bad input: one clear last line naming the problem and what to do, a non-zero exit, nothing
half-written; checkpoints are loaded safely (a malicious pickle is refused, not run).

The command-line cases run two at a time (the machine has two cores) in one module fixture.
"""

import logging
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from conftest import BIN, REPO, TINY_TRAIN, USER_DIR, StubOptimizer, random_sentences, run_cli

import atbptt_fairseq  # noqa: F401
from atbptt_fairseq import checkpoint_guard
from atbptt_fairseq.errors import UserInputError, find_user_error
from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLanguageModel, TbpttLstmLmConfig
from atbptt_fairseq.tasks.adaptive_tbptt_lm import (
    AdaptiveTbpttLmConfig,
    AdaptiveTbpttLmTask,
    check_config,
)

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
