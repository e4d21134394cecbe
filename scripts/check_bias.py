"""Is delta_hat the bias it claims to be? The true relative bias of truncated BPTT on a
checkpoint (the machinery: :mod:`atbptt_fairseq.experiments.bias_check`).

Details: that module's docstring (what is measured and written); docs/bias_check.md.
"""

import sys

from atbptt_fairseq.experiments.bias_check import main

if __name__ == "__main__":
    sys.exit(main())
