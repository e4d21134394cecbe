"""Cost of the bias estimator: one estimate against training, and a whole adaptive run's overhead
(the machinery: :mod:`atbptt_fairseq.experiments.estimator_bench`).

Details: docs/scripts.md, section scripts/bench_estimator.py.
"""

import sys

from atbptt_fairseq.experiments.estimator_bench import main

if __name__ == "__main__":
    sys.exit(main())
