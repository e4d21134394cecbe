"""Figures and a summary table of a sweep directory written by ``scripts/sweep.py`` (the
machinery: :mod:`atbptt_fairseq.experiments.plots`).

Details: docs/scripts.md, section scripts/plot.py.
"""

import sys

from atbptt_fairseq.experiments.plots import main

if __name__ == "__main__":
    sys.exit(main())
