"""Errors in the user's input, reported by the fairseq command-line tools as one clear line.

fairseq's CLIs let every exception escape with a full traceback. For problems the user has to fix
(a missing data directory, a bad option, a checkpoint that does not fit the data) the plugin raises
:class:`UserInputError` with a message that names the problem and what to do; the hook installed
here prints that message as the last (and only) line, ``atbptt_fairseq: error: ...``, and the
process exits with status 1. Set ``ATBPTT_TRACEBACK=1`` to see the traceback as well.

The hook finds a ``UserInputError`` also when fairseq wrapped it in an exception of its own (e.g.
the trainer's "Cannot load model parameters from checkpoint"). Every other exception is printed by
the previous hook, unchanged.
"""

import os
import sys
from typing import Optional


class UserInputError(ValueError):
    """A problem with the data, the options or a file given by the user, with what to do."""


def find_user_error(error: Optional[BaseException]) -> Optional[UserInputError]:
    """The first :class:`UserInputError` in ``error``'s chain of causes and contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _excepthook(exc_type, exc_value, exc_traceback) -> None:
    user_error = find_user_error(exc_value)
    if user_error is None or os.environ.get("ATBPTT_TRACEBACK"):
        _previous_excepthook(exc_type, exc_value, exc_traceback)
    if user_error is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"atbptt_fairseq: error: {user_error}", file=sys.stderr, flush=True)


_previous_excepthook = sys.excepthook


def install_excepthook() -> None:
    """Report uncaught :class:`UserInputError` as one line (idempotent)."""
    global _previous_excepthook
    if sys.excepthook is not _excepthook:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook
