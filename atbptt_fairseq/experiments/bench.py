"""What the benchmarks (``scripts/bench_*.py``) share: threads and devices, a quiet machine,
synthetic corpora, ``fairseq-train`` runs whose JSON log lines are time-stamped as they arrive,
robust summaries and plain-text tables. Nothing here imports fairseq or torch at module level.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atbptt_fairseq.experiments import console
from atbptt_fairseq.experiments.console import fail
from atbptt_fairseq.experiments.data import run_preprocess
from atbptt_fairseq.experiments.fairseq_process import PLUGIN_DIR, REPO, OutputLine, run_fairseq


def log(message: str) -> None:
    """One progress line of a benchmark on stderr (stdout carries the results)."""
    console.log(message, "bench")


# --------------------------------------------------------------------------------------------
# Threads and devices
# --------------------------------------------------------------------------------------------


def add_machine_options(parser: argparse.ArgumentParser, waits_before: str) -> None:
    """The options every benchmark takes: threads, device, a quiet machine, a JSON copy."""
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads (torch.set_num_threads here, OMP_NUM_THREADS for fairseq-train); "
        "0: torch's default on this machine",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or auto (cuda when available; default)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help=f"before {waits_before}, wait up to this many seconds for other work on the machine "
        "to drop below 25%% of the CPU (default 0: only measure and report it)",
    )
    parser.add_argument("--json", default=None, help="write all figures to this JSON file")


def resolve_threads(threads: int) -> int:
    """Intra-op threads for every contender: ``threads`` if positive, else torch's default."""
    import torch

    if threads > 0:
        return threads
    return torch.get_num_threads()


def apply_threads(threads: int) -> None:
    """Set the intra-op thread count of this process (the in-process contenders)."""
    import torch

    torch.set_num_threads(threads)


def cpu_busy_fraction(seconds: float = 0.5) -> float:
    """Share of all CPU cores busy during ``seconds`` (from /proc/stat; nan where unavailable).

    Sampled while this process sleeps, so it measures other work on the machine.
    """

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                values = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values[:8]), idle

    first = read()
    time.sleep(seconds)
    second = read()
    if first is None or second is None or second[0] == first[0]:
        return float("nan")
    total, idle = second[0] - first[0], second[1] - first[1]
    return 1.0 - idle / total


