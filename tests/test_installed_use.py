"""Installed use: train and evaluate from any directory, without a checkout's relative paths.

Most commands here run in a fresh temporary directory with the plugin importable as an installed
package is (through PYTHONPATH, as the shared environment's editable install may point elsewhere),
and name it only through ``atbptt_fairseq.cli``, the module behind the ``atbptt-*`` scripts.

``installed`` goes further: the README's "Installed use" sequence in a fresh venv. What it proves:
``pip install`` of the checkout (its metadata, package data and console scripts, not the
checkout's files) works, from a directory that is not the checkout, with the dependencies that
this environment tested; every extra's requirement is met by them; ``pip check`` has nothing to
say about the project; a missing fairseq, fairseq dependency or Lightning ends in one line. What
it does not: that pip resolves the extras from an index or builds fairseq-fixed (both take
minutes and a network; ``make install`` does that with the same extras and command). The fresh
venv sees this environment's packages through a ``.pth`` file naming a directory of links to
them, less the project itself and whatever a test hides.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import pytest
from conftest import REPO, json_records, run_cli

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


SITE = Path(sysconfig.get_paths()["purelib"])
# what the wheel is built from
SOURCES = ("pyproject.toml", "README.md", "atbptt", "atbptt_fairseq", "atbptt_lightning")


class FreshVenv:
    """A venv holding only a ``pip install`` of the checkout; this environment's packages are
    visible through a ``.pth`` file, less the names given to :meth:`show_packages`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True,
            timeout=120,
        )  # fmt: skip
        self.bin = root / "venv" / "bin"
        (self.site,) = (root / "venv" / "lib").glob("python*/site-packages")
        self.work = root / "work"  # the user's directory: neither the checkout nor the venv
        self.work.mkdir()

    def show_packages(self, hidden: Iterable[str] = ()) -> None:
        """Make this environment's packages visible, except the project's and ``hidden`` (top
        level names: their modules and distribution metadata)."""
        hidden = {name.lower() for name in ("atbptt", "atbptt_fairseq", "__editable__", *hidden)}
        links = self.root / f"links-{abs(hash(tuple(sorted(hidden))))}"
        if not links.exists():
            links.mkdir()
            for entry in SITE.iterdir():
                top = re.split(r"[-.]", entry.name, maxsplit=1)[0].lower()
                if entry.suffix != ".pth" and top not in hidden and entry.name != "__pycache__":
                    (links / entry.name).symlink_to(entry)
        (self.site / "environment.pth").write_text(f"{links}\n")

    def run(self, *command: str, returncode: Optional[int] = 0, timeout: int = 300) -> str:
        """Run ``command`` (a script of the venv, or ``python``) in the user's directory."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")  # fmt: skip
        result = subprocess.run(
            [str(self.bin / command[0]), *command[1:]], cwd=self.work, env=env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert returncode is None or result.returncode == returncode, (
            f"{command}: {result.returncode}\n{output[-4000:]}"
        )
        return output


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> FreshVenv:
    """``pip install`` of a copy of the checkout into a fresh venv (``--no-deps``: the
    dependencies are this environment's)."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "atbptt-fairseq"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(REPO / name, source / name)
    venv = FreshVenv(root)
    venv.show_packages()
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv.bin / "python"), "install", "-q",
         "--no-deps", "--no-build-isolation", "--no-index", str(source)],
        cwd=venv.work, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    shutil.rmtree(source)  # nothing may come from the copy after the install
    return venv


def one_line(output: str) -> str:
    """The output's only line (after Python's and hydra's warnings, which are not the tool's)."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def extra_requirements(venv: FreshVenv) -> Dict[str, List[str]]:
    """``{extra: [requirement, ...]}`` of the installed project's metadata."""
    code = (
        "import importlib.metadata as m, json; d = m.distribution('atbptt-fairseq'); "
        "print(json.dumps([str(d.locate_file('')), d.requires]))"
    )
    import json

    location, requires = json.loads(venv.run("python", "-c", code).splitlines()[-1])
    assert Path(location).resolve() == venv.site.resolve(), location
    extras: Dict[str, List[str]] = {}
    for requirement in requires:
        name, _, marker = requirement.partition(";")
        extra = re.search(r"extra == .(\w+).", marker)
        extras.setdefault(extra.group(1) if extra else "", []).append(name.strip())
    return extras


