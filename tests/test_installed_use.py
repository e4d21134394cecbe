"""Installed use: train and evaluate from any directory, without a checkout's relative paths.

The commands run in a fresh temporary directory with the plugin importable as an installed package
is (here through PYTHONPATH, as the shared environment's editable install may point elsewhere),
and name it only through ``atbptt_fairseq.cli``, the module behind the ``atbptt-*`` scripts.
"""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List

import pytest
from conftest import REPO, json_records

from atbptt_fairseq import cli

pytestmark = pytest.mark.e2e

TINY = [
    "--task", "adaptive_tbptt_lm",
    "--arch", "tbptt_lstm_lm_tiny",
    "--criterion", "tbptt_cross_entropy",
    "--optimizer", "tbptt_sgd",
    "--lr", "1.0",
    "--batch-size", "4",
    "--cpu",
    "--log-format", "json",
    "--log-interval", "1",
    "--no-progress-bar",
]  # fmt: skip


def run_module(args: List[str], cwd: Path, returncode: int = 0) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "atbptt_fairseq.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == returncode, output[-4000:]
    return output


def test_train_and_evaluate_from_another_directory(tiny_corpus, tmp_path):
    output = run_module(
        ["train", str(tiny_corpus), *TINY, "--max-update", "2", "--save-dir", "ck"], tmp_path
    )
    assert [r["num_updates"] for r in json_records(output, "train_inner")] == ["1", "2"]
    assert (tmp_path / "ck" / "checkpoint_last.pt").is_file()
    output = run_module(
        ["eval-lm", str(tiny_corpus), "--task", "adaptive_tbptt_lm", "--cpu",
         "--path", "ck/checkpoint_last.pt", "--gen-subset", "valid"],
        tmp_path,
    )  # fmt: skip
    assert re.search(r"Perplexity: [\d.]+", output), output[-3000:]


def test_hydra_train_with_a_packaged_config_from_another_directory(tiny_corpus, tmp_path):
    output = run_module(
        ["hydra-train", "--config-name", "tiny", f"task.data={tiny_corpus}",
         "optimization.max_update=2", "checkpoint.save_dir=ck"],
        tmp_path,
    )  # fmt: skip
    assert "num_updates" in output and (tmp_path / "ck" / "checkpoint_last.pt").is_file()


def test_hydra_train_reports_bad_input_in_one_line(tmp_path):
    """hydra prints every exception with its traceback: the plugin's line comes first."""
    output = run_module(
        ["hydra-train", "--config-name", "tiny", f"task.data={tmp_path / 'nowhere'}"],
        tmp_path,
        returncode=1,
    )
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("atbptt_fairseq: error: data directory "), lines[-3:]
    assert "Traceback" not in output


def test_options_given_win_and_the_paths_are_printed(tmp_path):
    assert cli.with_user_dir(["data", "--user-dir=x"]) == ["data", "--user-dir=x"]
    assert cli.with_user_dir(["data"]) == ["data", "--user-dir", cli.PACKAGE_DIR]
    assert cli.with_hydra_plugin(["-cd", "mine", "common.user_dir=x"]) == [
        "-cd", "mine", "common.user_dir=x"
    ]  # fmt: skip
    assert cli.with_hydra_plugin(["--config-name", "tiny"]) == [
        "--config-dir", cli.CONFIG_DIR, "--config-name", "tiny",
        f"common.user_dir={cli.PACKAGE_DIR}",
    ]  # fmt: skip
    # -m after the overrides: the plugin's override joins them, where hydra's parser reads them
    from hydra._internal.utils import get_args_parser

    args = cli.with_hydra_plugin(["--config-name", "ptb_fixed", "task.data=d", "-m"])
    parsed = get_args_parser().parse_args(args)
    assert parsed.multirun and parsed.overrides == [
        "task.data=d",
        f"common.user_dir={cli.PACKAGE_DIR}",
    ]
    assert run_module(["user-dir"], tmp_path).strip().splitlines()[-1] == cli.PACKAGE_DIR
    assert sorted(os.listdir(cli.CONFIG_DIR)) == sorted(
        p.name for p in (REPO / "configs").glob("*.yaml")
    )


def test_the_wheel_ships_the_configs_and_the_scripts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(REPO), "-w", str(tmp_path)],
        cwd=tmp_path, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    configs = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert configs and {f"atbptt_fairseq/configs/{name}" for name in configs} <= set(names)
    for script, function in (
        ("atbptt-train", "train"), ("atbptt-eval-lm", "eval_lm"),
        ("atbptt-hydra-train", "hydra_train"),
    ):  # fmt: skip
        assert f"{script} = atbptt_fairseq.cli:{function}" in scripts
