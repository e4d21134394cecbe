"""Exact resume through fairseq-train.

A run that stops (or is killed with SIGKILL) right after a checkpoint and is started again with the
same command continues exactly as an uninterrupted run: same stream position, carried state, K,
estimate schedule and random state. On CPU the per-update logs and the final parameters and
optimizer state are bitwise equal.
"""

import copy
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from conftest import (
    BIN,
    REPO,
    TINY_TRAIN,
    USER_DIR,
    StubOptimizer,
    json_records,
    random_sentences,
    run_cli,
)

from atbptt_fairseq import fairseq_fixes
from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLanguageModel
from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmConfig, AdaptiveTbpttLmTask

# in-process calls into fairseq run as its CLIs do with the plugin: with its fixes
fairseq_fixes.install()

pytestmark = pytest.mark.e2e

TOTAL_UPDATES = 30  # 3 epochs of 10 update slots
TRAIN = [
    "--user-dir", USER_DIR,
    "--task", "adaptive_tbptt_lm",
    "--arch", "tbptt_lstm_lm",
    "--embed-dim", "16",
    "--hidden-size", "16",
    "--dropout", "0.1",  # the random state matters
    "--criterion", "tbptt_cross_entropy",
    "--optimizer", "adam",  # and so does the optimizer state
    "--lr", "0.01",
    "--batch-size", "4",
    "--updates-per-epoch", "10",
    "--truncation-length", "8",
    "--seed", "3",
    "--cpu",
    "--log-format", "json",
    "--log-interval", "1",
    "--no-progress-bar",
    "--max-update", str(TOTAL_UPDATES),
]  # fmt: skip
# K changes at every estimate (updates 7, 14, 21, 28: 8 -> 6 -> 5 -> 4 -> 2)
ADAPTIVE = [
    "--target-bias", "0.1",
    "--min-truncation-length", "2",
    "--max-truncation-length", "20",
    "--estimate-window", "20",
    "--estimate-interval", "7",
    "--estimate-sequences", "4",
    "--estimate-repeats", "2",
    "--lr-scaling", "sqrt",
]  # fmt: skip
# the same on the compute budget: estimates at updates 7, 15 and 28 (K 8 -> 6 -> 4 -> 2)
ADAPTIVE_BUDGET = [
    *ADAPTIVE[: ADAPTIVE.index("--estimate-interval")],
    "--estimate-interval", "0",
    "--estimate-budget", "0.5",
    *ADAPTIVE[ADAPTIVE.index("--estimate-interval") + 2 :],
    "--estimate-method", "norms", "--first-estimate", "scheduled",  # the paper's: K moves here
]  # fmt: skip
EXTRA_ARGS = {"fixed": [], "adaptive": ADAPTIVE, "adaptive_budget": ADAPTIVE_BUDGET}
TIMING_KEYS = {"wps", "ups", "wall", "train_wall", "est_sec", "gb_free"}


def with_max_update(args: List[str], max_update: int) -> List[str]:
    position = args.index("--max-update")
    return [*args[: position + 1], str(max_update), *args[position + 2 :]]


def per_update(output: str) -> Dict[int, Dict[str, str]]:
    """train_inner records by update number, without wall-clock fields."""
    records = {}
    for record in json_records(output, "train_inner"):
        number = int(record["num_updates"])
        records[number] = {k: v for k, v in record.items() if k not in TIMING_KEYS}
    return records


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(resumed: Path, reference: Path) -> None:
    """Parameters, optimizer state and the task's state in two checkpoints are bitwise equal."""
    a, b = load_checkpoint(resumed), load_checkpoint(reference)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    optimizer_a, optimizer_b = (
        a["last_optimizer_state"]["state"],
        b["last_optimizer_state"]["state"],
    )
    assert optimizer_a.keys() == optimizer_b.keys()
    for key in optimizer_a:
        for field, value in optimizer_a[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optimizer_b[key][field]))
    task_a = a["extra_state"]["AdaptiveTbpttLmTask"]
    task_b = b["extra_state"]["AdaptiveTbpttLmTask"]
    assert task_a["cursor"] == task_b["cursor"]
    assert all(torch.equal(x, y) for x, y in zip(task_a["carried_state"], task_b["carried_state"]))
    controller_a, controller_b = task_a["controller"], task_b["controller"]
    assert controller_a["truncation_length"] == controller_b["truncation_length"]
    assert controller_a["last_estimate_update"] == controller_b["last_estimate_update"]
    assert controller_a["tokens_since_estimate"] == controller_b["tokens_since_estimate"]
    decision_a, decision_b = controller_a["last_decision"], controller_b["last_decision"]
    if decision_a is not None:
        decision_a, decision_b = dict(decision_a), dict(decision_b)
        decision_a.pop("seconds"), decision_b.pop("seconds")
    assert decision_a == decision_b
    assert task_a["scored_tokens"] == task_b["scored_tokens"]
    assert task_a["processed_tokens"] == task_b["processed_tokens"]


