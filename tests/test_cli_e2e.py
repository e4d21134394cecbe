"""End to end through the real fairseq-train, fairseq-hydra-train and fairseq-eval-lm."""

import ast
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_TRAIN, USER_DIR, json_records, random_sentences, run_cli
from fairseq import checkpoint_utils
from fairseq.data import data_utils

from atbptt.records import METRICS_FILE, read_records
from atbptt_fairseq import fairseq_fixes

# in-process calls into fairseq run as its CLIs do with the plugin: with its fixes
fairseq_fixes.install()

pytestmark = pytest.mark.e2e

TRAIN_TINY = [
    *TINY_TRAIN,
    "--batch-size", "4",
    "--cpu",
    "--log-format", "json",
    "--log-interval", "10",
    "--no-progress-bar",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A fixed-K overlap run of two epochs; returns (data dir, checkpoint dir, log)."""
    save_dir = tmp_path_factory.mktemp("fixed")
    output = run_cli(
        "fairseq-train", str(tiny_corpus), *TRAIN_TINY,
        "--truncation-length", "10", "--max-epoch", "2", "--save-dir", str(save_dir),
    )  # fmt: skip
    return tiny_corpus, save_dir, output


def test_training_logs_the_truncation_length(trained):
    _, save_dir, output = trained
    records = json_records(output, "train_inner")
    assert records and all(record["trunc_k"] == "10" for record in records)
    assert (save_dir / "checkpoint_last.pt").exists()


def unsafe_globals(path: Path) -> list:
    """Unsafe globals as a fresh interpreter sees them (this one allowlisted argparse.Namespace)."""
    code = (
        "import sys, torch; "
        "print(torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    return ast.literal_eval(result.stdout.strip())


def test_checkpoints_hold_no_unsafe_globals(trained):
    _, save_dir, _ = trained
    path = save_dir / "checkpoint_last.pt"
    assert unsafe_globals(path) == []
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=True)"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def eval_lm_loss(data: Path, checkpoint: Path, split: str = "valid") -> float:
    output = run_cli(
        "fairseq-eval-lm", str(data), "--user-dir", USER_DIR, "--task", "adaptive_tbptt_lm",
        "--path", str(checkpoint), "--gen-subset", split, "--cpu",
    )  # fmt: skip
    return float(re.search(r"Loss \(base 2\): ([0-9.]+)", output).group(1))


def task_validation_loss(data: Path, checkpoint: Path, split: str = "valid") -> float:
    """The task's own stateful validation, driven in process as fairseq's validate loop does."""
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data)}
    )
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset(split)
    task.begin_valid_epoch(1, models[0])
    loss_sum, sample_size = 0.0, 0
    for sample in task.get_batch_iterator(task.dataset(split)).next_epoch_itr(shuffle=False):
        loss, size, _ = task.valid_step(sample, models[0], criterion)
        loss_sum, sample_size = loss_sum + float(loss), sample_size + size
    return loss_sum / sample_size / math.log(2)


def single_pass_loss(data: Path, checkpoint: Path, split: str = "valid") -> float:
    """One forward over the whole split with batch 1 from a zero state, outside the task."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data)}
    )
    dataset = data_utils.load_indexed_dataset(str(data / split), task.dictionary)
    tokens = torch.cat([dataset[i].long() for i in range(len(dataset))])
    model = models[0].eval()
    with torch.no_grad():
        logits, _ = model.decoder(tokens[None, :-1])
    nll = F.cross_entropy(logits[0].double(), tokens[1:], reduction="mean")
    return float(nll) / math.log(2)


def test_eval_lm_equals_validation_and_a_single_pass(trained):
    data, save_dir, output = trained
    checkpoint = save_dir / "checkpoint_last.pt"
    reference = single_pass_loss(data, checkpoint)
    validation = task_validation_loss(data, checkpoint)
    evaluated = eval_lm_loss(data, checkpoint)
    assert validation == pytest.approx(reference, rel=1e-4)
    assert evaluated == pytest.approx(reference, rel=1e-4, abs=5e-5)  # printed to 4 decimals
    logged = float(json_records(output, "valid")[-1]["valid_loss"])
    assert logged == pytest.approx(reference, abs=5e-4)  # logged to 3 decimals


def test_disjoint_style_and_hydra_config(tiny_corpus, tmp_path):
    output = run_cli(
        "fairseq-hydra-train", "--config-dir", str(REPO / "configs"), "--config-name", "tiny",
        f"task.data={tiny_corpus}", f"checkpoint.save_dir={tmp_path}",
        f"common.user_dir={USER_DIR}", "+task.tbptt_style=disjoint", "optimization.max_epoch=1",
        cwd=tmp_path,  # hydra writes its .hydra/ run files into the working directory
    )  # fmt: skip
    assert "LSTM(16, 16" in output  # the config's tbptt_lstm_lm_tiny sizes, not the generic ones
    records = json_records(output, "train_inner")
    assert records and records[-1]["trunc_k"] == "10"
    assert json_records(output, "valid")
    assert (tmp_path / "checkpoint_last.pt").exists()


