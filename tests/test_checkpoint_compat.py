"""Checkpoints written by earlier versions of the plugin still resume and evaluate.

``tests/data/checkpoint_before_refactor`` holds a checkpoint that the plugin wrote before its
fairseq adapter was restructured (see the README there): resuming it must reproduce the
uninterrupted run's next updates, and fairseq-eval-lm must score it as it did then.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, USER_DIR, json_records, run_cli

pytestmark = pytest.mark.e2e

FIXTURE = REPO / "tests" / "data" / "checkpoint_before_refactor"
# the options the fixture was trained with (stopped after update 6)
TRAIN = [
    "--user-dir", USER_DIR,
    "--task", "adaptive_tbptt_lm",
    "--arch", "tbptt_lstm_lm",
    "--embed-dim", "8",
    "--hidden-size", "8",
    "--dropout", "0.1",
    "--criterion", "tbptt_cross_entropy",
    "--optimizer", "adam",
    "--lr", "0.01",
    "--batch-size", "4",
    "--updates-per-epoch", "4",
    "--truncation-length", "6",
    "--target-bias", "0.1",
    "--min-truncation-length", "2",
    "--max-truncation-length", "12",
    "--estimate-window", "12",
    "--estimate-interval", "3",
    "--estimate-sequences", "4",
    "--estimate-repeats", "2",
    "--estimate-method", "norms",  # the defaults of then
    "--first-estimate", "scheduled",
    "--lr-scaling", "sqrt",
    "--seed", "3",
    "--cpu",
    "--log-format", "json",
    "--log-interval", "1",
    "--no-progress-bar",
    "--no-epoch-checkpoints",
]  # fmt: skip
TIMING_KEYS = {"wps", "ups", "wall", "train_wall", "est_sec", "gb_free"}


def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def test_an_old_checkpoint_resumes_exactly(tmp_path):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    shutil.copyfile(FIXTURE / "checkpoint_last.pt", save_dir / "checkpoint_last.pt")
    output = run_cli(
        "fairseq-train", str(FIXTURE / "data"), *TRAIN, "--max-update", "10",
        "--save-dir", str(save_dir),
    )  # fmt: skip
    assert re.search(r"Loaded checkpoint \S+ \(epoch 2 @ 6 updates\)", output), output[-3000:]
    records = {
        record["num_updates"]: {k: v for k, v in record.items() if k not in TIMING_KEYS}
        for record in json_records(output, "train_inner")
    }
    assert records == expected()["train_inner"]


def test_an_old_checkpoint_evaluates_as_before(tmp_path):
    output = run_cli(
        "fairseq-eval-lm", str(FIXTURE / "data"), "--user-dir", USER_DIR,
        "--task", "adaptive_tbptt_lm", "--path", str(FIXTURE / "checkpoint_last.pt"),
        "--gen-subset", "valid", "--cpu",
    )  # fmt: skip
    match = re.search(r"Loss \(base 2\): ([\d.]+)", output)
    assert match, output[-3000:]
    assert match.group(1) == expected()["eval_lm_valid_loss_base2"]
    assert not list(Path(FIXTURE).glob("*.tmp"))


def test_an_old_checkpoint_is_refused_on_other_targets():
    """Older checkpoints recorded their --target-dir only in their config: the loader's upgrade
    hands it to the task, which refuses to score the model on targets it never learned."""
    output = run_cli(
        "fairseq-eval-lm", str(FIXTURE / "data"), "--user-dir", USER_DIR,
        "--task", "adaptive_tbptt_lm", "--path", str(FIXTURE / "checkpoint_last.pt"),
        "--gen-subset", "valid", "--cpu", "--target-dir", "targets", check=False,
    )  # fmt: skip
    last = output.strip().splitlines()[-1]
    assert last.startswith("atbptt_fairseq: error: the checkpoint was trained to predict the next")
