"""The benchmarks' machinery (atbptt_fairseq/experiments/bench.py) and the one reader of a fairseq
tool's output (fairseq_process.run_fairseq), on stand-in processes and tiny inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atbptt_fairseq.experiments import bench, console
from atbptt_fairseq.experiments.fairseq_process import OutputLine, run_fairseq

TRAIN_INNER = "2026-01-01 00:00:00 | INFO | train_inner | "


def python_printing(*lines: str, then: str = "") -> list[str]:
    """A command that prints ``lines`` (flushed one by one), then runs the statement ``then``."""
    script = "".join(f"print({line!r}, flush=True)\n" for line in lines) + then
    return [sys.executable, "-c", script]


def test_run_fairseq_hands_over_every_line_with_its_record_and_exit_status():
    record = {"num_updates": "5", "wpb": "100", "wps": "50"}
    cmd = python_printing(
        "plain line", TRAIN_INNER + json.dumps(record), "[valid][INFO] - {}", then="exit(3)"
    )
    seen: list[OutputLine] = []
    assert run_fairseq(cmd, seen.append, tags=("train_inner",)) == 3
    assert [line.text for line in seen] == [
        "plain line",
        TRAIN_INNER + json.dumps(record),
        "[valid][INFO] - {}",
    ]
    assert [line.record for line in seen] == [None, ("train_inner", record), None]
    assert seen[0].arrival <= seen[1].arrival <= seen[2].arrival


def test_run_fairseq_stops_the_tool_when_the_reader_fails():
    started: list[subprocess.Popen] = []

    def start(cmd, **options):
        started.append(subprocess.Popen(cmd, **options))
        return started[-1]

    def refuse(line: OutputLine) -> None:
        raise KeyboardInterrupt

    begin = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_fairseq(
            python_printing("first", then="import time; time.sleep(60)"), refuse, start=start
        )
    assert time.monotonic() - begin < 30
    assert started[0].poll() is not None  # terminated and reaped, not left running


def test_fairseq_train_runs_become_throughput(monkeypatch):
    lines = [
        TRAIN_INNER + json.dumps({"num_updates": updates, "wpb": 10, "wps": wps})
        for updates, wps in ((2, 5.0), (4, 20.0), (6, 40.0))
    ]
    monkeypatch.setattr(bench, "fairseq_cli", lambda name: sys.executable)
    run = bench.run_fairseq_train(["-c", "".join(f"print({x!r})\n" for x in lines)], 1, "stand-in")
    assert [line.updates for line in run.lines] == [2, 4, 6]
    throughput = bench.throughput_from_log(run, warmup_lines=1)
    assert throughput.tokens == 40 and throughput.updates == 4  # 2 lines x 10 tokens x 2 updates
    assert throughput.seconds_log == pytest.approx(20 / 20.0 + 20 / 40.0)
    assert bench.last_value(run, "wps") == 40.0 and math.isnan(bench.last_value(run, "missing"))
    with pytest.raises(SystemExit, match="stand-in: fairseq-train exited with 2"):
        bench.run_fairseq_train(["-c", "exit(2)"], 1, "stand-in")
    with pytest.raises(SystemExit, match="wrote no train_inner lines"):
        bench.run_fairseq_train(["-c", "print('nothing')"], 1, "stand-in")


def test_table_rotation_and_json():
    table = console.format_table(["name", "value"], [["a", 1], ["longer", 22]])
    assert table.splitlines() == [
        "name    value",
        "------  -----",
        "a           1",
        "longer     22",
    ]
    assert bench.rotate([1, 2, 3], 4) == [2, 3, 1] and bench.rotate([], 1) == []
    assert bench.median([3.0, 1.0, 2.0]) == 2.0 and math.isnan(bench.median([]))


def test_json_is_written_only_when_asked(tmp_path: Path):
    bench.write_json(None, {"a": 1})
    target = tmp_path / "sub" / "figures.json"
    bench.write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [path.name for path in target.parent.iterdir()] == ["figures.json"]


@pytest.mark.e2e
def test_random_corpus_is_binarized_with_every_word(tmp_path: Path):
    dest = bench.make_corpus(tmp_path / "corpus", vocab=30, train_tokens=300, valid_tokens=60)
    assert {"dict.txt", "train.bin", "valid.idx"} <= {path.name for path in dest.iterdir()}
    assert not (dest / "test.bin").exists()
    assert bench.dictionary_size(dest) >= 30 + 4
    assert bench.load_token_stream(dest).numel() == 300 + 30 + 11  # </s> per line of 30 words