def test_sharded_data_paths_are_used_in_turn(tiny_corpus, tmp_path):
    second = tmp_path / "second"
    second.mkdir()
    for split, seed in (("train", 7), ("valid", 8), ("test", 9)):
        (second / f"{split}.txt").write_text("\n".join(random_sentences(200, 40, seed)) + "\n")
    run_cli(
        "fairseq-preprocess", "--only-source", "--srcdict", str(tiny_corpus / "dict.txt"),
        "--trainpref", str(second / "train.txt"), "--validpref", str(second / "valid.txt"),
        "--destdir", str(second / "bin"), "--workers", "1",
    )  # fmt: skip
    output = run_cli(
        "fairseq-train", f"{tiny_corpus}:{second / 'bin'}", *TRAIN_TINY,
        "--truncation-length", "10", "--max-epoch", "2", "--no-save",
    )  # fmt: skip
    sources = re.findall(r"train: [0-9,]+ tokens from (\S+)", output)
    # epoch 1 on the first shard, epoch 2 on the second (fairseq then prepares epoch 3 on the first)
    assert sources[:2] == [str(tiny_corpus), str(second / "bin")]


def test_max_train_tokens_stops_training_and_survives_resume(tiny_corpus, tmp_path):
    """--max-train-tokens stops at the first update that reaches it, through fairseq's own stop
    (validation and checkpoints); the count is in the checkpoint, so a run resumed with a larger
    budget stops where an uninterrupted run would."""

    def train(budget: int) -> str:
        return run_cli(
            "fairseq-train", str(tiny_corpus), *TINY_TRAIN, "--truncation-length", "4",
            "--batch-size", "2", "--cpu", "--max-train-tokens", str(budget),
            "--save-dir", str(tmp_path), "--no-epoch-checkpoints",
            "--log-format", "json", "--log-interval", "1", "--no-progress-bar",
        )  # fmt: skip

    first = train(30)  # 2 columns x K 4 = 8 scored tokens per update: 4 updates reach 32
    assert "scored tokens: 32 >= max_train_tokens: 30" in first
    assert [r["num_updates"] for r in json_records(first, "train_inner")] == ["1", "2", "3", "4"]
    assert json_records(first, "valid")[-1]["valid_num_updates"] == "4"
    assert (tmp_path / "checkpoint_last.pt").exists()
    resumed = train(60)
    assert "scored tokens: 64 >= max_train_tokens: 60" in resumed
    assert [r["num_updates"] for r in json_records(resumed, "train_inner")] == ["5", "6", "7", "8"]
    # the metrics records go on across the resume, one per update
    updates = read_records(tmp_path / METRICS_FILE, "update")
    assert [r["update"] for r in updates] == list(range(8))
    assert [r["scored_tokens"] for r in updates] == [8 * (u + 1) for u in range(8)]


def test_max_processed_tokens_counts_windows_and_estimates(tiny_corpus, tmp_path):
    """--max-processed-tokens counts every token run through the model: each training window and
    each estimate of the adaptive K (burn-in included), so runs of any K get the same compute."""
    output = run_cli(
        "fairseq-train", str(tiny_corpus), *TINY_TRAIN, "--truncation-length", "4",
        "--tbptt-style", "disjoint", "--batch-size", "2", "--cpu", "--max-processed-tokens", "40",
        "--target-bias", "0.5", "--min-truncation-length", "4", "--max-truncation-length", "4",
        "--estimate-interval", "2", "--first-estimate", "scheduled", "--estimate-window", "6",
        "--estimate-burnin", "2", "--estimate-sequences", "2", "--estimate-repeats", "1",
        "--save-dir", str(tmp_path), "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", "1", "--no-progress-bar",
    )  # fmt: skip
    # 2 columns x K 4 = 8 tokens per update; the estimate before the third update runs
    # 1 x 2 x (2 + 6) = 16: 8 + 8 + (16 + 8) = 40 stops after three updates
    assert "processed tokens: 40 >= max_processed_tokens: 40" in output
    records = json_records(output, "train_inner")
    assert [r["num_updates"] for r in records] == ["1", "2", "3"]
    assert [float(r["ppb"]) for r in records] == [8, 8, 24]  # logged per update, for sweeps
    decisions = read_records(tmp_path / METRICS_FILE, "k_decision")
    assert [(d["update"], d["truncation_length"]) for d in decisions] == [(2, 4)]
    updates = read_records(tmp_path / METRICS_FILE, "update")
    assert [r["processed_tokens"] for r in updates] == [8, 16, 40]
    for logged, record in zip(records, updates):  # the log shows the records' values
        assert float(logged["trunc_k"]) == record["trunc_k"]
    (epoch,) = json_records(output, "train")  # the epoch's mean K and its last update's
    assert float(epoch["train_trunc_k_last"]) == updates[-1]["trunc_k"]
    assert float(records[-1]["bias_hat"]) == pytest.approx(updates[-1]["bias_hat"], rel=1e-5)
    fields = {"relative_bias", "decay_rate", "seconds", "changed", "fallback", "raw_choice"}
    assert fields <= decisions[0].keys()
    assert decisions[0]["reason"].startswith("mean of 1 smallest K with bias_hat < 0.5")


