"""Sweep fixed truncation lengths K against target biases delta, and other gradient estimators,
over seeds, through fairseq: the orchestration and the command line of ``scripts/sweep.py``.

Details: docs/scripts.md, section scripts/sweep.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .console import write_json
from .fairseq_logs import parse_run, training_finished
from .launch import ChildProcesses, RunFailed, fmt_seconds, run_evals, run_train, say
from .launchers import (
    LAUNCHERS,
    check_launcher_options,
    hydra_overrides,
    multirun,
    stop_joblib_workers,
)
from .presets import PRESETS, get_preset
from .results import load_results, summarize_run, write_results, write_trajectories
from .run_records import (
    changed_runs,
    code_version,
    data_identity,
    move_aside,
    record_differences,
    recorded_run,
    refuse_changed_runs,
    run_lock,
)
from .runs import (
    EstimatorSpec,
    RunSpec,
    SweepSettings,
    check_extra_args,
    default_log_interval,
    eval_command,
    initial_truncation_length,
    option_value,
    parse_estimators,
    parse_numbers,
    plan_runs,
    plugin_choices,
    sweep_arch,
    token_count,
    train_command,
)


def run_one(
    spec: RunSpec,
    settings: SweepSettings,
    code: dict[str, Any] | None = None,
    children: ChildProcesses | None = None,
    on_start: Callable[[], None] = lambda: None,
    data: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, str]:
    """Train, evaluate and summarize one run; ``(result, status)``, status ``"done"``,
    ``"skipped"`` (finished earlier) or ``"locked"`` (another sweep process is at it: result None).


    The run's lock is held throughout, by its subprocesses too. ``run.json`` records the
    command, ``code`` (default: :func:`code_version`) and ``data`` (default:
    :func:`data_identity`) before training starts; a run recorded with another configuration is
    refused, or with ``settings.rerun_changed`` moved aside and trained afresh. A run with a
    ``result.json`` is skipped. Otherwise fairseq-train resumes from the run's
    ``checkpoint_last.pt`` if an earlier attempt left one (it starts afresh if not); a
    ``train_done.json`` marks training as complete so that only the evaluation is redone.
    ``on_start`` is called before anything is trained or evaluated.
    """
    code = code or code_version()
    data = data or data_identity(settings.data)
    run_dir = settings.out / "runs" / spec.name
    with run_lock(run_dir) as lock_fd:
        if lock_fd is None:
            return None, "locked"
        cmd = train_command(spec, settings, run_dir)
        arch = option_value(cmd, "--arch") or ""
        # method and arch for people and plots; changes show in the command, which is compared
        record = {"command": cmd, "code": code, "data": data, "method": spec.method, "arch": arch}
        recorded = recorded_run(run_dir)
        differences = record_differences(recorded, record) if recorded is not None else []
        if differences and not settings.rerun_changed:
            raise RunFailed(
                f"{run_dir} was trained with another configuration: {'; '.join(differences)}"
            )
        if differences:
            moved = move_aside(run_dir, settings.out)
            say(f"    [{spec.name}] trained with another configuration: moved to {moved}")
            return run_one(spec, settings, code, children, on_start, data)
        result_path = run_dir / "result.json"
        if result_path.is_file():
            return json.loads(result_path.read_text()), "skipped"
        on_start()
        if not (run_dir / "run.json").is_file():
            write_json(run_dir / "run.json", record)
        done_path = run_dir / "train_done.json"
        if not done_path.is_file() and not training_finished(run_dir / "train.log"):
            run_train(
                cmd,
                run_dir / "train.log",
                spec.name,
                settings.updates_of,
                settings.progress_seconds,
                settings.threads,
                children,
                lock_fd,
            )
            write_json(done_path, {"command": cmd})
        parsed = parse_run(run_dir)
        write_trajectories(run_dir, parsed)
        best = run_dir / "checkpoints" / "checkpoint_best.pt"
        if not best.is_file():
            raise RunFailed(f"{best} is missing: training saved no checkpoint")
        evals = {subset: eval_command(cmd, best, subset) for subset in ("valid", "test")}
        cores = max(1, (os.cpu_count() or 2) // settings.jobs)
        scores = run_evals(evals, run_dir, cores, children, lock_fd)
        result = summarize_run(spec, parsed, scores["valid"], scores["test"], arch)
        result["budget"] = settings.budget_label
        write_json(result_path, result)
        return result, "done"


class SweepProgress:
    """Elapsed time, durations and failures of a sweep's runs, shared by the runs of one process
    (``started``: the sweep's start, seconds since the epoch, the same in every process)."""

    def __init__(self, total: int, jobs: int, started: float | None = None) -> None:
        self.total, self.jobs = total, jobs
        self.started = time.time() if started is None else started
        self.durations: list[float] = []
        self.failures = 0
        self._lock = threading.Lock()

    def elapsed(self) -> str:
        return fmt_seconds(time.time() - self.started)

    def eta(self, remaining: int) -> str:
        """Time for ``remaining`` runs at the mean duration so far, ``jobs`` at a time."""
        with self._lock:
            mean = np.mean(self.durations) if self.durations else math.nan
        return fmt_seconds(mean * remaining / self.jobs)

    def finished(self, seconds: float) -> None:
        with self._lock:
            self.durations.append(seconds)

    def failed(self) -> None:
        with self._lock:
            self.failures += 1


@dataclass
class InProcess:
    """What the runs of one process share: the progress and ETA, the fairseq subprocesses to
    stop on Ctrl-C, and the signal to start no new run."""

    progress: SweepProgress
    children: ChildProcesses = field(default_factory=ChildProcesses)
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class GridJob:
    """One run of the grid as hydra's task function (``cfg.run``: the run's name): trains it with
    :func:`run_one`, prints its start and end, returns ``"done"``, ``"skipped"``, ``"locked"``,
    ``"failed"`` or ``"not started"``. Picklable without ``shared``: joblib's worker processes
    and submitit's jobs get it so, and each run then shares nothing with the others (no ETA
    before a run of the same worker finished, no stop after another's failure)."""

    specs: dict[str, RunSpec]
    settings: SweepSettings
    code: dict[str, Any]
    data: dict[str, Any]
    keep_going: bool = False
    started: float = 0.0  # the sweep's start (time.time())
    shared: InProcess | None = None

    def __call__(self, cfg: Any) -> str:
        shared = self.shared or InProcess(
            SweepProgress(len(self.specs), self.settings.jobs, self.started)
        )
        progress, children = shared.progress, shared.children
        if shared.stop.is_set():
            return "not started"
        index = list(self.specs).index(cfg.run) + 1
        spec, total = self.specs[cfg.run], len(self.specs)
        head = f"run {index}/{total} {spec.name}"
        run_start = time.monotonic()

        def announce() -> None:
            say(
                f"{head}: start (elapsed {progress.elapsed()}, ETA {progress.eta(total - index + 1)})"
            )

        try:
            result, status = run_one(spec, self.settings, self.code, children, announce, self.data)
        except RunFailed as error:
            if children.stopping:
                return "not started"
            progress.failed()
            say(f"{head}: FAILED after {fmt_seconds(time.monotonic() - run_start)}\n{error}")
            if not self.keep_going:
                shared.stop.set()
            return "failed"
        if status == "locked":
            say(f"{head}: another sweep process is running it (its lock is held), skipped")
        elif status == "skipped":
            say(f"{head}: finished earlier, skipped (test ppl {result['test_ppl']:.4g})")
        else:
            duration = time.monotonic() - run_start
            progress.finished(duration)
            write_results(self.settings.out)
            bias = result["final_bias_hat"]  # none without an estimate (estimator runs)
            say(
                f"{head}: done in {fmt_seconds(duration)}: valid ppl "
                f"{result['valid_ppl']:.4g}, test ppl {result['test_ppl']:.4g}, final K "
                f"{result['final_k']:g}"
                + ("" if math.isnan(bias) else f", delta_hat {bias:.3g}")
                + f" (elapsed {progress.elapsed()}, ETA {progress.eta(total - index)})"
            )
        return status


def run_sweep(
    specs: Sequence[RunSpec],
    settings: SweepSettings,
    keep_going: bool = False,
    launcher: str = "joblib",
    launcher_options: Sequence[str] = (),
) -> int:
    """Run the grid through hydra's multirun on ``launcher`` (joblib: ``settings.jobs`` runs at
    a time in grid order, one after another in this process or each in a worker process; the
    submitit launchers: a process or SLURM job per run), with start/finish lines and an ETA;
    return the number of failures.

    Refuses (one line, nothing started) if a run under ``--out`` was recorded with another
    configuration, unless ``settings.rerun_changed``. A run that another sweep process holds
    (its lock) is left to that process. After a failure no new run starts unless ``keep_going``
    (runs in worker processes or submitit jobs share no such signal: each goes on).
    """
    settings.out.mkdir(parents=True, exist_ok=True)
    code, data = code_version(), data_identity(settings.data)
    changed = changed_runs(specs, settings, code, data)
    if changed and not settings.rerun_changed:
        refuse_changed_runs(changed, settings.out)
    by_name = {spec.name: spec for spec in specs}
    in_process = launcher == "joblib" and settings.jobs == 1  # joblib runs n_jobs=1 in-process
    started = time.time()
    shared = InProcess(SweepProgress(len(specs), 1, started)) if in_process else None
    job = GridJob(by_name, settings, code, data, keep_going, started, shared)
    overrides = hydra_overrides(
        launcher, settings.jobs, launcher_options, settings.out, list(by_name)
    )
    if launcher != "joblib":
        say(f"launching {len(specs)} runs on {launcher}; their output: {settings.out / 'launcher'}")
    try:
        statuses = multirun(job, overrides)
    except BaseException:  # Ctrl-C, SIGTERM: stop every run's fairseq process too
        if shared is not None:
            shared.stop.set()
            shared.children.stop_all()
        raise
    finally:
        if launcher == "joblib" and settings.jobs > 1:
            stop_joblib_workers(settings.jobs)
    if launcher != "joblib":
        for index, (name, status) in enumerate(zip(by_name, statuses), 1):
            say(f"run {index}/{len(specs)} {name}: {status}")
    path = write_results(settings.out)
    say(f"results: {path} ({len(load_results(settings.out))} finished runs)")
    return statuses.count("failed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sweep fixed truncation lengths K against target biases delta, and other "
        "gradient estimators, over seeds, through fairseq.",
        epilog="Options after -- go to every fairseq-train (model, optimizer, lr, batch size, "
        "estimate options ...); they override the preset.",
    )
    parser.add_argument("--data", type=Path, required=True, help="binarized corpus directory")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (resumable)")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="training settings: copy, ptb, wiki2 (the paper's, from "
        "configs/*.yaml) or "
        "bible-small (1 x 128 tied LSTM that trains in minutes on 2 CPU cores)",
    )
    parser.add_argument(
        "--fixed",
        default=None,
        help="fixed K values, comma-separated; none: no fixed-K runs (default: the preset's)",
    )
    parser.add_argument(
        "--deltas",
        default=None,
        help="target biases delta, comma-separated; none: no adaptive runs (default: the "
        "preset's, 0.9,0.5,0.1)",
    )
    parser.add_argument(
        "--estimators",
        default="none",
        metavar="SPEC[,SPEC...]",
        help="gradient estimators to train too, SPEC = METHOD[@ARCH]: a --gradient-estimator "
        "of the task (artbp, uoro, ...) on the sweep's model, or on the fairseq --arch ARCH; "
        "tbptt@ARCH is fixed-K TBPTT on ARCH (an anchor for methods tied to an architecture). "
        "Each at K = --estimator-length with the preset's fixed-K options, the same budget and "
        "validations (default: none)",
    )
    parser.add_argument(
        "--estimator-length",
        type=int,
        default=0,
        help="the --truncation-length of the --estimators runs (ARTBP: the mean segment length) "
        "(default: K0, the truncation length the adaptive runs start at: the preset's adaptive "
        "config, or the one given after --)",
    )
    parser.add_argument("--seeds", default="1", help="seeds, comma-separated (default 1)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-updates",
        type=int,
        default=0,
        help="updates per run, the same for every run (fairseq --max-update)",
    )
    budget.add_argument(
        "--budget-tokens",
        type=token_count,
        default=0,
        help="scored training tokens per run, the same for every run (the task's "
        "--max-train-tokens): equal data whatever K the runs use; needs --valid-interval",
    )
    budget.add_argument(
        "--budget-processed-tokens",
        type=token_count,
        default=0,
        help="tokens run through the model per run, training windows and estimates included, "
        "the same for every run (the task's --max-processed-tokens): equal compute whatever K "
        "the runs use; validation every --valid-tokens",
    )
    parser.add_argument(
        "--valid-tokens",
        type=token_count,
        default=0,
        help="with --budget-processed-tokens: validate and checkpoint every this many processed "
        "tokens, so runs of every K validate at the same compute (default: budget / 20)",
    )
    parser.add_argument(
        "--valid-interval",
        type=int,
        default=0,
        help="validate and checkpoint every this many updates (default with --budget-updates: "
        "budget / 10)",
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=0,
        help="fairseq train_inner log interval in updates (default: about valid interval / 5)",
    )
    parser.add_argument(
        "--tensorboard-logdir",
        type=Path,
        default=None,
        help="also write TensorBoard logs, one subdirectory per run",
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=60.0,
        help="print a run's training progress at most this often (validations always)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of each fairseq-train (OMP_NUM_THREADS); 0: leave as is. Small "
        "models such as the copy task's run fastest with 1",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --launcher joblib: runs trained at once, each in a worker process that "
        "starts a fairseq-train of --threads threads (e.g. --jobs 2 --threads 1 on 2 cores; "
        "1: one after another in this process). Several sweep processes may also share one "
        "--out: a run one of them is training is locked, and the others move on",
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="joblib",
        help="hydra launcher of the grid: joblib (this machine, --jobs runs at a time), "
        "submitit-local (a process per run, as on a cluster) or submitit-slurm (a SLURM job per "
        "run; --out on a file system the nodes share) (default joblib)",
    )
    parser.add_argument(
        "--launcher-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of the launcher's hydra config, hydra.launcher.KEY=VALUE (repeatable), "
        "e.g. partition=gpu, timeout_min=600, cpus_per_task=4, gpus_per_node=1, "
        "array_parallelism=8",
    )
    parser.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train again, in a fresh run directory, every run that --out holds with another "
        "command (data, options, budget) or code; the old directory moves to <out>/replaced/. "
        "Without it such a sweep is refused",
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="go on with the next run when one fails"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and their commands, run nothing"
    )
    return parser


