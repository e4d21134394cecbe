"""Gradient estimators for recurrent models behind one interface, and models they need.

- :class:`Truncation` (TBPTT at the loop's K in force: what :class:`atbptt.TbpttLoop` trains
  with when given no other estimator), :class:`Truncated` (at a fixed K) and
  :class:`AdaptiveTruncation` (at the K of an adaptive controller): biased by the cut history;
- :class:`Artbp`: random truncation with compensation factors, unbiased (any model);
- :class:`Uoro`: rank-one forward-mode RTRL, unbiased and noisy (any model ``torch.func`` steps);
- :class:`KfRtrl`: Kronecker-factored RTRL, unbiased, less noisy (:class:`TanhRnn`);
- :class:`ExactRtrl`: exact RTRL for element-wise recurrence (:class:`ElementwiseLstm`).

See ``docs/alternatives.md`` for what each computes and what the tests prove.
"""

from .artbp import Artbp
from .base import (
    Carry,
    GradientEstimator,
    LoopSegment,
    full_gradient,
    functional_step,
    run_segments,
    sequence_gradient,
    trained_module,
)
from .exact_rtrl import ExactRtrl
from .kf_rtrl import KfRtrl
from .models import ElementwiseLstm, TanhRnn
from .truncated import AdaptiveTruncation, Truncated, Truncation
from .uoro import Uoro

__all__ = [
    "AdaptiveTruncation",
    "Artbp",
    "Carry",
    "ElementwiseLstm",
    "ExactRtrl",
    "GradientEstimator",
    "KfRtrl",
    "LoopSegment",
    "TanhRnn",
    "Truncated",
    "Truncation",
    "Uoro",
    "full_gradient",
    "functional_step",
    "run_segments",
    "sequence_gradient",
    "trained_module",
]
