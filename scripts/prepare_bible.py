"""Prepare the King James Bible (Debian package ``bible-kjv``) as a word-level LM corpus (the
machinery: :mod:`atbptt_fairseq.experiments.bible`).

Details: that module's docstring (the source and the tokenization).
"""

import sys

from atbptt_fairseq.experiments.bible import main

if __name__ == "__main__":
    sys.exit(main())
