"""Command-line entry points that find the plugin wherever it is installed.

fairseq's ``--user-dir`` takes a path, so ``--user-dir atbptt_fairseq`` works only from a checkout's
root (or, for a non-editable install, because fairseq also looks next to its own package). These
commands import the plugin and hand fairseq its installed directory instead, then run fairseq's own
command unchanged:

    atbptt-train DATA --task adaptive_tbptt_lm ...          # fairseq-train --user-dir <package>
    atbptt-eval-lm DATA --task adaptive_tbptt_lm --path ... # fairseq-eval-lm --user-dir <package>
    atbptt-hydra-train --config-name ptb_adaptive task.data=...  # the packaged configs
    python -m atbptt_fairseq.cli user-dir                   # prints the directory for --user-dir

(``python -m atbptt_fairseq.cli train|eval-lm|hydra-train ...`` is the same without the scripts.)
A ``--user-dir`` (``common.user_dir=`` for hydra) or ``--config-dir`` on the command line wins.
``--help`` of train and eval-lm lists the plugin's options after fairseq's own (fairseq's help
lists no task options). The commands install the fixes to fairseq (:mod:`.fairseq_fixes`); a
missing dependency (fairseq, or one of its own) ends them in one line saying what to install.
"""

import argparse
import functools
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence

from atbptt_fairseq.dependencies import missing_dependency_message

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# hydra configs per paper setting (package data); their grids are the multirun sweeps
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
HYDRA_DEPRECATIONS = (
    r"\s*The version_base parameter is not specified",
    r"hydra\.experimental\.\w+\(\) is no longer experimental",
    r"In '[^']*': Usage of deprecated keyword in package header",
    r"\s*'[^']*' is validated against ConfigStore schema",
    r"\s*The strict flag in the compose API is deprecated",
    r"\s*Future Hydra versions will no longer change working directory",
)


def _given(args: Sequence[str], *names: str) -> bool:
    """Whether an option or hydra override named ``names`` is among ``args``."""
    return any(arg == name or arg.startswith(name + "=") for arg in args for name in names)


def with_user_dir(args: Sequence[str]) -> List[str]:
    """fairseq command-line ``args`` with ``--user-dir`` naming the installed plugin."""
    return list(args) if _given(args, "--user-dir") else [*args, "--user-dir", PACKAGE_DIR]


def with_hydra_plugin(args: Sequence[str]) -> List[str]:
    """fairseq-hydra-train ``args`` with the packaged configs and the installed plugin."""
    args = list(args)
    if not _given(args, "--config-dir", "-cd"):
        args = ["--config-dir", CONFIG_DIR, *args]
    if not _given(args, "common.user_dir", "+common.user_dir", "++common.user_dir"):
        # hydra's parser takes the overrides as one run of positionals: add ours to that run
        # (after its last override), not after a trailing flag such as -m
        overrides = [i for i, arg in enumerate(args) if "=" in arg and not arg.startswith("-")]
        at = overrides[-1] + 1 if overrides else len(args)
        args.insert(at, f"common.user_dir={PACKAGE_DIR}")
    return args


def _run(main: Callable[[], object], args: List[str], fairseq_logging: bool = True) -> None:
    """Run a fairseq ``cli_main`` (which reads ``sys.argv``) on ``args``.

    ``fairseq_logging``: log in fairseq's format. fairseq's commands configure logging before
    they import fairseq, some of whose modules call ``logging.basicConfig`` on import; here the
    plugin imported fairseq first, so fairseq's own ``reset_logging`` sets the format again.
    """
    from fairseq.utils import reset_logging

    from atbptt_fairseq import fairseq_fixes  # the plugin, before fairseq parses

    fairseq_fixes.install()
    # hydra's deprecation warnings about how fairseq composes its config (about 20 lines before
    # every run, nothing a user can act on): the command's own output comes alone
    for message in HYDRA_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    if fairseq_logging:
        reset_logging()
    sys.argv = [sys.argv[0], *args]
    main()


def _wants_help(args: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in args)


def _plugin_dataclasses(args: Sequence[str]) -> List[tuple]:
    """``(title, config dataclass)`` of the plugin's task, criterion and optimizer, and of the
    model named by ``--arch`` in ``args`` if it is one of the plugin's."""
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.optim import OPTIMIZER_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    def ours(registry: dict) -> Dict[str, type]:
        return {
            name: cls for name, cls in registry.items() if cls.__module__.startswith(__package__)
        }

    sections = []
    for option, registry in (
        ("--task", TASK_DATACLASS_REGISTRY),
        ("--criterion", CRITERION_DATACLASS_REGISTRY),
        ("--optimizer", OPTIMIZER_DATACLASS_REGISTRY),
    ):
        sections += [(f"{option} {name}", cls) for name, cls in ours(registry).items()]
    models = ours(MODEL_DATACLASS_REGISTRY)
    arch = next((a.split("=", 1)[1] for a in args if a.startswith("--arch=")), None)
    if "--arch" in args[:-1]:
        arch = args[list(args).index("--arch") + 1]
    if arch in models:
        sections.append((f"--arch {arch}", models[arch]))
    return sections


