"""atbptt: adaptive truncated backpropagation through time (Aicher, Foti & Fox, UAI 2019).

The method as a library, torch and numpy only: the per-lag gradient profile, the decay fit, the
bias estimate and the choice of K, the controller and its schedule, and the token stream with its
segment plan, the protocol of a stateful recurrent model, the one segment loop every front end
trains through (:class:`TbpttLoop`), a driver for plain PyTorch training loops over it and the
safe checkpoint loader every front end uses. Importing it changes no global state.
"""

from .bias import (
    BiasEstimate,
    choose_truncation_length,
    estimate_bias,
    fit_decay_rate,
    raw_truncation_length,
)
from .checkpoint import CheckpointError, load_checkpoint
from .config import (
    RESUME_BREAKING_OPTIONS,
    TbpttConfig,
    budget_tokens,
    describe_changes,
    lr_factor,
    resume_changes,
)
from .controller import (
    BIAS_REFERENCES,
    ESTIMATE_METHODS,
    FIRST_ESTIMATES,
    LAG_ORIGINS,
    TruncationController,
    TruncationDecision,
    build_controller,
)
from .driver import TbpttDriver, TrainingSegment, evaluate_stream
from .gradient_profile import (
    GradientProfile,
    State,
    StepFn,
    measure_gradient_profile,
    measure_gradient_profile_naive,
    sample_windows,
)
from .ground_truth import (
    GroundTruth,
    TrueBias,
    delta_hat_on_grid,
    first_lags,
    measure_true_bias,
    smallest_length_below,
)
from .in_window import (
    InWindowMeasurement,
    bucket_edges,
    estimate_bias_in_window,
    measure_in_window,
)
from .learning_rate import LR_SCALINGS, learning_rate_factor, scaled_learning_rate
from .loop import LoopSegment, TbpttLoop, estimate_truncation, stream_identity
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
from .update_noise import UpdateNoise, UpdateNoiseAccumulator

__all__ = [
    "BIAS_REFERENCES",
    "ESTIMATE_METHODS",
    "FIRST_ESTIMATES",
    "LAG_ORIGINS",
    "LR_SCALINGS",
    "RESUME_BREAKING_OPTIONS",
    "BiasEstimate",
    "CheckpointError",
    "GradientProfile",
    "GroundTruth",
    "InWindowMeasurement",
    "LoopSegment",
    "RecurrentModel",
    "Segment",
    "State",
    "StepFn",
    "StreamCursor",
    "StreamTooShortError",
    "TbpttConfig",
    "TbpttDriver",
    "TbpttLoop",
    "TrainingSegment",
    "TrueBias",
    "TruncationController",
    "TruncationDecision",
    "UpdateNoise",
    "UpdateNoiseAccumulator",
    "aligned_stream",
    "bucket_edges",
    "budget_tokens",
    "build_controller",
    "choose_truncation_length",
    "delta_hat_on_grid",
    "describe_changes",
    "estimate_bias",
    "estimate_bias_in_window",
    "estimate_truncation",
    "evaluate_stream",
    "first_lags",
    "fit_decay_rate",
    "lay_out_columns",
    "learning_rate_factor",
    "load_checkpoint",
    "lr_factor",
    "measure_gradient_profile",
    "measure_gradient_profile_naive",
    "measure_in_window",
    "measure_true_bias",
    "plan_segment",
    "raw_truncation_length",
    "resume_changes",
    "sample_windows",
    "scaled_learning_rate",
    "segments_per_pass",
    "smallest_length_below",
    "stream_identity",
]
