"""atbptt_fairseq: adaptive truncated backpropagation through time for fairseq (``--user-dir``).

fairseq imports ``tasks/`` and ``models/`` of a user dir by itself; criterions and optim here.
The fixes that fairseq's command-line tools need are all in :mod:`atbptt_fairseq.fairseq_fixes`.
"""

from atbptt_fairseq import fairseq_fixes

fairseq_fixes.install()

from atbptt_fairseq import criterions, models, optim, tasks  # noqa: E402,F401
