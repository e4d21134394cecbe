"""Several processes on CPU: torchrun, gloo, legacy_ddp.

Two ranks with B columns each train exactly the columns one process with 2B columns trains (the
column layout is identical by construction), so losses and parameters match up to the order of
floating-point sums. K is the same on every rank at every update, and validation reports the
token-weighted mean over all ranks' evaluation columns.

The command line (see README):

    torchrun --nproc_per_node 2 $(which fairseq-train) DATA --user-dir atbptt_fairseq ... --cpu \\
        --distributed-world-size 2 --distributed-backend gloo --ddp-backend legacy_ddp \\
        --distributed-no-spawn
"""

import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import BIN, REPO, TINY_TRAIN, json_records

from atbptt.records import METRICS_FILE, read_records
from atbptt_fairseq import fairseq_fixes

# in-process calls into fairseq run as its CLIs do with the plugin: with its fixes
fairseq_fixes.install()

pytestmark = pytest.mark.e2e

TRAIN = [
    *TINY_TRAIN,
    "--updates-per-epoch", "10",
    "--max-update", "20",
    "--truncation-length", "8",
    "--cpu",
    "--log-format", "json",
    "--log-interval", "1",
    "--no-progress-bar",
    "--no-epoch-checkpoints",
]  # fmt: skip
ADAPTIVE = [
    "--target-bias", "0.1",
    "--min-truncation-length", "2",
    "--max-truncation-length", "20",
    "--estimate-window", "20",
    "--estimate-interval", "4",
    "--estimate-sequences", "4",
    "--estimate-repeats", "1",
]  # fmt: skip
DISTRIBUTED = [
    "--distributed-world-size", "2",
    "--distributed-backend", "gloo",
    "--ddp-backend", "legacy_ddp",
    "--distributed-no-spawn",
]  # fmt: skip

# fairseq-train with every rank's K, loss and validation sums recorded at full precision
RECORDING_TRAIN = """
import json, os, sys
from fairseq_cli.train import cli_main  # first: it sets up fairseq's log format
from atbptt_fairseq import fairseq_fixes
from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmTask

fairseq_fixes.install()  # the plugin is imported here, not by fairseq's --user-dir

path = os.path.join(os.environ["RECORD_DIR"], "rank%s.jsonl" % os.environ.get("RANK", "0"))
train_step, valid_step = AdaptiveTbpttLmTask.train_step, AdaptiveTbpttLmTask.valid_step


def record(**fields):
    with open(path, "a") as handle:
        handle.write(json.dumps(fields) + "\\n")


def recording_train_step(self, sample, model, criterion, optimizer, update_num, *args, **kwargs):
    output = train_step(self, sample, model, criterion, optimizer, update_num, *args, **kwargs)
    decision = self.controller.last_decision
    record(
        kind="train", update=update_num, k=output[2]["trunc_k"], loss=float(output[2]["loss"]),
        ntokens=int(output[2]["ntokens"]), bias=None if decision is None else decision.relative_bias,
    )
    return output


def recording_begin_valid_epoch(self, epoch, model):
    self.validations = getattr(self, "validations", 0) + 1
    return begin_valid_epoch(self, epoch, model)


def recording_valid_step(self, sample, model, criterion):
    output = valid_step(self, sample, model, criterion)
    record(kind="valid", validation=self.validations, loss=float(output[2]["loss"]),
           ntokens=int(output[2]["ntokens"]))
    return output


begin_valid_epoch = AdaptiveTbpttLmTask.begin_valid_epoch
AdaptiveTbpttLmTask.train_step = recording_train_step
AdaptiveTbpttLmTask.begin_valid_epoch = recording_begin_valid_epoch
AdaptiveTbpttLmTask.valid_step = recording_valid_step
sys.exit(cli_main())
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(tmp_path: Path, name: str, data: Path, args: List[str], ranks: int) -> Dict:
    """Train (torchrun with ``ranks`` processes, or one process); return logs and records."""
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    for old in directory.glob("rank*.jsonl"):
        old.unlink()
    launcher = tmp_path / "recording_train.py"
    launcher.write_text(RECORDING_TRAIN)
    common = [str(data), *TRAIN, *args, "--save-dir", str(directory)]
    if ranks > 1:
        command = [
            str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
            str(launcher), *common, *DISTRIBUTED,
        ]  # fmt: skip
    else:
        command = [str(BIN / "python"), str(launcher), *common]
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
        RECORD_DIR=str(directory),
    )  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    records = {}
    for rank in range(ranks):
        lines = (directory / f"rank{rank}.jsonl").read_text().splitlines()
        records[rank] = [json.loads(line) for line in lines]
    return {"output": output, "records": records, "checkpoint": directory / "checkpoint_last.pt"}


def train_records(records: List[Dict]) -> List[Dict]:
    return [record for record in records if record["kind"] == "train"]


def valid_loss(run_result: Dict, ranks: int) -> List[float]:
    """Token-weighted mean validation loss (base 2) over all ranks' columns, per validation."""
    per_rank = [
        [r for r in run_result["records"][rank] if r["kind"] == "valid"] for rank in range(ranks)
    ]
    losses = []
    for validation in sorted({r["validation"] for r in per_rank[0]}):
        loss = sum(r["loss"] for rank in per_rank for r in rank if r["validation"] == validation)
        tokens = sum(
            r["ntokens"] for rank in per_rank for r in rank if r["validation"] == validation
        )
        losses.append(loss / tokens / math.log(2))
    return losses


