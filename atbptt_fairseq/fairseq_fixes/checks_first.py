"""fairseq-train checks the plugin's task before it logs its whole configuration.

fairseq-train's ``main`` logs the full configuration (a few hundred lines) before it sets the
task up, so the one line that reports bad input (a missing data directory, an option out of
range) came after the dump, far from where a user looks. The replacement sets the plugin's task
up once first, quietly, so bad input ends the run in that one line alone, then runs fairseq's
``main`` unchanged (which sets the task up again: it loads only the dictionary). fairseq-train
looks ``main`` up after parsing its command line, and fairseq-hydra-train ``pre_main`` after
composing its config, both after the plugin was imported; both names are replaced.
"""

import argparse
import functools
import logging
from contextlib import contextmanager
from typing import Iterator

from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.tasks import TASK_REGISTRY
from fairseq_cli import train as train_cli

_original_main = train_cli.main


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Log nothing below ERROR from ``logger_name`` and the loggers below it inside the block:
    fairseq's ``main`` sets the task up again and logs its lines (warnings included) once then."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def plugin_task_class(cfg) -> type | None:
    """The task class of ``cfg`` (a full fairseq config) if it is one of this plugin's, else None
    (told by its module: the task imports the fixes, so the fixes do not import the task)."""
    task_class = TASK_REGISTRY.get(cfg.task._name) if cfg.task is not None else None
    module = getattr(task_class, "__module__", "")
    return (
        task_class
        if isinstance(task_class, type) and module.startswith("atbptt_fairseq.")
        else None
    )


def check_task(cfg) -> None:
    """Set up the plugin's task of ``cfg`` (a full fairseq config) to run its checks, which raise
    :class:`~atbptt_fairseq.errors.UserInputError` for bad input; other tasks are left alone."""
    task_class = plugin_task_class(cfg)
    if task_class is not None:
        with _quiet("atbptt_fairseq"):
            task_class.setup_task(cfg.task)


@functools.wraps(_original_main)
def main(cfg, **kwargs):
    """fairseq-train's ``main``, after :func:`check_task`."""
    if isinstance(cfg, argparse.Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    check_task(cfg)
    return _original_main(cfg, **kwargs)
