"""Turn any raw text (a file, or a directory of .txt files) into a binarized LM corpus (the
machinery: :mod:`atbptt_fairseq.experiments.text_corpus`).

Details: that module's docstring (the split, the tokenizations, what a directory holds).
"""

import sys

from atbptt_fairseq.experiments.text_corpus import main

if __name__ == "__main__":
    sys.exit(main())