def test_validation_every_processed_tokens(tiny_corpus, tmp_path):
    """--validate-interval-processed-tokens validates and saves at equal compute, and the count
    resumes: a run of K 4 (8 tokens per update) validates every 2 updates for 16 tokens. Each
    validation of each split is a valid record of atbptt_metrics.jsonl, once across the resume,
    with the loss fairseq logs, as each update's record has the training loss."""

    def train(updates: int) -> str:
        return run_cli(
            "fairseq-train", str(tiny_corpus), *TINY_TRAIN, "--truncation-length", "4",
            "--tbptt-style", "disjoint", "--batch-size", "2", "--cpu", "--max-update", str(updates),
            "--validate-interval-processed-tokens", "16", "--save-dir", str(tmp_path),
            "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1",
            "--no-progress-bar", "--valid-subset", "valid,test",
        )  # fmt: skip

    first = train(5)
    validated = [r["valid_num_updates"] for r in json_records(first, "valid")]
    assert validated == ["2", "4", "5"]  # 5: the end of training
    assert (tmp_path / "checkpoint_1_4.pt").exists() or (tmp_path / "checkpoint_last.pt").exists()
    resumed = train(8)
    assert [r["valid_num_updates"] for r in json_records(resumed, "valid")] == ["6", "8"]
    records = read_records(tmp_path / METRICS_FILE, "valid")
    assert [(r["num_updates"], r["subset"]) for r in records] == [
        (n, subset) for n in (2, 4, 5, 6, 8) for subset in ("valid", "test")
    ]
    for subset in ("valid", "test"):
        logged = json_records(first, subset) + json_records(resumed, subset)
        recorded = [r for r in records if r["subset"] == subset]
        for line, record in zip(logged, recorded, strict=True):
            assert round(record["loss"], 3) == pytest.approx(float(line[f"{subset}_loss"]))
            assert record["ppl"] == pytest.approx(float(line[f"{subset}_ppl"]), abs=0.01)
    assert [r["processed_tokens"] for r in records[::2]] == [16, 32, 40, 48, 64]
    updates = read_records(tmp_path / METRICS_FILE, "update")  # with fairseq's training loss
    inner = json_records(first, "train_inner") + json_records(resumed, "train_inner")
    assert [r["update"] + 1 for r in updates] == [int(line["num_updates"]) for line in inner]
    logged = [float(line["loss"]) for line in inner]
    assert [r["loss"] for r in updates] == pytest.approx(logged, abs=1.5e-3)
    # the run's clock goes on across the resume
    walls = [r["wall"] for r in read_records(tmp_path / METRICS_FILE) if "wall" in r]
    assert len(walls) == len(records) + len(updates)
    assert all(later >= earlier for earlier, later in zip(walls, walls[1:])) and walls[0] >= 0


def test_processed_token_validation_replaces_the_epoch_end_validation(tiny_corpus, tmp_path):
    """Under --validate-interval-processed-tokens an epoch end neither validates nor saves (the
    task's epoch is a fixed number of update slots, so a run whose K fell would be validated more
    often than another of the same compute), except the last epoch of --max-epoch."""

    def train(*extra: str) -> list[str]:
        output = run_cli(
            "fairseq-train", str(tiny_corpus), *TINY_TRAIN, "--truncation-length", "4",
            "--tbptt-style", "disjoint", "--batch-size", "2", "--cpu", "--updates-per-epoch", "3",
            "--save-dir", str(tmp_path / "_".join(extra)), "--log-format", "json",
            "--log-interval", "1", "--no-progress-bar", *extra,
        )  # fmt: skip
        return [r["valid_num_updates"] for r in json_records(output, "valid")]

    assert train("--max-update", "7") == ["3", "6", "7"]  # fairseq's epoch ends
    # 8 processed tokens an update: every 2 updates for 16, never at the epoch ends 3 and 6
    assert train("--max-update", "7", "--validate-interval-processed-tokens", "16") == [
        "2", "4", "6", "7",
    ]  # fmt: skip
    # every 5 updates for 40, and at the end of the last epoch (6)
    assert train("--max-epoch", "2", "--validate-interval-processed-tokens", "40") == ["5", "6"]


