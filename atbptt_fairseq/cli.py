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
"""

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# hydra configs per paper setting (package data); their grids are the multirun sweeps
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")


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
    import atbptt_fairseq  # noqa: F401  (the plugin and its fixes, before fairseq parses)
    from fairseq.utils import reset_logging

    if fairseq_logging:
        reset_logging()
    sys.argv = [sys.argv[0], *args]
    main()


def train(argv: Optional[Sequence[str]] = None) -> None:
    """``atbptt-train``: fairseq-train with the plugin."""
    from fairseq_cli import train as train_cli

    _run(train_cli.cli_main, with_user_dir(sys.argv[1:] if argv is None else argv))


def eval_lm(argv: Optional[Sequence[str]] = None) -> None:
    """``atbptt-eval-lm``: fairseq-eval-lm with the plugin."""
    from fairseq_cli import eval_lm as eval_lm_cli

    _run(eval_lm_cli.cli_main, with_user_dir(sys.argv[1:] if argv is None else argv))


def hydra_train(argv: Optional[Sequence[str]] = None) -> None:
    """``atbptt-hydra-train``: fairseq-hydra-train with the plugin and its packaged configs."""
    from fairseq_cli import hydra_train as hydra_train_cli

    args = with_hydra_plugin(sys.argv[1:] if argv is None else argv)
    _run(hydra_train_cli.cli_main, args, fairseq_logging=False)  # hydra configures logging


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