def check_out_dir(path: Path, option: str = "--out", create: bool = True) -> None:
    """End with one ``error:`` line unless files can be written into the directory ``path``.


    With ``create`` the directory is made (parents too) and an unnamed probe file is written and
    dropped in it, which also catches a read-only file system; without, only a file in the way is
    caught (a dry run writes nothing).
    """
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise SystemExit(f"error: {option} {path} {where}; choose another {option}")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise SystemExit(
            f"error: cannot write into {option} {path}: {error.strerror or error}; choose "
            f"another {option}"
        ) from None


def settings_from_args(args: argparse.Namespace, extra: list[str]) -> SweepSettings:
    """Check the options and build the shared run settings."""
    budgets = (args.budget_updates, args.budget_tokens, args.budget_processed_tokens)
    if min(budgets) < 0 or not any(budgets):
        raise SystemExit(
            "error: the budget (--budget-updates, --budget-tokens or --budget-processed-tokens) "
            "must be at least 1"
        )
    if args.budget_tokens and not args.valid_interval:
        raise SystemExit(
            "error: --budget-tokens needs --valid-interval (updates between validations): the "
            "number of updates a run takes depends on its K"
        )
    if args.valid_tokens and not args.budget_processed_tokens:
        raise SystemExit("error: --valid-tokens goes with --budget-processed-tokens")
    valid_tokens = args.valid_tokens or max(1, args.budget_processed_tokens // 20)
    if not (args.data / "dict.txt").is_file():
        raise SystemExit(f"error: {args.data} holds no dict.txt; give a fairseq-preprocess output")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1 (got {args.jobs})")
    check_extra_args(extra)
    check_launcher_options(args.launcher_option)
    valid_interval = args.valid_interval or max(1, args.budget_updates // 10)
    # a token budget ends at an update no one knows in advance: log lines divide the interval
    log_span = args.budget_updates or valid_interval
    return SweepSettings(
        data=args.data.resolve(),
        out=args.out.resolve(),
        budget_updates=args.budget_updates,
        budget_tokens=args.budget_tokens,
        budget_processed_tokens=args.budget_processed_tokens,
        valid_processed_tokens=valid_tokens if args.budget_processed_tokens else 0,
        valid_interval=valid_interval,
        log_interval=args.log_interval
        or (20 if args.budget_processed_tokens else default_log_interval(valid_interval, log_span)),
        preset=get_preset(args.preset) if args.preset else None,
        extra_args=extra,
        tensorboard_logdir=args.tensorboard_logdir.resolve() if args.tensorboard_logdir else None,
        progress_seconds=args.progress_seconds,
        threads=args.threads,
        jobs=args.jobs,
        rerun_changed=args.rerun_changed,
    )


def estimator_specs(text: str, settings: SweepSettings) -> list[EstimatorSpec]:
    """``--estimators`` checked against the plugin's methods and architectures (which imports
    fairseq, so only when there are any)."""
    if text.strip().lower() in ("", "none"):
        return []
    methods, archs = plugin_choices()
    return parse_estimators(text, methods, archs, sweep_arch(settings))


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the sweep; exit status 1 if a run failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args, extra)
    preset = settings.preset
    fixed_text = args.fixed if args.fixed is not None else preset.fixed_grid if preset else ""
    delta_text = args.deltas if args.deltas is not None else preset.delta_grid if preset else ""
    fixed, deltas = parse_numbers(fixed_text, int), parse_numbers(delta_text, float)
    if any(not 0 < d < 1 for d in deltas) or any(k < 1 for k in fixed):
        raise SystemExit("error: deltas must lie in (0, 1) and fixed K values be at least 1")
    estimators = estimator_specs(args.estimators, settings)
    if args.estimator_length and not estimators:
        raise SystemExit("error: --estimator-length goes with --estimators")
    if args.estimator_length < 0:
        raise SystemExit(
            f"error: --estimator-length must be at least 1 (got {args.estimator_length})"
        )
    length = args.estimator_length or (initial_truncation_length(settings) if estimators else 0)
    specs = plan_runs(fixed, deltas, parse_numbers(args.seeds, int), estimators, length)
    if not specs:
        raise SystemExit(
            "error: nothing to run; give --fixed, --deltas and/or --estimators (or a --preset)"
        )
    methods = f", {len(estimators)} estimators at K {length}" if estimators else ""
    say(
        f"sweep: {len(specs)} runs ({len(fixed)} fixed K, {len(deltas)} deltas{methods}, seeds "
        f"{args.seeds}), {settings.budget_label} each, validation every "
        + (
            f"{settings.valid_processed_tokens} processed tokens"
            if settings.valid_processed_tokens
            else f"{settings.valid_interval} updates"
        )
        + f", into {settings.out}"
    )
    if preset is not None:
        say(f"preset {args.preset}: {preset.description}")
    check_out_dir(settings.out, create=not args.dry_run)
    if args.dry_run:
        for spec in specs:
            say(" ".join(train_command(spec, settings, settings.out / "runs" / spec.name)))
        return 0
    # SIGTERM ends the sweep like Ctrl-C: the running fairseq children are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    failures = run_sweep(specs, settings, args.keep_going, args.launcher, args.launcher_option)
    return 1 if failures else 0
