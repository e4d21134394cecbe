"""Sweep fixed truncation lengths K against target biases delta, and other gradient estimators,
over seeds, through fairseq (the machinery: :mod:`atbptt_fairseq.experiments.sweep`).

Details: docs/scripts.md, section scripts/sweep.py.
"""

import sys

from atbptt_fairseq.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
