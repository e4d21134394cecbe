"""atbptt_fairseq: adaptive truncated backpropagation through time for fairseq (``--user-dir``).

fairseq imports ``tasks/`` and ``models/`` of a user dir by itself; criterions and optim here.
"""

import argparse

import torch

# fairseq's own (legacy) checkpoints pickle an argparse.Namespace; allow it under torch's
# default weights_only loading so they still load with --user-dir atbptt_fairseq.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])

from atbptt_fairseq import criterions, models, optim, tasks  # noqa: E402,F401
