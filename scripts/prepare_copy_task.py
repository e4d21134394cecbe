"""Generate and binarize the copy task of Aicher, Foti & Fox (UAI 2019) (the machinery:
:mod:`atbptt_fairseq.experiments.copy_task`).

Details: that module's docstring (the task and the layout of the data-bin).
"""

import sys

from atbptt_fairseq.experiments.copy_task import main

if __name__ == "__main__":
    sys.exit(main())
