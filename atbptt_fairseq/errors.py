"""Errors in the user's input, which the fairseq command-line tools report as one clear line.

For problems the user has to fix (a missing data directory, a bad option, a checkpoint that does
not fit the data) the plugin raises :class:`UserInputError` with a message that names the problem
and what to do. The excepthook that prints it as ``atbptt_fairseq: error: ...`` is one of the
fixes to fairseq (:mod:`atbptt_fairseq.fairseq_fixes.user_errors`).
"""

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
