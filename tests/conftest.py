"""Shared fixtures: tiny generated corpora binarized by the real fairseq-preprocess, CLI runners."""

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from atbptt_fairseq.experiments.fairseq_process import json_records  # noqa: F401  (the experiments' parser)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USER_DIR = str(REPO / "atbptt_fairseq")
# The plugin's task, criterion and optimizer with the tiny model: the start of most test commands
TINY_TRAIN = [
    "--user-dir", USER_DIR,
    "--task", "adaptive_tbptt_lm",
    "--arch", "tbptt_lstm_lm_tiny",
    "--criterion", "tbptt_cross_entropy",
    "--optimizer", "tbptt_sgd",
    "--lr", "1.0",
]  # fmt: skip


def run_cli(tool: str, *args: str, cwd: Optional[Path] = None, check: bool = True) -> str:
    """Run a fairseq command-line tool from this environment; return stdout and stderr.

    Without ``cwd`` the tool runs in a fresh temporary directory, so what fairseq and hydra write
    into the working directory (``checkpoints/`` even with --no-save, hydra's log) never lands in
    the checkout.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory(prefix="run-cli-") as scratch:
        result = subprocess.run(
            [str(BIN / tool), *args], cwd=cwd or scratch, env=env, capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} exited {result.returncode}:\n{output[-4000:]}")
    return output


class StubOptimizer:
    """The part of a FairseqOptimizer that FairseqTask.train_step and the task use."""

    def __init__(self, model: torch.nn.Module):
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def get_lr(self) -> float:
        return 0.1

    def set_lr(self, lr: float) -> None:
        pass


def train_losses(output: str) -> dict:
    """``{update: (loss, trunc_k)}`` of fairseq-train's train_inner records (resume checks)."""
    return {
        int(record["num_updates"]): (record["loss"], record["trunc_k"])
        for record in json_records(output, "train_inner")
    }


def write_corpus(directory: Path, lines: Dict[str, List[str]]) -> Path:
    """Write split text files and binarize them with fairseq-preprocess; return the data dir."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, split_lines in lines.items():
        (directory / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    destination = directory / "data-bin"
    run_cli(
        "fairseq-preprocess",
        "--only-source",
        "--trainpref", str(directory / "train.txt"),
        "--validpref", str(directory / "valid.txt"),
        "--testpref", str(directory / "test.txt"),
        "--destdir", str(destination),
        "--workers", "1",
    )  # fmt: skip
    return destination


def random_sentences(count: int, vocabulary: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocabulary)]
    weights = [1.0 / (rank + 1) for rank in range(vocabulary)]
    return [" ".join(rng.choices(words, weights, k=rng.randint(3, 12))) for _ in range(count)]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """About 3k training tokens over a 40-word Zipf vocabulary."""
    directory = tmp_path_factory.mktemp("tiny")
    return write_corpus(
        directory,
        {
            "train": random_sentences(400, 40, seed=1),
            "valid": random_sentences(40, 40, seed=2),
            "test": random_sentences(40, 40, seed=3),
        },
    )


def _load_file(folder: str, name: str):
    """Run ``<folder>/<name>.py`` (not a package) as a module of its own, without its
    ``__main__`` part; return the module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example(name: str):
    """Import ``examples/<name>.py`` (not a package) as a module, for its model and data."""
    return _load_file("examples", name)


def load_script(name: str):
    """The command line ``scripts/<name>.py`` as a module, to call its ``main(argv)`` in-process:
    the scripts are command lines, not a library (their parsers and logic are
    :mod:`atbptt_fairseq.experiments`, which the tests import)."""
    return _load_file("scripts", name)


class PickledCommand:
    """Unpickling this runs ``touch marker``: the payload of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def flip_bit_in_member(source: Path, destination: Path, member_suffix: str) -> str:
    """Copy ``source`` with one bit flipped inside its zip member whose name ends in the suffix;
    return the member's name."""
    import zipfile

    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith(member_suffix)]
        content = archive.read(info)
    start = data.index(content, info.header_offset)
    data[start + len(content) // 2] ^= 0x04
    destination.write_bytes(bytes(data))
    return info.filename