def resumed_at(output: str) -> int:
    match = re.search(r"Loaded checkpoint \S+ \(epoch \d+ @ (\d+) updates\)", output)
    assert match, "the second run did not resume from a checkpoint"
    return int(match.group(1))


@pytest.fixture(scope="module")
def sharded_data(tiny_corpus, tmp_path_factory) -> str:
    """Two data shards with one dictionary, used in turn, one per epoch."""
    second = tmp_path_factory.mktemp("second_shard")
    for split, seed in (("train", 7), ("valid", 8)):
        (second / f"{split}.txt").write_text("\n".join(random_sentences(200, 40, seed)) + "\n")
    run_cli(
        "fairseq-preprocess", "--only-source", "--srcdict", str(tiny_corpus / "dict.txt"),
        "--trainpref", str(second / "train.txt"), "--validpref", str(second / "valid.txt"),
        "--destdir", str(second / "bin"), "--workers", "1",
    )  # fmt: skip
    return f"{tiny_corpus}:{second / 'bin'}"


ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
    PYTHONWARNINGS="ignore",
    PYTHONUNBUFFERED="1",
)


class Run:
    """A command-line run in the background (the machine has two cores: overlap two runs)."""

    def __init__(self, command: List[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=ENV, stdout=handle, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        code = self.process.wait(timeout=900)
        text = self.log.read_text()
        assert code == 0, f"exited {code}:\n{text[-4000:]}"
        return text


_references: Dict[Tuple[str, str], Tuple[Run, Path]] = {}


def start_reference(data: str, mode: str, tmp_path_factory) -> None:
    """Start an uninterrupted run of TOTAL_UPDATES in the background (once per data and mode)."""
    if (data, mode) not in _references:
        save_dir = tmp_path_factory.mktemp(f"reference_{mode}")
        extra = EXTRA_ARGS[mode]
        command = [str(BIN / "fairseq-train"), data, *TRAIN, *extra, "--save-dir", str(save_dir)]
        _references[data, mode] = (Run(command, save_dir / "train.log"), save_dir)


def reference_run(data: str, mode: str, tmp_path_factory):
    """Per-update records and final checkpoint of the uninterrupted run."""
    start_reference(data, mode, tmp_path_factory)
    run, save_dir = _references[data, mode]
    return per_update(run.output()), save_dir / "checkpoint_last.pt"


@pytest.mark.parametrize(
    "mode, stops, sharded",
    [
        # mid-epoch, with an estimate due at the first resumed update (14), then at the end of
        # epoch 2 (20), after which fairseq builds epoch 3's iterator before restoring the task
        ("adaptive", (14, 20), False),
        # on the token budget: both stops fall between estimates, so the tokens counted since
        # the last estimate must survive the restart for the next one to come at the same update
        ("adaptive_budget", (12, 20), False),
        # fixed K over two data shards used in turn: mid-epoch on the second shard (15), then at
        # the end of its epoch (20), so that the resumed epoch 3 starts the first shard afresh
        ("fixed", (15, 20), True),
    ],
)
def test_stop_after_checkpoints_and_resume(
    mode, stops, sharded, tiny_corpus, sharded_data, tmp_path, tmp_path_factory
):
    data = sharded_data if sharded else str(tiny_corpus)
    start_reference(data, mode, tmp_path_factory)
    extra = EXTRA_ARGS[mode]
    args = [*TRAIN, *extra, "--save-dir", str(tmp_path)]
    outputs = []
    for stop in stops:  # stop right after the checkpoint at `stop` (equivalent to a kill there)
        stopping = [*with_max_update(args, stop), "--save-interval-updates", str(stop)]
        output = run_cli("fairseq-train", data, *stopping)
        assert max(per_update(output)) == stop
        saved = load_checkpoint(tmp_path / "checkpoint_last.pt")["extra_state"]
        assert saved["AdaptiveTbpttLmTask"]["carried_state"] is not None
        outputs.append(output)
    outputs.append(run_cli("fairseq-train", data, *args))
    reference, reference_checkpoint = reference_run(data, mode, tmp_path_factory)
    previous = 0
    for output, stop in zip(outputs, [*stops, TOTAL_UPDATES]):
        if previous:
            assert resumed_at(output) == previous
        records = per_update(output)
        assert sorted(records) == list(range(previous + 1, stop + 1))
        for update in records:
            assert records[update] == reference[update], f"update {update}"
        previous = stop
    if mode.startswith("adaptive"):
        lengths = [reference[u]["trunc_k"] for u in range(1, TOTAL_UPDATES + 1)]
        assert len(set(lengths[: stops[0]])) > 1 and len(set(lengths[stops[-1] :])) > 1
    assert_same_training_state(tmp_path / "checkpoint_last.pt", reference_checkpoint)


SLOW_TRAIN = """
import sys, time
from fairseq_cli.train import cli_main  # first: it sets up fairseq's log format
from fairseq.trainer import Trainer

slow_from = int(sys.argv.pop(1))
train_step = Trainer.train_step


def slow_train_step(self, samples, raise_oom=False):
    output = train_step(self, samples, raise_oom)
    if self.get_num_updates() >= slow_from:
        time.sleep(0.1)  # a slow model: time to kill the process in the middle of training
    return output


Trainer.train_step = slow_train_step
sys.exit(cli_main())
"""


def test_sigkill_in_the_middle_of_training_and_resume(tiny_corpus, tmp_path, tmp_path_factory):
    """SIGKILL while training, soon after the mid-epoch checkpoint of update 15; the same command
    resumes from whatever checkpoint_last.pt holds and ends exactly as an uninterrupted run."""
    start_reference(str(tiny_corpus), "adaptive", tmp_path_factory)
    save_dir = tmp_path / "checkpoints"
    args = [*TRAIN, *ADAPTIVE, "--save-dir", str(save_dir), "--save-interval-updates", "5"]
    launcher = tmp_path / "slow_train.py"
    launcher.write_text(SLOW_TRAIN)
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(launcher), "15", str(tiny_corpus), *args],
            cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not (save_dir / "checkpoint_2_15.pt").exists():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.25)  # a few more updates, none saved
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    killed = per_update((tmp_path / "killed.log").read_text())
    assert 15 <= max(killed) < TOTAL_UPDATES
    assert not list(save_dir.glob("*.tmp"))
    second = run_cli("fairseq-train", str(tiny_corpus), *args)
    reference, reference_checkpoint = reference_run(str(tiny_corpus), "adaptive", tmp_path_factory)
    start = resumed_at(second)
    assert start >= 15
    resumed = per_update(second)
    assert sorted(resumed) == list(range(start + 1, TOTAL_UPDATES + 1))
    for update in resumed:
        assert resumed[update] == reference[update], f"update {update}"
    assert_same_training_state(save_dir / "checkpoint_last.pt", reference_checkpoint)