def test_a_diverged_training_loss_stops_the_run_before_it_is_saved(tiny_corpus, tmp_path):
    """--lr 1e6 drives the loss to ~1e6 bits per token (ppl inf): the run ends with one line
    naming the update and K, and the checkpoint saved before it is kept as it was."""
    args = [
        str(tiny_corpus), *TINY_TRAIN, "--batch-size", "2", "--cpu", "--truncation-length", "4",
        "--save-dir", str(tmp_path), "--no-epoch-checkpoints", "--no-progress-bar",
    ]  # fmt: skip
    run_cli("fairseq-train", *args, "--max-update", "2")
    saved = (tmp_path / "checkpoint_last.pt").read_bytes()
    output = run_cli("fairseq-train", *args, "--max-update", "8", "--lr", "1e6", check=False)
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert re.match(
        r"atbptt_fairseq: error: training diverged at update [3-8]: the training loss is "
        r"\S+ bits per token at K = 4 \(perplexity overflows\); \S+checkpoint_last.pt, saved "
        r"before it, is kept; lower --lr",
        last,
    ), last
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == saved


def test_legacy_fairseq_checkpoints_load_with_the_plugin(tiny_corpus, tmp_path):
    # No loader process and no prefetch thread: a 2-update run can end while fairseq's daemon
    # prefetch thread is inside a torch call, and the interpreter's exit then aborts the process
    # (SIGABRT after "done training", pytorch/pytorch#38228), which is not what this test is about.
    run_cli(
        "fairseq-train", str(tiny_corpus), "--task", "language_modeling", "--arch", "lstm_lm",
        "--decoder-embed-dim", "8", "--decoder-hidden-size", "8", "--decoder-out-embed-dim", "8",
        "--decoder-layers", "1", "--tokens-per-sample", "16", "--batch-size", "4",
        "--optimizer", "sgd", "--lr", "0.1", "--max-update", "2", "--cpu",
        "--num-workers", "0", "--data-buffer-size", "0",
        "--save-dir", str(tmp_path), "--no-epoch-checkpoints",
    )  # fmt: skip
    checkpoint = tmp_path / "checkpoint_last.pt"
    assert "argparse.Namespace" in unsafe_globals(checkpoint)
    output = run_cli(
        "fairseq-eval-lm", str(tiny_corpus), "--user-dir", USER_DIR, "--path", str(checkpoint),
        "--gen-subset", "valid", "--cpu", "--tokens-per-sample", "16",
    )  # fmt: skip
    assert "Perplexity" in output


def test_a_paper_config_runs_its_grid_with_hydra_multirun(tmp_path):
    """``fairseq-hydra-train -m`` runs the grid of configs/copy_fixed.yaml (narrowed here to two
    values of K), each run in its own checkpoint directory, with the paper's lr 1.0 * sqrt(K)."""
    data = tmp_path / "copy"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_copy_task.py"), "--dest", str(data),
         "--variable", "--columns", "4", "--train-steps", "60", "--valid-steps", "20",
         "--test-steps", "20"],
        check=True, capture_output=True,
    )  # fmt: skip
    output = run_cli(
        "fairseq-hydra-train", "-m", "--config-dir", str(REPO / "configs"),
        "--config-name", "copy_fixed", f"task.data={data}", f"common.user_dir={USER_DIR}",
        "task.truncation_length=4,9", "dataset.batch_size=2", "optimization.max_update=2",
        "common.log_interval=1", "common.cpu=true",
        cwd=tmp_path,
    )  # fmt: skip
    records = json_records(output, "train_inner")
    assert [(r["trunc_k"], r["lr_scale"]) for r in records] == [("4", "2")] * 2 + [("9", "3")] * 2
    for k in (4, 9):
        assert (
            tmp_path / "checkpoints" / "copy_fixed" / f"K{k}_seed1" / "checkpoint_last.pt"
        ).exists()
    # the copy model learned the targets: scoring it on the next input is refused, not reported
    checkpoint = tmp_path / "checkpoints" / "copy_fixed" / "K4_seed1" / "checkpoint_last.pt"
    evaluate = ["--path", str(checkpoint), "--user-dir", USER_DIR, "--task", "adaptive_tbptt_lm"]
    refused = run_cli("fairseq-eval-lm", str(data), *evaluate, "--cpu", check=False)
    assert (
        "error: the checkpoint was trained to predict the targets in --target-dir targets"
        in (refused.strip().splitlines()[-1])
    )
    scored = run_cli("fairseq-eval-lm", str(data), *evaluate, "--cpu", "--target-dir", "targets")
    assert "Perplexity" in scored
