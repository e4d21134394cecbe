"""The alternatives to truncation side by side: bias, variance and cost of each gradient estimator
(the machinery: :mod:`atbptt_fairseq.experiments.gradient_bench`).

Details: that module's docstring (the two parts); docs/alternatives.md.
"""

import sys

from atbptt_fairseq.experiments.gradient_bench import main

if __name__ == "__main__":
    sys.exit(main())