def test_checkpoint_dict_round_trip_restores_the_next_segment(tiny_corpus):
    """In process: a task restored from get_checkpoint_dict (through torch.save and a weights-only
    load) builds the same next segment from the same state; the retry guard does not fire."""
    config = AdaptiveTbpttLmConfig(
        data=str(tiny_corpus), seed=1, train_subset="train", truncation_length=6,
        target_bias=0.5, min_truncation_length=2, max_truncation_length=12,
        estimate_window=12, estimate_interval=3, estimate_sequences=2, estimate_repeats=1,
    )  # fmt: skip

    def new_task():
        task = AdaptiveTbpttLmTask.setup_task(config)
        task.load_dataset("train")
        slots = list(
            task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr()
        )
        return task, slots

    torch.manual_seed(0)
    model = TbpttLstmLanguageModel.build_model(_model_config(), new_task()[0])
    criterion = _criterion(new_task()[0])
    optimizer = StubOptimizer(model)
    task, slots = new_task()
    for update in range(5):
        task.train_step(slots[update], model, criterion, optimizer, update)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"round_trip_{os.getpid()}.pt"
    torch.save(task.get_checkpoint_dict(), path)
    state = torch.load(path, weights_only=True)["AdaptiveTbpttLmTask"]
    path.unlink()

    restored, restored_slots = new_task()
    restored._last_call = (4, 4)  # as if it had trained: set_checkpoint_dict must forget it
    restored.set_checkpoint_dict(state)
    assert restored.loop.cursor == task.loop.cursor
    assert restored.controller.truncation_length == task.controller.truncation_length
    # a restored state lives on the CPU, as saved
    assert all(t.device.type == "cpu" for t in restored.loop.carried)
    expected = copy.deepcopy(task.loop).next_segment(model)
    got = restored.loop.next_segment(model)
    assert torch.equal(got.inputs, expected.inputs)
    assert all(torch.equal(a, b) for a, b in zip(got.state, expected.state))
    # a restored state goes to the model's device and dtype
    restored.set_checkpoint_dict(state)
    segment = restored.loop.next_segment(copy.deepcopy(model).to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in segment.state)
    restored.set_checkpoint_dict(state)
    segment = restored.loop.next_segment(copy.deepcopy(model).to("meta"))
    assert all(t.device.type == "meta" for t in segment.state)
    assert segment.inputs.device.type == "meta"
    # the first update after a restore is not mistaken for a retry of the last one before it
    restored.set_checkpoint_dict(state)
    before = restored.loop.cursor.position
    restored.train_step(restored_slots[4], model, criterion, optimizer, 4)
    assert restored.loop.cursor.position > before