def plugin_options_help(args: Sequence[str] = ()) -> str:
    """The plugin's options with their defaults and help, read from its config dataclasses
    (through fairseq's own reader, so they are the options fairseq parses)."""
    from fairseq.dataclass.utils import gen_parser_from_dataclass
    from fairseq.models import MODEL_DATACLASS_REGISTRY

    parser = argparse.ArgumentParser(
        prog="",
        usage=argparse.SUPPRESS,
        add_help=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for title, cls in _plugin_dataclasses(args):
        gen_parser_from_dataclass(parser.add_argument_group(f"options of {title}"), cls())
    archs = sorted(
        name for name, cls in MODEL_DATACLASS_REGISTRY.items()
        if cls.__module__.startswith(__package__)
    )  # fmt: skip
    return (
        "\nThe plugin's options (fairseq's --help above lists none of them):\n"
        + parser.format_help()
        + f"\nThe plugin's models (--arch NAME --help lists its options): {', '.join(archs)}\n"
    )


def _fairseq_command(main_name: str) -> Callable[[Sequence[str]], None]:
    """Run fairseq_cli.``main_name``'s ``cli_main`` with the plugin; ``--help`` also lists the
    plugin's options."""

    def run(args: Sequence[str]) -> None:
        import importlib

        cli_main = importlib.import_module(f"fairseq_cli.{main_name}").cli_main
        try:
            _run(cli_main, with_user_dir(args))
        except SystemExit as done:
            if not (_wants_help(args) and done.code in (0, None)):
                raise
            print(plugin_options_help(args))
            raise

    return run


def reports_missing_dependencies(command: Callable) -> Callable:
    """``command``, ending in one line (and exit status 1) when a module it imports is not
    installed, saying what to install; ``ATBPTT_TRACEBACK=1`` shows the traceback as well."""

    @functools.wraps(command)
    def entry_point(argv: Optional[Sequence[str]] = None) -> None:
        try:
            import atbptt_fairseq

            if atbptt_fairseq.missing_dependency is not None:
                raise atbptt_fairseq.missing_dependency
            command(list(sys.argv[1:] if argv is None else argv))
        except ModuleNotFoundError as error:
            message = missing_dependency_message(error)
            if message is None:
                raise
            if os.environ.get("ATBPTT_TRACEBACK"):
                import traceback

                traceback.print_exc()
            name = os.path.basename(sys.argv[0]) if argv is None else "atbptt_fairseq"
            print(f"{name}: error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return entry_point


@reports_missing_dependencies
def train(argv: Sequence[str]) -> None:
    """``atbptt-train``: fairseq-train with the plugin."""
    _fairseq_command("train")(argv)


@reports_missing_dependencies
def eval_lm(argv: Sequence[str]) -> None:
    """``atbptt-eval-lm``: fairseq-eval-lm with the plugin."""
    _fairseq_command("eval_lm")(argv)


@reports_missing_dependencies
def hydra_train(argv: Sequence[str]) -> None:
    """``atbptt-hydra-train``: fairseq-hydra-train with the plugin and its packaged configs."""
    from fairseq_cli import hydra_train as hydra_train_cli

    # hydra configures logging
    _run(hydra_train_cli.cli_main, with_hydra_plugin(argv), fairseq_logging=False)


COMMANDS: Dict[str, Callable[[Optional[Sequence[str]]], None]] = {
    "train": train,
    "eval-lm": eval_lm,
    "hydra-train": hydra_train,
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m atbptt_fairseq.cli COMMAND ...``; ``user-dir`` / ``config-dir`` print paths."""
    argv = list(sys.argv[1:] if argv is None else argv)
    paths = {"user-dir": PACKAGE_DIR, "config-dir": CONFIG_DIR}
    if argv and argv[0] in paths:
        print(paths[argv[0]])
        return
    if not argv or argv[0] not in COMMANDS:
        choices = ", ".join([*COMMANDS, *paths])
        print(
            f"usage: python -m atbptt_fairseq.cli {{{choices}}} [fairseq options]",
            file=sys.stderr,
        )
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
