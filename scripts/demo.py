"""The ``make demo``: adaptive TBPTT against a fixed-K baseline on the variable-length copy task
(the machinery: :mod:`atbptt_fairseq.experiments.demo`).

Details: docs/scripts.md, section scripts/demo.py.
"""

import sys

from atbptt_fairseq.experiments.demo import main

if __name__ == "__main__":
    sys.exit(main())