def wait_until_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait`` s) until other work uses < ``threshold`` of the CPU.

    Returns the last busy share measured (other work just before a contender starts).
    """
    busy = cpu_busy_fraction()
    deadline = time.perf_counter() + max_wait
    while not math.isnan(busy) and busy >= threshold and time.perf_counter() < deadline:
        time.sleep(2.0)
        busy = cpu_busy_fraction()
    return busy


def warn_if_disturbed(
    busy_before: Sequence[float], unit: str = "run", threshold: float = 0.25
) -> None:
    """Print a warning when other work used ``threshold`` or more of the CPU before a ``unit``
    (a fairseq run, or a repeat of an in-process measurement)."""
    busiest = max([b for b in busy_before if math.isfinite(b)], default=0.0)
    if busiest >= threshold:
        print(
            f"warning: other work used up to {busiest:.0%} of the CPU just before a {unit}; the "
            "figures are disturbed (see --quiet-wait, --threads 1)"
        )


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; checks that ``cuda`` is usable."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise fail("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return name


def synchronize(device: str) -> None:
    """Wait for queued kernels, so that wall-clock readings cover the work (no-op on CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fairseq_device_args(device: str) -> list[str]:
    """``fairseq-train`` options for the device: ``--cpu``, or nothing (fairseq uses GPU 0)."""
    return ["--cpu"] if device == "cpu" else []


def fairseq_cli(name: str) -> str:
    """Path of a fairseq console script, next to this interpreter (the venv) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise fail(f"{name} not found next to {sys.executable} or on PATH; run `make install`")
    return found


def plugin_model_args(hidden: int) -> list[str]:
    """``fairseq-train`` options of the plugin's task and criterion with its LSTM language
    model: one layer of ``hidden`` units, embeddings of the same size, tied."""
    return [
        "--user-dir",
        str(PLUGIN_DIR),
        "--task",
        "adaptive_tbptt_lm",
        "--arch",
        "tbptt_lstm_lm",
        "--embed-dim",
        str(hidden),
        "--hidden-size",
        str(hidden),
        "--num-layers",
        "1",
        "--tie-embeddings",
        "--criterion",
        "tbptt_cross_entropy",
    ]


def timed_run_args(
    save_dir: Path, total_updates: int, log_interval: int, seed: int, device: str
) -> list[str]:
    """``fairseq-train`` options of a timed run: ``total_updates`` updates, a JSON log line
    every ``log_interval``, no validation, no checkpoints, no data-loading workers."""
    return [
        "--max-update",
        str(total_updates),
        "--log-interval",
        str(log_interval),
        "--log-format",
        "json",
        "--disable-validation",
        "--no-save",
        "--save-dir",
        str(save_dir),
        "--num-workers",
        "0",
        "--seed",
        str(seed),
        *fairseq_device_args(device),
    ]


# --------------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------------


def zipf_tokens(vocab: int, count: int, seed: int, exponent: float = 1.0):
    """``count`` word ids in ``[0, vocab)`` drawn i.i.d. from a Zipf-like law p(r) ~ 1/r^s."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1) ** exponent
    return rng.choice(vocab, size=count, p=weights / weights.sum())


def make_corpus(
    dest: Path, vocab: int, train_tokens: int, valid_tokens: int = 2000, seed: int = 0
) -> Path:
    """Write a random Zipf corpus with ``vocab`` word types and binarize it; return ``dest``.

    Lines of 30 words (fairseq adds ``</s>`` to each). The first train line lists every word once,
    so the dictionary holds all ``vocab`` words (plus fairseq's 4 specials, padded to a multiple
    of 8) however rare the tail is. Reuses ``dest`` if it is already complete.
    """
    dest = Path(dest)
    if (dest / "dict.txt").is_file() and (dest / "train.bin").is_file():
        return dest
    raw = dest / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    line_length = 30
    for split, count, offset in (("train", train_tokens, 0), ("valid", valid_tokens, 1)):
        ids = zipf_tokens(vocab, count, seed + offset)
        with open(raw / f"{split}.txt", "w", encoding="utf-8") as out:
            if split == "train":
                out.write(" ".join(f"w{i}" for i in range(vocab)) + "\n")
            for start in range(0, count, line_length):
                out.write(" ".join(f"w{i}" for i in ids[start : start + line_length]) + "\n")
    log(f"binarizing a {train_tokens:,}-token random corpus (V {vocab}) into {dest}")
    splits = {split: raw / f"{split}.txt" for split in ("train", "valid")}
    run_preprocess(dest, splits, what="the random corpus")
    return dest


def dictionary_size(data_dir: Path) -> int:
    """Number of entries of the fairseq dictionary of ``data_dir`` (the model's vocabulary)."""
    from fairseq.data import Dictionary

    return len(Dictionary.load(str(Path(data_dir) / "dict.txt")))


def load_token_stream(data_dir: Path, split: str = "train"):
    """A binarized split as one 1-D LongTensor of token ids (``</s>`` at line ends)."""
    import torch
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(str(Path(data_dir) / split), None)
    if dataset is None:
        raise fail(f"{data_dir}/{split}.bin not found")
    return torch.cat([dataset[i].long() for i in range(len(dataset))])


# --------------------------------------------------------------------------------------------
# fairseq-train runs and their JSON logs
# --------------------------------------------------------------------------------------------


@dataclass
class LogLine:
    """One ``train_inner`` record of a ``--log-format json`` run, stamped on arrival here."""

    stats: dict[str, float]
    arrival: float  # time.perf_counter() of this process when the line was read

    @property
    def updates(self) -> int:
        return int(self.stats["num_updates"])


@dataclass
class TrainRun:
    """A finished ``fairseq-train`` run: its ``train_inner`` lines and wall times."""

    lines: list[LogLine]
    seconds: float  # launch to exit, start-up included
    output: list[str] = field(default_factory=list)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def run_fairseq_train(args: Sequence[str], threads: int, label: str) -> TrainRun:
    """Run ``fairseq-train ARGS`` and collect its ``train_inner`` lines as they arrive.

    ``ARGS`` must include ``--log-format json``. Raises with the tail of the output on failure.
    """
    lines: list[LogLine] = []
    output: list[str] = []

    def keep(line: OutputLine) -> None:
        output.append(line.text)
        if line.record is not None:
            stats = {key: _number(value) for key, value in line.record[1].items()}
            lines.append(LogLine(stats=stats, arrival=line.arrival))

    cmd = [fairseq_cli("fairseq-train"), *args]
    start = time.perf_counter()
    code = run_fairseq(cmd, keep, threads=threads, cwd=REPO, tags=("train_inner",))
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(output[-25:])
        raise fail(f"{label}: fairseq-train exited with {code}; last output:\n{tail}")
    if not lines:
        raise fail(f"{label}: fairseq-train wrote no train_inner lines; lower --log-interval")
    return TrainRun(lines=lines, seconds=seconds, output=output)


@dataclass
class Throughput:
    """Scored tokens over wall time after the warm-up lines of one run."""

    tokens: float
    seconds_log: float  # sum over lines of tokens / wps (fairseq's own clock)
    seconds_clock: float  # between the arrival of the last warm-up line and the last line
    interval_rates: list[float]  # tokens/s of every measured log interval (fairseq's wps)
    updates: int
    busy_before: float = float("nan")  # share of the CPU used by other work just before the run

    @property
    def rate(self) -> float:
        """Tokens per second by fairseq's clock (the headline figure)."""
        return self.tokens / self.seconds_log

    @property
    def rate_clock(self) -> float:
        """Tokens per second by this process's clock (cross-check)."""
        return self.tokens / self.seconds_clock


def throughput_from_log(run: TrainRun, warmup_lines: int) -> Throughput:
    """Token rate of the ``train_inner`` lines after the first ``warmup_lines``.

    Each line covers the updates since the previous one: ``wpb`` (mean scored tokens per update)
    times that count is its token count, and fairseq's ``wps`` meter (reset at every log line,
    so it spans the whole interval) gives its duration as tokens / wps.
    """
    if len(run.lines) <= warmup_lines:
        raise fail(
            f"only {len(run.lines)} log lines, none after {warmup_lines} warm-up lines; "
            "raise --updates or lower the warm-up"
        )
    tokens = seconds = 0.0
    rates = []
    previous = run.lines[warmup_lines - 1] if warmup_lines > 0 else None
    previous_updates = previous.updates if previous is not None else 0
    for line in run.lines[warmup_lines:]:
        count = line.stats["wpb"] * (line.updates - previous_updates)
        previous_updates = line.updates
        tokens += count
        seconds += count / line.stats["wps"]
        rates.append(line.stats["wps"])
    start = previous.arrival if previous is not None else run.lines[0].arrival
    clock = max(run.lines[-1].arrival - start, 1e-9)
    updates = run.lines[-1].updates - (previous.updates if previous is not None else 0)
    return Throughput(tokens, seconds, clock, rates, updates)


def last_value(run: TrainRun, key: str) -> float:
    """The value of ``key`` in the last ``train_inner`` line that has it (nan if none)."""
    for line in reversed(run.lines):
        if key in line.stats:
            return line.stats[key]
    return float("nan")


# --------------------------------------------------------------------------------------------
# Summaries and tables
# --------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median, nan for no values."""
    return statistics.median(values) if values else float("nan")


def rotate(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (repeat r starts with contender r)."""
    if not items:
        return []
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def verdict(met: bool) -> str:
    """``met`` / ``NOT met``."""
    return "met" if met else "NOT met"


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (indented JSON, atomically) when a path is given."""
    if not path:
        return
    console.write_json(Path(path), payload, indent=2)
    log(f"wrote {path}")


def machine_summary(threads: int, device: str) -> dict[str, Any]:
    """Versions, thread count, device and load, recorded with the figures."""
    import platform

    import torch

    summary: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "device": device,
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        summary["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda"):
        summary["gpu"] = torch.cuda.get_device_name(0)
    return summary


def set_up_machine(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve ``args.device`` and ``args.threads`` in place (``--device auto``, ``--threads 0``),
    give this process those threads, and start the benchmark's JSON payload with the machine."""
    args.device = resolve_device(args.device)
    args.threads = resolve_threads(args.threads)
    apply_threads(args.threads)
    return {"machine": machine_summary(args.threads, args.device)}


def finish(payload: dict[str, Any], started: float, json_path: str | None) -> None:
    """Add the wall time since ``started`` (perf_counter) to ``payload``, print it, and write
    the payload to ``json_path`` (``--json``) when given."""
    payload["wall_seconds"] = time.perf_counter() - started
    print(f"\ntotal wall time {payload['wall_seconds']:.0f} s")
    write_json(json_path, payload)
