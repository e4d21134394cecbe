"""atbptt: adaptive truncated backpropagation through time (Aicher, Foti & Fox, UAI 2019).

The method as a library, torch and numpy only: the per-lag gradient profile, the decay fit, the
bias estimate and the choice of K, the controller and its schedule, and the token stream with its
segment plan. Importing it changes no global state.
"""

from .bias import BiasEstimate, choose_truncation_length, estimate_bias, fit_decay_rate
from .controller import TruncationController, TruncationDecision
from .gradient_profile import (
    GradientProfile,
    State,
    StepFn,
    measure_gradient_profile,
    measure_gradient_profile_naive,
    sample_windows,
)
from .token_stream import (
    Segment,
    StreamCursor,
    StreamTooShortError,
    aligned_stream,
    lay_out_columns,
    plan_segment,
    segments_per_pass,
)

__all__ = [
    "BiasEstimate",
    "GradientProfile",
    "Segment",
    "State",
    "StepFn",
    "StreamCursor",
    "StreamTooShortError",
    "TruncationController",
    "TruncationDecision",
    "aligned_stream",
    "choose_truncation_length",
    "estimate_bias",
    "fit_decay_rate",
    "lay_out_columns",
    "measure_gradient_profile",
    "measure_gradient_profile_naive",
    "plan_segment",
    "sample_windows",
    "segments_per_pass",
]
