"""atbptt_fairseq: adaptive truncated backpropagation through time for fairseq (``--user-dir``).

fairseq imports ``tasks/`` and ``models/`` of a user dir by itself; criterions and optim here.
Importing the package registers the plugin's components with fairseq and changes nothing else.
The fixes that fairseq's command-line tools need (:mod:`atbptt_fairseq.fairseq_fixes`) are
installed only when such a tool runs with the plugin: when fairseq imports it as ``--user-dir``,
when an ``atbptt-*`` command runs, or when fairseq sets up the plugin's task; a program that
drives fairseq itself calls ``atbptt_fairseq.fairseq_fixes.install()``.

Without fairseq the package still imports (its commands then say what to install, in one line),
and using a component raises ``ModuleNotFoundError`` with the same line.
"""

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Optional

from atbptt_fairseq.dependencies import missing_dependency_message

COMPONENTS = ("criterions", "models", "optim", "tasks", "fairseq_fixes")
HYDRA_VERSION_BASE = r"\s*The version_base parameter is not specified"


def _imported_by_fairseq_user_dir() -> bool:
    """Whether fairseq's ``import_user_module`` (a CLI's ``--user-dir``) is importing us."""
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "import_user_module"
            and frame.f_globals.get("__name__") == "fairseq.utils"
        ):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """Keep the root logger's level and handlers as they were: importing fairseq calls
    ``logging.basicConfig(level=logging.DEBUG)`` (fairseq/models/wav2vec/
    wav2vec2_classification.py, upstream), which in a program that had not configured logging
    yet prints every library's debug lines (matplotlib's among them) on stderr. fairseq's
    command-line tools configure logging before they import a user dir: a no-op for them."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


# the ModuleNotFoundError that kept the components from importing (fairseq or one of its own
# dependencies is not installed); None when they imported
missing_dependency: Optional[ModuleNotFoundError] = None

try:
    with _root_logger_kept(), warnings.catch_warnings():
        # fairseq_cli.hydra_train (which the fixes wrap) warns on import that fairseq's
        # @hydra.main gives no version_base: fairseq's, and nothing a user can act on
        warnings.filterwarnings("ignore", message=HYDRA_VERSION_BASE, category=UserWarning)
        from atbptt_fairseq import criterions, fairseq_fixes, models, optim, tasks  # noqa: F401
except ModuleNotFoundError as error:
    if missing_dependency_message(error) is None:
        raise
    missing_dependency = error

    def __getattr__(name: str):
        """The components need fairseq: say what to install instead of an AttributeError."""
        if name in COMPONENTS:
            message = missing_dependency_message(missing_dependency)
            raise ModuleNotFoundError(
                f"atbptt_fairseq.{name} needs fairseq. {message}", name=missing_dependency.name
            )
        raise AttributeError(f"module 'atbptt_fairseq' has no attribute '{name}'")

else:
    if _imported_by_fairseq_user_dir():
        fairseq_fixes.install()