def test_metrics_records_are_written_once_per_update_across_a_resume(tiny_corpus, tmp_path):
    """train_step, optimizer_step and training_diverged write one update record per update (a
    retry writes none; its training loss once known) to atbptt_metrics.jsonl in the save dir, post_validate a valid record per split; a resume
    drops the records after its update, keeping the validation before its checkpoint."""
    from atbptt.records import METRICS_FILE, read_records

    def new_task():
        config = AdaptiveTbpttLmConfig(
            data=str(tiny_corpus), seed=1, train_subset="train", truncation_length=6,
            target_bias=0.5, min_truncation_length=2, max_truncation_length=12,
            estimate_window=12, estimate_interval=2, estimate_sequences=2, estimate_repeats=1,
            save_dir=str(tmp_path), valid_subset="valid,test",
        )  # fmt: skip
        task = AdaptiveTbpttLmTask.setup_task(config)
        task.load_dataset("train")
        slots = list(
            task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr()
        )
        return task, slots

    task, slots = new_task()
    torch.manual_seed(0)
    model = TbpttLstmLanguageModel.build_model(_model_config(), task)
    criterion, optimizer = _criterion(task), StubOptimizer(model)
    optimizer.clip_grad_norm = lambda threshold: None
    optimizer.param_groups = optimizer.optimizer.param_groups
    optimizer.step = optimizer.optimizer.step
    state, losses = None, []
    for update in range(6):
        for _ in range(1 + (update == 3)):  # update 3 is retried
            _, _, logged = task.train_step(slots[update], model, criterion, optimizer, update)
            task.optimizer_step(optimizer, model, update)
        assert task.training_diverged(update + 1) is None  # fairseq-train's check: the loss
        losses.append(float(logged["loss"]) / logged["ntokens"] / math.log(2))
        if update == 3:  # fairseq validates (here on two splits), then saves
            for loss in (2.5, 2.0):
                task.post_validate(model, {"num_updates": 4, "loss": loss}, {})
            state = task.get_checkpoint_dict()["AdaptiveTbpttLmTask"]
    task.post_validate(model, {"num_updates": 6, "loss": 1.5}, {})
    path = tmp_path / METRICS_FILE
    updates = read_records(path, "update")
    assert [r["update"] for r in updates] == list(range(6))
    assert [d["update"] for d in read_records(path, "k_decision")] == [0, 2, 4]
    assert updates[-1]["scored_tokens"] == task.loop.scored_tokens
    assert updates[2]["est_sec"] > 0 and updates[3]["est_sec"] == 0
    assert [r["loss"] for r in updates] == pytest.approx(losses)  # bits per token, as logged
    assert all("wall" in r for r in updates)
    valid = [(r["num_updates"], r["subset"], r["ppl"]) for r in read_records(path, "valid")]
    assert valid == [(4, "valid", 2**2.5), (4, "test", 4.0), (6, "valid", 2**1.5)]
    restored, _ = new_task()
    restored.set_checkpoint_dict(state)
    assert [r["update"] for r in read_records(path, "update")] == list(range(4))
    assert [d["update"] for d in read_records(path, "k_decision")] == [0, 2]
    assert [r["num_updates"] for r in read_records(path, "valid")] == [4, 4]


