"""Adaptive truncation of backpropagation through time, in plain PyTorch (no fairseq here)."""

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

__all__ = [
    "BiasEstimate",
    "GradientProfile",
    "State",
    "StepFn",
    "TruncationController",
    "TruncationDecision",
    "choose_truncation_length",
    "estimate_bias",
    "fit_decay_rate",
    "measure_gradient_profile",
    "measure_gradient_profile_naive",
    "sample_windows",
]
