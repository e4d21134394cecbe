"""Bad user input ends in one line, ``atbptt_fairseq: error: ...``, and exit status 1.

fairseq's CLIs let every exception escape with a full traceback. The excepthook built here prints
a :class:`~atbptt_fairseq.errors.UserInputError` as the last (and only) line; it finds one also
when fairseq wrapped it in an exception of its own (e.g. the trainer's "Cannot load model
parameters from checkpoint"). Every other exception goes to the hook it replaced, unchanged. Set
``ATBPTT_TRACEBACK=1`` to see the traceback as well.
"""

import os
import sys
from types import TracebackType
from typing import Callable, Optional, Type

from atbptt_fairseq.errors import find_user_error

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
            print(f"atbptt_fairseq: error: {user_error}", file=sys.stderr, flush=True)

    excepthook.reports_user_input_errors = True
    return excepthook