def _model_config():
    from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLmConfig

    return TbpttLstmLmConfig(embed_dim=8, hidden_size=8, num_layers=1, dropout=0.0)


def _criterion(task):
    from atbptt_fairseq.criterions.tbptt_cross_entropy import TbpttCrossEntropyCriterion

    return TbpttCrossEntropyCriterion(task, sentence_avg=False)


def test_budget_schedule_counts_each_slot_once_and_moves_k_only_between_updates(tiny_corpus):
    """Two micro-batches per update (--update-freq 2): the tokens of every slot count once,
    retries included, and an estimate that falls due after the first micro-batch waits for the
    next update, so both micro-batches of an update train at the same K."""
    config = AdaptiveTbpttLmConfig(
        data=str(tiny_corpus), seed=1, train_subset="train", truncation_length=6,
        target_bias=0.5, min_truncation_length=2, max_truncation_length=12,
        estimate_window=12, estimate_interval=0, estimate_budget=0.25,
        estimate_sequences=2, estimate_repeats=1,
    )  # fmt: skip
    task = AdaptiveTbpttLmTask.setup_task(config)
    task.load_dataset("train")
    slots = list(task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr())
    controller = task.controller
    assert controller.tokens_between_estimates == 104  # 1 x 2 x (burn-in 1 + W 12) / 0.25
    recorded = []
    record_tokens = controller.record_tokens
    controller.record_tokens = lambda tokens: (recorded.append(tokens), record_tokens(tokens))
    torch.manual_seed(0)
    model = TbpttLstmLanguageModel.build_model(_model_config(), task)
    criterion, optimizer = _criterion(task), StubOptimizer(model)
    calls, since_estimate = [], 0  # (micro-batch, tokens since the last estimate, estimated)
    for update in range(1, len(slots) // 2 + 1):
        lengths = set()
        for micro_batch, slot in enumerate(slots[2 * update - 2 : 2 * update]):
            before = controller.last_decision
            task.train_step(slot, model, criterion, optimizer, update)
            estimated = controller.last_decision is not before
            calls.append((micro_batch, since_estimate, estimated))
            since_estimate = 0 if estimated else since_estimate
            task.train_step(slot, model, criterion, optimizer, update)  # a retry
            since_estimate += recorded[-1]
            lengths.add(controller.truncation_length)
        assert len(lengths) == 1, f"K changed inside update {update}"
    assert len(recorded) == len(calls)  # one count per slot, not per call
    assert sum(estimated for _, _, estimated in calls) >= 2
    for micro_batch, tokens, estimated in calls:
        assert estimated == (micro_batch == 0 and tokens >= 104), (micro_batch, tokens)
    assert any(micro_batch == 1 and tokens >= 104 for micro_batch, tokens, _ in calls)  # waited
    assert controller.state_dict()["tokens_since_estimate"] == since_estimate


def test_resume_says_which_options_changed_and_refuses_another_style(tiny_corpus, tmp_path):
    """The checkpoint records the method options: a resume names every change in one line, and
    refuses a --tbptt-style change (the carried state belongs to the saved style) before any
    file changes; --reset-dataloader starts a new pass, where any change is fine."""
    args = [
        str(tiny_corpus), *TINY_TRAIN, "--batch-size", "2", "--cpu", "--truncation-length", "4",
        "--tbptt-style", "disjoint", "--save-dir", str(tmp_path), "--no-epoch-checkpoints",
        "--no-progress-bar",
    ]  # fmt: skip
    run_cli("fairseq-train", *args, "--max-update", "2")
    saved = (tmp_path / "checkpoint_last.pt").read_bytes()
    refused = subprocess.run(
        [str(BIN / "fairseq-train"), *args, "--max-update", "4", "--tbptt-style", "overlap"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
    assert refused.returncode == 1, lines[-5:]
    assert lines[-1].startswith("atbptt_fairseq: error: cannot resume with --tbptt-style")
    assert "'disjoint' -> 'overlap'" in lines[-1]
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == saved
    changed = run_cli("fairseq-train", *args, "--max-update", "4", "--truncation-length", "5")
    assert "resuming with changed options: --truncation-length 4 -> 5" in changed
    run_cli("fairseq-train", *args, "--max-update", "6", "--reset-dataloader",
            "--tbptt-style", "overlap")  # fmt: skip
