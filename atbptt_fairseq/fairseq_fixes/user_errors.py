"""Bad user input ends in one line, ``atbptt_fairseq: error: ...``, and exit status 1.

fairseq's CLIs let every exception escape with a full traceback. The excepthook built here prints
a :class:`~atbptt_fairseq.errors.UserInputError` as the last (and only) line; it finds one also
when fairseq wrapped it in an exception of its own (e.g. the trainer's "Cannot load model
parameters from checkpoint"). Every other exception goes to the hook it replaced, unchanged. Set
``ATBPTT_TRACEBACK=1`` to see the traceback as well.

fairseq-hydra-train never reaches the excepthook: hydra catches the exception and prints its
traceback itself, so :func:`hydra_main` reports the line before hydra sees the error.
"""

import os
import sys
import traceback
from types import TracebackType
from typing import Callable, Optional, Type

from fairseq_cli import hydra_train as hydra_train_cli

from atbptt_fairseq.errors import UserInputError, find_user_error

ExceptHook = Callable[[Type[BaseException], BaseException, Optional[TracebackType]], object]


def user_error_excepthook(previous: ExceptHook) -> ExceptHook:
    """An excepthook that reports a ``UserInputError`` in one line and chains to ``previous``
    for everything else; ``previous`` itself if it already is such a hook."""
    if getattr(previous, "reports_user_input_errors", False):
        return previous

    def excepthook(exc_type, exc_value, exc_traceback) -> None:
        user_error = find_user_error(exc_value)
        if user_error is None or os.environ.get("ATBPTT_TRACEBACK"):
            previous(exc_type, exc_value, exc_traceback)
        if user_error is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            _report(user_error)

    excepthook.reports_user_input_errors = True
    return excepthook


def _report(user_error: UserInputError) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"atbptt_fairseq: error: {user_error}", file=sys.stderr, flush=True)


_original_hydra_main = hydra_train_cli._hydra_main


def hydra_main(cfg, **kwargs):
    """fairseq-hydra-train's ``_hydra_main``; a ``UserInputError`` ends the run in one line and
    exit status 1 instead of hydra's traceback."""
    try:
        return _original_hydra_main(cfg, **kwargs)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        if os.environ.get("ATBPTT_TRACEBACK"):
            traceback.print_exc()
        _report(user_error)
        raise SystemExit(1) from None
