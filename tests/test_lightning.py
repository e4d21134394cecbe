"""Lightning front end: a real ``lightning.Trainer`` on the copy task; K adapts, resume is exact."""

import csv
import math
import os
import re
import subprocess
import sys
import warnings

import lightning
import pytest
import torch
from conftest import REPO, PickledCommand, flip_bit_in_member, load_example
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from atbptt import CheckpointError, TbpttConfig, TbpttDriver
from atbptt.records import METRICS_FILE, read_records
from atbptt_lightning import SafeCheckpointIO, TbpttModule

copy_task = load_example("copy_task")
TOTAL_STEPS, RESUME_STEP = 15, 7


class CopyModule(TbpttModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def make_module(seed: int) -> CopyModule:
    """A 2 x 8 LSTM on 16 columns of the copy task (m in 2..4); K0 = 5, estimates every 4 steps,
    lr 0.5 x sqrt(K), gradient clipped at 2 / K by the driver and at 1 by the module."""
    tokens, targets = copy_task.copy_stream(16 * 60, 2, 4, seed=1)
    config = TbpttConfig(
        truncation_length=5, target_bias=0.1, min_truncation_length=2, max_truncation_length=20,
        estimate_window=20, estimate_burnin=4, estimate_sequences=8, estimate_repeats=1,
        estimate_interval=4, lr_scaling="sqrt", lr_scaling_reference=1,
        truncation_clip_norm=2.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = copy_task.CopyLstm(hidden=8)
    return CopyModule(model, TbpttDriver(tokens, 16, config, targets=targets), clip_norm=1.0)


def fit(module: CopyModule, tmp_path, name: str, ckpt_path=None, callbacks=(), **data) -> None:
    trainer = lightning.Trainer(
        max_steps=TOTAL_STEPS, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(tmp_path, name=name),
        callbacks=list(callbacks), enable_checkpointing=bool(callbacks), log_every_n_steps=1,
        plugins=[SafeCheckpointIO()],  # the resume below goes through the core's loader
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips about workers and callbacks
        trainer.fit(module, ckpt_path=ckpt_path, **data)


def logged(tmp_path, name: str) -> list:
    (metrics,) = (tmp_path / name).glob("version_*/metrics.csv")
    with open(metrics) as handle:
        return list(csv.DictReader(handle))


def test_lightning_trains_with_adaptive_k_and_resumes_exactly(tmp_path):
    uninterrupted = make_module(seed=0)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=RESUME_STEP, save_top_k=-1
    )
    fit(uninterrupted, tmp_path, "full", callbacks=[checkpoints])
    driver = uninterrupted.tbptt
    assert driver.num_updates == TOTAL_STEPS
    assert TOTAL_STEPS > driver.segments_per_epoch > RESUME_STEP  # resumes mid-epoch
    rows = logged(tmp_path, "full")
    lengths = [int(float(row["trunc_k"])) for row in rows if row["trunc_k"]]
    biases = [float(row["bias_hat"]) for row in rows if row.get("bias_hat")]
    assert len(lengths) == TOTAL_STEPS and len(set(lengths)) > 1, lengths
    assert len(biases) == TOTAL_STEPS and all(math.isfinite(b) for b in biases)
    (metrics_file,) = (tmp_path / "full").glob(f"version_*/{METRICS_FILE}")  # the same records
    assert [r["trunc_k"] for r in read_records(metrics_file, "update")] == lengths
    decisions = read_records(metrics_file, "k_decision")
    assert [d["update"] for d in decisions] == list(range(0, TOTAL_STEPS, 4))  # K0 5 replaced
    assert lengths[0] == decisions[0]["truncation_length"]  # before the first update

    resumed = make_module(seed=1)  # other initial weights: everything must come from the file
    (checkpoint,) = (tmp_path / "checkpoints").glob(f"*step={RESUME_STEP}.ckpt")
    fit(resumed, tmp_path, "resumed", ckpt_path=checkpoint)
    assert resumed.tbptt.num_updates == TOTAL_STEPS
    for (name, expected), actual in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(expected, actual), name
    resumed_lengths = [int(float(row["trunc_k"])) for row in logged(tmp_path, "resumed")]
    assert resumed_lengths == lengths[RESUME_STEP:]


def test_a_data_loader_of_the_users_is_refused_before_any_step(tmp_path):
    """Lightning would run the user's loader's length of steps per epoch against the driver's
    segments (5 against 27 in the issue), with the driver's epoch stuck at 0."""
    module = make_module(seed=0)
    loader = torch.utils.data.DataLoader(list(range(5)))
    with pytest.raises(ValueError, match=r"^TbpttModule makes its own training data .* DataLoader"):
        fit(module, tmp_path, "own", train_dataloaders=loader)
    assert module.tbptt.num_updates == 0

    class Data(lightning.LightningDataModule):
        def train_dataloader(self):
            return loader

    with pytest.raises(ValueError, match="makes its own training data"):
        fit(make_module(seed=0), tmp_path, "datamodule", datamodule=Data())


def test_clipping_follows_lightnings_algorithms(tmp_path):
    """clip_algorithm="value" clamps every gradient entry (Lightning's gradient_clip_algorithm);
    the default clips the norm; anything else is refused."""
    seen = []

    class Recording(CopyModule):
        def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            seen.append(max(p.grad.abs().max().item() for p in self.parameters()))

    module = make_module(seed=0)
    module.__class__ = Recording
    module.clip_norm, module.clip_algorithm = 1e-3, "value"
    fit(module, tmp_path, "value")
    # clamped: the largest entry is the clip value itself (a clipped norm would leave it below)
    assert len(seen) == TOTAL_STEPS and seen == pytest.approx([1e-3] * TOTAL_STEPS, rel=1e-6)
    with pytest.raises(ValueError, match="clip_algorithm must be 'norm' or 'value'"):
        CopyModule(module.model, module.tbptt, clip_norm=1.0, clip_algorithm="l2")


def test_safe_checkpoint_io_refuses_bad_checkpoints_in_fit(tmp_path, monkeypatch):
    """trainer.fit(ckpt_path=...) through SafeCheckpointIO: a flipped bit or pickled code raises
    CheckpointError before anything is restored, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=RESUME_STEP, save_top_k=-1
    )
    fit(make_module(seed=0), tmp_path, "full", callbacks=[checkpoints])
    (checkpoint,) = (tmp_path / "checkpoints").glob(f"*step={RESUME_STEP}.ckpt")
    flipped = tmp_path / "flipped.ckpt"
    member = flip_bit_in_member(checkpoint, flipped, "data/1")
    marker, evil = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({**torch.load(checkpoint, weights_only=True), "x": PickledCommand(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for path, expected in [(flipped, f"{member} fails its CRC-32"), (evil, "posix.system")]:
        module = make_module(seed=1)
        initial = [p.detach().clone() for p in module.parameters()]
        with pytest.raises(CheckpointError, match=expected):
            fit(module, tmp_path, "refused", ckpt_path=path)
        assert module.tbptt.num_updates == 0
        assert all(torch.equal(a, b) for a, b in zip(initial, module.parameters()))
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights only"):
        SafeCheckpointIO().load_checkpoint(checkpoint, weights_only=False)


@pytest.mark.e2e
def test_lightning_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [
            sys.executable, str(REPO / "examples" / "copy_task_lightning.py"),
            "--max-steps", "20", "--batch-size", "8", "--train-tokens", "4000", "--hidden", "16",
            "--estimate-interval", "10", "--accelerator", "cpu", "--log-dir", str(tmp_path),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    final = r"^20 updates: K = \d+ \(bias_hat [\d.e-]+, beta_hat"
    assert re.search(final, result.stdout, re.MULTILINE), result.stdout
    (metrics,) = tmp_path.glob("copy_task/version_0/metrics.csv")
    with open(metrics) as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["trunc_k"] for row in rows) and rows[-1]["bias_hat"]


def run_lightning_example(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, str(REPO / "examples" / "copy_task_lightning.py"),
            "--max-steps", "10", "--save-every", "5", "--batch-size", "8", "--train-tokens",
            "4000", "--hidden", "8", "--accelerator", "cpu", "--log-dir", str(tmp_path / "logs"),
            *args,
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                 **env),
    )  # fmt: skip


@pytest.mark.e2e
def test_lightning_example_refuses_bad_checkpoints(tmp_path):
    """--resume of a bit-flipped or malicious checkpoint: one line ``error: ...``, exit status
    1, the payload never runs, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1."""
    trained = run_lightning_example(tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    (checkpoint,) = (tmp_path / "logs").glob("copy_task/version_0/checkpoints/*step=5.ckpt")
    flipped = tmp_path / "flipped.ckpt"
    member = flip_bit_in_member(checkpoint, flipped, "data/1")
    marker, evil = tmp_path / "marker", tmp_path / "evil.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "payload": PickledCommand(marker)}, evil)
    for path, expected in [
        (flipped, f"error: checkpoint {flipped} is corrupt: {member} fails its CRC-32 check"),
        (evil, f"error: refusing to load checkpoint {evil}: it pickles posix.system"),
    ]:
        result = run_lightning_example(
            tmp_path, "--resume", str(path), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
        assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not marker.exists()
    assert len(list((tmp_path / "logs").glob("copy_task/version_*"))) == 1  # nothing trained