def test_the_readme_sequence_in_a_fresh_venv(installed, tiny_corpus):
    venv = installed
    readme = (REPO / "README.md").read_text()
    for command in ("atbptt-install-fairseq", "pip check",
                    "pip install \"./atbptt-fairseq[fairseq,lightning,experiments]\""):  # fmt: skip
        assert command in readme, command
    # the installed copy is the one that runs, not the checkout
    where = venv.run("python", "-c", "import atbptt, atbptt_fairseq; print(atbptt.__file__)")
    assert Path(where.strip()).resolve().is_relative_to(venv.site.resolve()), where
    # fairseq is there (this environment's): the helper says so and builds nothing
    assert "already installed" in venv.run("atbptt-install-fairseq")
    command = "install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1"
    assert command in venv.run("atbptt-install-fairseq", "--dry-run")
    # pip check: the project's own metadata is met (fairseq-fixed's torchaudio is its own)
    checked = venv.run("python", "-m", "pip", "check", returncode=None)
    assert not [line for line in checked.splitlines() if "atbptt" in line], checked
    output = venv.run(
        "atbptt-train", str(tiny_corpus), *TINY, "--max-update", "2", "--save-dir", "ck"
    )
    assert [r["num_updates"] for r in json_records(output, "train_inner")] == ["1", "2"]
    output = venv.run(
        "atbptt-eval-lm", str(tiny_corpus), "--task", "adaptive_tbptt_lm", "--cpu",
        "--path", "ck/checkpoint_last.pt", "--gen-subset", "valid",
    )  # fmt: skip
    assert re.search(r"Perplexity: [\d.]+", output), output[-3000:]


def test_the_extras_say_what_each_part_needs(installed):
    extras = extra_requirements(installed)
    assert sorted(extras) == ["", "experiments", "fairseq", "lightning", "test"]
    assert [re.split(r"[<>=]", r)[0] for r in extras[""]] == ["torch", "numpy"]  # the core
    # the fairseq extra is fairseq-fixed's own runtime requirements but torch and torchaudio
    from importlib.metadata import requires

    fairseq_needs = {
        r.split(";")[0].strip().replace(" ", "") for r in requires("fairseq-fixed")
        if "extra ==" not in r and not r.startswith(("torch", "torchaudio"))
    }  # fmt: skip
    ours = {r.replace(" ", "") for r in extras["fairseq"] + extras[""]}
    names = {re.split(r"[<>=]", r)[0].lower() for r in ours}
    assert {re.split(r"[<>=]", r)[0].lower() for r in fairseq_needs} <= names
    pins = {r for r in fairseq_needs if "==" in r}
    assert pins <= ours, "the extra must pin what fairseq-fixed pins, as it does"
    # every requirement of every extra is met by the environment the tests ran in
    code = (
        "import sys, importlib.metadata as m; from packaging.requirements import Requirement\n"
        "for line in sys.argv[1:]:\n"
        "    r = Requirement(line); v = m.version(r.name)\n"
        "    assert r.specifier.contains(v, prereleases=True), (line, v)\n"
        "print('ok')"
    )
    every = [r for extra in extras.values() for r in extra]
    assert installed.run("python", "-c", code, *every).strip().endswith("ok")


