"""fairseq-train with --gradient-estimator artbp / uoro (atbptt.estimators in the fairseq task).

A few updates train with a finite loss, a run resumed from a mid-run checkpoint logs the same
per-update losses as an uninterrupted one (the estimator's RNG and carry travel in the
checkpoint), and what the estimators cannot do is refused in one line.
"""

import math
from pathlib import Path
from typing import List

import pytest
from conftest import TINY_TRAIN, run_cli, train_losses

from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.tasks.config import AdaptiveTbpttLmConfig, check_gradient_estimator

pytestmark = pytest.mark.e2e

TOTAL_UPDATES = 6


def train_args(data: Path, estimator: str, save_dir: Path, max_update: int) -> List[str]:
    return [
        str(data), *TINY_TRAIN,
        "--gradient-estimator", estimator,
        "--batch-size", "4",
        "--truncation-length", "6",
        "--updates-per-epoch", "4",  # the stop at 3 falls mid-epoch, the resume crosses epochs
        "--max-update", str(max_update),
        "--seed", "5",
        "--cpu",
        "--log-format", "json",
        "--log-interval", "1",
        "--no-progress-bar",
        "--disable-validation",
        "--save-interval-updates", "3",
        "--save-dir", str(save_dir),
    ]  # fmt: skip


@pytest.mark.parametrize("estimator", ["uoro", "artbp"])
def test_estimator_trains_and_resumes_exactly(tiny_corpus, tmp_path, estimator):
    reference = train_losses(
        run_cli("fairseq-train", *train_args(tiny_corpus, estimator, tmp_path / "a", 6))
    )
    assert sorted(reference) == list(range(1, TOTAL_UPDATES + 1))
    assert all(math.isfinite(float(loss)) for loss, _ in reference.values())
    if estimator == "artbp":  # random segment lengths, around K = 6
        assert len({k for _, k in reference.values()}) > 1
    first = train_losses(
        run_cli("fairseq-train", *train_args(tiny_corpus, estimator, tmp_path / "b", 3))
    )
    resumed = run_cli("fairseq-train", *train_args(tiny_corpus, estimator, tmp_path / "b", 6))
    assert "Loaded checkpoint" in resumed
    second = train_losses(resumed)
    assert sorted(second) == [4, 5, 6]
    assert {**first, **second} == reference


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--target-bias", "0.1"], "adaptive K is its own estimator"),
        (["--fp16"], "fp32 only"),
        (["--amp"], "fp32 only"),
        (["--arch", "lstm_lm"], "needs a stateful model"),
    ],
)
def test_refusals_are_one_line(tiny_corpus, tmp_path, extra, words):
    output = run_cli(
        "fairseq-train", *train_args(tiny_corpus, "uoro", tmp_path, 2), *extra, check=False
    )
    errors = [line for line in output.splitlines() if line.startswith("atbptt_fairseq: error:")]
    assert len(errors) == 1 and words in errors[0], output[-2000:]
    assert "Traceback" not in output


def test_more_than_one_worker_is_refused():
    config = AdaptiveTbpttLmConfig(gradient_estimator="artbp", distributed_world_size=2)
    with pytest.raises(UserInputError, match="DistributedDataParallel"):
        check_gradient_estimator(config)
    check_gradient_estimator(AdaptiveTbpttLmConfig(distributed_world_size=2))  # tbptt: fine
