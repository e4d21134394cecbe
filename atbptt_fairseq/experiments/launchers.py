"""A sweep's grid through hydra's multirun and its launchers: ``joblib`` (N local worker
processes), ``submitit-local`` (a process per run, as a
cluster would run it) and ``submitit-slurm`` (a SLURM job per run).

hydra-joblib-launcher runs its jobs in loky worker processes (n_jobs = 1: one after another in
this process); the sweep ends those workers with the grid, so that none outlives it.

The sweep stays in charge of what hydra does not do: the runs' records, resuming, refusing to mix
configurations, progress lines. Hydra gets one override, ``run=<name>,<name>,...``, and calls the
task function with each run's name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAUNCHERS = ("joblib", "submitit-local", "submitit-slurm")
# hydra's name of each launcher's config (hydra/launcher=...)
LAUNCHER_CONFIGS = {
    "joblib": "joblib",
    "submitit-local": "submitit_local",
    "submitit-slurm": "submitit_slurm",
}
# a run ends when its budget is spent, not at submitit's default limit of 60 minutes
DEFAULT_TIMEOUT_MIN = 24 * 60
GRID_CONFIG = "atbptt_sweep_grid"


@dataclass
class GridConfig:
    """The config hydra composes for each job: the name of the run it trains."""

    run: str = ""


def hydra_overrides(
    launcher: str, jobs: int, options: Sequence[str], out: Path, names: Sequence[str]
) -> list[str]:
    """The overrides of a multirun over ``names`` on ``launcher``: ``jobs`` at a time (joblib),
    hydra's own files under ``out/launcher`` (submitit's logs there too), no logging set up and
    no change of directory, then ``options`` as ``hydra.launcher.KEY=VALUE``."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    overrides = [
        f"hydra/launcher={LAUNCHER_CONFIGS[launcher]}",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        "hydra.output_subdir=null",
        "hydra.job.chdir=false",
        f"hydra.sweep.dir='{out / 'launcher'}'",
        "run=" + ",".join(names),
    ]
    if launcher == "joblib":
        overrides.append(f"hydra.launcher.n_jobs={jobs}")
    else:
        overrides.append(f"hydra.launcher.timeout_min={DEFAULT_TIMEOUT_MIN}")
    return overrides + [f"hydra.launcher.{option}" for option in options]


def check_launcher_options(options: Sequence[str]) -> None:
    """One ``error:`` line for a ``--launcher-option`` that is not ``KEY=VALUE``."""
    for option in options:
        key, equals, _ = option.partition("=")
        if not equals or not key:
            raise SystemExit(
                f"error: --launcher-option takes KEY=VALUE (a hydra.launcher field, e.g. "
                f"partition=gpu or timeout_min=600), got {option!r}"
            )


@contextlib.contextmanager
def hydra_app(config_dir: Path | None = None) -> Iterator[Any]:
    """A hydra application (``hydra._internal.hydra.Hydra``, what ``@hydra.main`` builds) over
    the configs of ``config_dir`` and hydra's config store, with hydra's global state cleared
    before and after; hydra's own debug lines stay quiet meanwhile (fairseq's import sets the
    root logger to DEBUG), the logging of the program left as it is."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    search_path = create_config_search_path(f"file://{config_dir}" if config_dir else None)
    hydra_logger = logging.getLogger("hydra")
    level = hydra_logger.level
    hydra_logger.setLevel(logging.INFO)
    try:
        yield Hydra.create_main_hydra2("sweep", search_path)
    finally:
        GlobalHydra.instance().clear()
        hydra_logger.setLevel(level)


def multirun(task: Callable[[Any], Any], overrides: Sequence[str]) -> list[Any]:
    """Run ``task`` once per job of hydra's multirun with ``overrides``; the jobs' return values
    in the order of the runs (a job's exception is raised here)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=GRID_CONFIG, node=GridConfig)
    with hydra_app() as hydra:
        batches = hydra.multirun(
            config_name=GRID_CONFIG,
            task_function=task,
            overrides=list(overrides),
            with_log_configuration=False,
        )
    return [job.return_value for batch in batches for job in batch]


def stop_joblib_workers(jobs: int) -> None:
    """End the loky worker processes joblib keeps for reuse (``jobs`` of them), so that none
    outlives the sweep."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(max_workers=jobs).shutdown(wait=True, kill_workers=True)