def test_a_missing_dependency_ends_in_one_line(installed, tiny_corpus):
    venv = installed
    try:
        venv.show_packages(hidden=["fairseq", "fairseq_cli", "fairseq_fixed"])
        for script in ("atbptt-train", "atbptt-eval-lm", "atbptt-hydra-train"):
            line = one_line(venv.run(script, str(tiny_corpus), returncode=1))
            assert line.startswith(f"{script}: error: No module named 'fairseq"), line
            assert "atbptt-install-fairseq" in line, line
        # the core and the package import; a component says what it needs
        code = "import atbptt, atbptt_fairseq; atbptt_fairseq.tasks"
        line = venv.run("python", "-c", code, returncode=1).splitlines()[-1]
        assert line.startswith("ModuleNotFoundError: atbptt_fairseq.tasks needs fairseq. "), line
        assert "atbptt-install-fairseq" in line, line
        venv.show_packages(hidden=["bitarray"])  # fairseq there, one of its dependencies not
        line = one_line(venv.run("atbptt-train", "--help", returncode=1))
        assert line == (
            "atbptt-train: error: No module named 'bitarray': install it with "
            "pip install 'atbptt-fairseq[fairseq]'"
        ), line
        venv.show_packages(hidden=["lightning", "pytorch_lightning", "lightning_fabric"])
        output = venv.run("python", "-c", "import atbptt_lightning", returncode=1)
        assert output.splitlines()[-1] == (
            "ModuleNotFoundError: atbptt_lightning needs Lightning: "
            "pip install 'atbptt-fairseq[lightning]'"
        ), output[-2000:]
    finally:
        venv.show_packages()


def test_help_lists_the_plugins_options_with_defaults(tmp_path):
    import dataclasses

    from atbptt_fairseq.tasks.config import AdaptiveTbpttLmConfig

    output = run_module(["train", "--arch", "tbptt_lstm_lm_ptb", "--help"], tmp_path)
    fairseq_part, _, plugin = output.partition("The plugin's options")
    assert "--max-update" in fairseq_part and "--target-bias" not in fairseq_part
    options = [
        f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(AdaptiveTbpttLmConfig)
        if field.metadata.get("help") and field.name != "data"
    ]  # fmt: skip
    assert len(options) > 20 and all(option in plugin for option in options), plugin[:3000]
    flat = " ".join(plugin.split())
    assert "--estimate-window ESTIMATE_WINDOW lags W" in flat and "(default: 400)" in flat
    assert "options of --arch tbptt_lstm_lm_ptb" in flat and "(default: 900)" in flat
    assert "options of --optimizer tbptt_sgd" in flat


def test_bad_input_comes_before_fairseqs_config_dump(tmp_path):
    """fairseq-train logs its whole configuration before it sets the task up: the task's checks
    run first, so the one line is all that follows the start-up warnings."""
    output = run_cli(
        "fairseq-train", str(tmp_path / "nowhere"), *TINY, "--user-dir",
        str(REPO / "atbptt_fairseq"), check=False,
    )  # fmt: skip
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("atbptt_fairseq: error: data directory "), lines[-3:]
    assert "'common':" not in output and "Traceback" not in output, output[-3000:]


def test_eval_lm_bad_input_comes_before_fairseqs_config_dump(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"not reached: the data directory is refused first")
    output = run_cli(
        "fairseq-eval-lm", str(tmp_path / "nowhere"), "--task", "adaptive_tbptt_lm", "--cpu",
        "--user-dir", str(REPO / "atbptt_fairseq"), "--path", str(checkpoint), check=False,
    )  # fmt: skip
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("atbptt_fairseq: error: data directory "), lines[-3:]
    assert "'common':" not in output and "Traceback" not in output, output[-3000:]


def test_atbptt_train_bad_input_is_its_one_line_without_hydras_warnings(tmp_path):
    """No PYTHONWARNINGS here: the command itself keeps hydra's deprecation warnings (about
    fairseq's use of hydra) and fairseq's configuration dump from preceding its line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "atbptt_fairseq.cli", "train", str(tmp_path / "nowhere"), *TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and lines[-1].startswith("atbptt_fairseq: error: data "), lines
    assert not [line for line in lines if "Warning" in line or "'common':" in line], lines
    assert len(lines) <= 2, lines  # the error, and fairseq's note that the plugin is imported
