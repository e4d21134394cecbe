"""The paper's learning-rate scaling with K, applied so that schedulers never see it.

The paper trains at lr0 * sqrt(K) (linear for WikiText-2). A scheduler that reads the optimizer's
lr back (reduce-on-plateau shrinks the lr in force) would compound a factor written into the
optimizer. So the factor is applied only around the optimizer's step: every other moment the
param groups hold the lr the scheduler set, and the step uses that lr times factor(K).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

LR_SCALINGS = ("none", "sqrt", "linear")


def learning_rate_factor(truncation_length: int, reference: int, scaling: str) -> float:
    """sqrt(K / reference), K / reference, or 1 (``scaling`` none)."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"scaling must be one of {LR_SCALINGS} (got {scaling!r})")
    ratio = truncation_length / reference
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[scaling]


@contextlib.contextmanager
def scaled_learning_rate(param_groups: Iterable[dict[str, Any]], factor: float) -> Iterator[None]:
    """Multiply every param group's lr by ``factor`` inside the block, restore it afterwards.

    Wrap the optimizer's ``step()`` in it: the step applies the scaled lr, and the scheduler,
    the optimizer's state dict and the logs keep the unscaled one.
    """
    groups = list(param_groups)
    saved = [group["lr"] for group in groups]
    if factor != 1.0:
        for group in groups:
            group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(groups, saved):
            group["lr"] = lr
