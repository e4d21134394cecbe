"""Download (or take from disk) and binarize a standard word-level language-modelling corpus (the
machinery: :mod:`atbptt_fairseq.experiments.lm_corpora`).

Details: that module's docstring (the corpora and their checks).
"""

import sys

from atbptt_fairseq.experiments.lm_corpora import main

if __name__ == "__main__":
    sys.exit(main())