TWO_RANKS = ["--batch-size", "2", "--eval-batch-size", "1"]
ONE_PROCESS = ["--batch-size", "4", "--eval-batch-size", "2"]  # the same columns


@pytest.fixture(scope="module")
def fixed_runs(tiny_corpus, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("distributed_fixed")
    two = run(tmp_path, "two", tiny_corpus, TWO_RANKS, 2)
    one = run(tmp_path, "one", tiny_corpus, ONE_PROCESS, 1)
    return two, one


def parameters(checkpoint: Path) -> Dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["model"]


def test_two_ranks_match_one_process_with_the_same_global_batch(fixed_runs):
    two, one = fixed_runs
    rank0, rank1 = train_records(two["records"][0]), train_records(two["records"][1])
    single = train_records(one["records"][0])
    assert [r["update"] for r in rank0] == [r["update"] for r in single] == list(range(20))
    worst = 0.0
    for a, b, s in zip(rank0, rank1, single):
        assert a["k"] == b["k"] == s["k"] == 8
        assert a["ntokens"] + b["ntokens"] == s["ntokens"]
        # the global loss: sum over ranks of per-rank sums (float32, summed in another order)
        worst = max(worst, abs(a["loss"] + b["loss"] - s["loss"]) / s["loss"])
    print(f"largest relative loss difference, 2 ranks vs 1 process: {worst:.3g}")
    assert worst < 1e-6
    logged_two = [r["loss"] for r in json_records(two["output"], "train_inner")]
    logged_one = [r["loss"] for r in json_records(one["output"], "train_inner")]
    assert logged_two == logged_one  # rank 0 logs the all-reduced loss, to 3 decimals
    recorded_two, recorded_one = (
        [r["loss"] for r in read_records(run["checkpoint"].parent / METRICS_FILE, "update")]
        for run in (two, one)
    )  # rank 0 records it unrounded
    assert len(recorded_two) == 20 and recorded_two == pytest.approx(recorded_one, rel=1e-5)
    a = torch.load(two["checkpoint"], weights_only=True)["model"]
    b = torch.load(one["checkpoint"], weights_only=True)["model"]
    difference = max(float((a[name] - b[name]).abs().max()) for name in a)
    print(f"largest parameter difference, 2 ranks vs 1 process: {difference:.3g}")
    assert difference < 1e-6, difference


def test_validation_is_the_token_weighted_mean_over_all_ranks_columns(fixed_runs):
    two, one = fixed_runs
    # each rank scored its own column; one process scored both columns
    for rank in (0, 1):
        valid = [r for r in two["records"][rank] if r["kind"] == "valid"]
        assert valid and sum(r["ntokens"] for r in valid) > 0
    two_losses, one_losses = valid_loss(two, 2), valid_loss(one, 1)
    assert len(two_losses) == len(one_losses) == 2
    assert two_losses == pytest.approx(one_losses, rel=1e-6)
    logged = [float(r["valid_loss"]) for r in json_records(two["output"], "valid")]
    assert logged == pytest.approx(two_losses, abs=5e-4)  # logged to 3 decimals
    assert logged == [float(r["valid_loss"]) for r in json_records(one["output"], "valid")]
    recorded = read_records(two["checkpoint"].parent / METRICS_FILE, "valid")
    assert [r["loss"] for r in recorded] == pytest.approx(two_losses, rel=1e-6)


def test_adaptive_k_is_identical_on_every_rank(tiny_corpus, tmp_path):
    two = run(tmp_path, "adaptive", tiny_corpus, ["--batch-size", "2", *ADAPTIVE], 2)
    rank0, rank1 = train_records(two["records"][0]), train_records(two["records"][1])
    assert [r["update"] for r in rank0] == [r["update"] for r in rank1] == list(range(20))
    assert [r["k"] for r in rank0] == [r["k"] for r in rank1]
    assert {r["k"] for r in rank0} != {8}  # K did move from K0 (at the latest before update 0)
    # the gradient profile is all-reduced: both ranks see the same estimate
    assert [r["bias"] for r in rank0] == [r["bias"] for r in rank1]
    logged = [int(r["trunc_k"]) for r in json_records(two["output"], "train_inner")]
    assert logged == [r["k"] for r in rank0]


def test_resume_with_two_ranks_and_with_one_process(fixed_runs, tiny_corpus, tmp_path):
    """A two-rank run stopped at update 15 resumes exactly with two ranks (every rank gets its own
    columns' carried state back), and continues in one process with the same global batch.

    The stop is a token budget, counted over both ranks: 2 ranks x 2 columns x K 8 = 32 scored
    tokens per update, so 480 tokens end training after update 15 on every rank."""
    two, _ = fixed_runs
    stop = [*TWO_RANKS, "--max-train-tokens", "480"]
    first = run(tmp_path, "stopped", tiny_corpus, stop, 2)
    assert "scored tokens: 480 >= max_train_tokens: 480" in first["output"]
    for rank in (0, 1):
        assert [r["update"] for r in train_records(first["records"][rank])] == list(range(15))
    saved = torch.load(first["checkpoint"], weights_only=True)["extra_state"]["AdaptiveTbpttLmTask"]
    assert saved["carried_state"][0].shape[1] == 4  # the state of both ranks' columns
    shutil.copytree(tmp_path / "stopped", tmp_path / "stopped_copy")
    resumed = run(tmp_path, "stopped", tiny_corpus, TWO_RANKS, 2)
    assert "Loaded checkpoint" in resumed["output"]
    for rank in (0, 1):
        records = train_records(resumed["records"][rank])
        assert [r["update"] for r in records] == list(range(15, 20))
        for record in records:
            expected = {r["update"]: r for r in train_records(two["records"][rank])}[
                record["update"]
            ]
            assert record["loss"] == expected["loss"]  # bitwise
    a, b = parameters(resumed["checkpoint"]), parameters(two["checkpoint"])
    assert all(torch.equal(a[name], b[name]) for name in a)
    # one process, four columns, from the two-rank checkpoint
    single = run(tmp_path, "stopped_copy", tiny_corpus, ONE_PROCESS, 1)
    records = train_records(single["records"][0])
    assert [r["update"] for r in records] == list(range(15, 20))
    for record in records:
        both = [
            r
            for rank in (0, 1)
            for r in train_records(two["records"][rank])
            if r["update"] == record["update"]
        ]
        assert record["loss"] == pytest.approx(sum(r["loss"] for r in both), rel=1e-6)
    a = parameters(single["checkpoint"])
    assert max(float((a[name] - b[name]).abs().max()) for name in a) < 1e-6
