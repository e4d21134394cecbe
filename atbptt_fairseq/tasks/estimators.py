"""--gradient-estimator of the ``adaptive_tbptt_lm`` task: the estimators of
:mod:`atbptt.estimators`, the models they can train, and the layout of their carried state."""

from typing import List, Optional, Tuple

import torch
from fairseq.models import ARCH_MODEL_REGISTRY
from torch import Tensor

from atbptt.estimators import (
    Artbp,
    ElementwiseLstm,
    ExactRtrl,
    GradientEstimator,
    KfRtrl,
    TanhRnn,
    Uoro,
    trained_module,
)
from atbptt.gradient_profile import State
from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.tasks.config import AdaptiveTbpttLmConfig

ESTIMATORS = {"artbp": Artbp, "uoro": Uoro, "kf-rtrl": KfRtrl, "exact-rtrl": ExactRtrl}
# the core model class the methods built for one recurrence need (docs/alternatives.md says why)
ESTIMATOR_MODELS = {"kf-rtrl": TanhRnn, "exact-rtrl": ElementwiseLstm}


def build_gradient_estimator(cfg: AdaptiveTbpttLmConfig) -> Optional[GradientEstimator]:
    """The estimator of --gradient-estimator, seeded with --seed; None: the loop's own
    truncated BPTT."""
    method = getattr(cfg, "gradient_estimator", "tbptt")
    seed = cfg.seed if isinstance(cfg.seed, int) else 0
    estimator = ESTIMATORS.get(method)
    return None if estimator is None else estimator(seed=seed)


def task_layout(state: State, batch_dim: int) -> Tuple[Tensor, ...]:
    """A state with its batch along dim 1, the layout in which the task carries and checkpoints
    states (``nn.LSTM``'s layers x B x H): a batch-first state, such as a core model's B x H,
    gets a leading dim of 1, the 1 x B x H its fairseq wrapper shows."""
    if batch_dim == 1:
        return tuple(state)
    return tuple(tensor.movedim(batch_dim, 0).unsqueeze(0) for tensor in state)


def architectures_around(core_class: type) -> List[str]:
    """The --arch names of the fairseq models that wrap a ``core_class`` model (``core_class``
    attribute, as the one-hot models of ``atbptt_fairseq.models`` have)."""
    return sorted(
        name
        for name, model in ARCH_MODEL_REGISTRY.items()
        if issubclass(getattr(model, "core_class", type(None)), core_class)
    )


def check_estimator_model(cfg: AdaptiveTbpttLmConfig, model: torch.nn.Module) -> None:
    """Refuse a model that --gradient-estimator cannot train (KF-RTRL and exact RTRL are built
    for one recurrence each), naming the architectures that work."""
    method = getattr(cfg, "gradient_estimator", "tbptt")
    required = ESTIMATOR_MODELS.get(method)
    if required is None or isinstance(trained_module(model), required):
        return
    raise UserInputError(
        f"--gradient-estimator {method} trains only models around atbptt.estimators."
        f"{required.__name__} (--arch {', '.join(architectures_around(required))}; "
        f"docs/alternatives.md says why), not {type(model).__name__}"
    )
