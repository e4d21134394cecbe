"""atbptt: adaptive truncated backpropagation through time (Aicher, Foti & Fox, UAI 2019).

The method as a library, torch and numpy only: the per-lag gradient profile, the decay fit, the
bias estimate and the choice of K, the controller and its schedule, and the token stream with its
segment plan, the protocol of a stateful recurrent model and a driver for plain PyTorch training
loops. Importing it changes no global state.
"""

from .bias import (
    BiasEstimate,
    choose_truncation_length,
    estimate_bias,
    fit_decay_rate,
    raw_truncation_length,
)
from .controller import LAG_ORIGINS, TruncationController, TruncationDecision
from .driver import (
    TbpttConfig,
    TbpttDriver,
    TrainingSegment,
    budget_tokens,
    build_controller,
    estimate_truncation,
    evaluate_stream,
    lr_factor,
)
from .gradient_profile import (
    GradientProfile,
    State,
    StepFn,
    measure_gradient_profile,
    measure_gradient_profile_naive,
    sample_windows,
)
from .learning_rate import LR_SCALINGS, learning_rate_factor, scaled_learning_rate
from .protocol import RecurrentModel
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
    "LAG_ORIGINS",
    "LR_SCALINGS",
    "BiasEstimate",
    "GradientProfile",
    "RecurrentModel",
    "Segment",
    "State",
    "StepFn",
    "StreamCursor",
    "StreamTooShortError",
    "TbpttConfig",
    "TbpttDriver",
    "TrainingSegment",
    "TruncationController",
    "TruncationDecision",
    "aligned_stream",
    "budget_tokens",
    "build_controller",
    "choose_truncation_length",
    "estimate_bias",
    "estimate_truncation",
    "evaluate_stream",
    "fit_decay_rate",
    "lay_out_columns",
    "learning_rate_factor",
    "lr_factor",
    "measure_gradient_profile",
    "measure_gradient_profile_naive",
    "plan_segment",
    "raw_truncation_length",
    "sample_windows",
    "scaled_learning_rate",
    "segments_per_pass",
]
