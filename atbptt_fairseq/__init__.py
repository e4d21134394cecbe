"""atbptt_fairseq: adaptive truncated backpropagation through time for fairseq (``--user-dir``).

fairseq imports ``tasks/`` and ``models/`` of a user dir by itself; criterions and optim here.
"""

import argparse

import torch

# fairseq's own (legacy) checkpoints pickle an argparse.Namespace; allow it under torch's
# default weights_only loading so they still load with --user-dir atbptt_fairseq.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])

from atbptt_fairseq import (  # noqa: E402
    checkpoint_guard,
    distributed_fixes,
    errors,
    eval_lm_guard,
    training_budget,
)

# fairseq fixes that the command-line tools need (see each module): one-line errors for bad input,
# safe and clear checkpoint loading, atomic checkpoint copies, torchrun without CUDA devices,
# resuming with several ranks, stopping at a budget of training tokens, and fairseq-eval-lm's
# --context-window refused for the task
errors.install_excepthook()
checkpoint_guard.install()
distributed_fixes.install()
training_budget.install()
eval_lm_guard.install()

from atbptt_fairseq import criterions, models, optim, tasks  # noqa: E402,F401
