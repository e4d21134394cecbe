"""Training throughput of the plugin against a plain PyTorch loop and fairseq's own ``lstm_lm``
(the machinery: :mod:`atbptt_fairseq.experiments.throughput_bench`).

Details: docs/scripts.md, section scripts/bench_throughput.py.
"""

import sys

from atbptt_fairseq.experiments.throughput_bench import main

if __name__ == "__main__":
    sys.exit(main())
