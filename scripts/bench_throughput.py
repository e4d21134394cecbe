"""Training throughput of the plugin against a plain PyTorch loop and fairseq's own ``lstm_lm``.

Details: docs/scripts.md, section scripts/bench_throughput.py.
"""

from __future__ import annotations

import argparse
import sys

from atbptt_fairseq.experiments.bench import add_machine_options
from atbptt_fairseq.experiments.throughput_bench import PRESETS, run_throughput_benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=["all", *PRESETS],
        default="all",
        help="sizes: ptb (V 10k, H 900, B 32, K 35), small (V 500, H 512, B 32, K 35), quick "
        "(a smoke test); all = small then ptb (default)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of every contender, alternated (default 3)"
    )
    parser.add_argument(
        "--updates",
        type=int,
        default=0,
        help="measured updates per run after the warm-up; 0: the preset's default",
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=0,
        help="updates per fairseq log line (and per timed group of (b)); 0: the preset's default",
    )
    parser.add_argument(
        "--warmup-lines",
        type=int,
        default=1,
        help="log intervals dropped at the start of every run (>= 1; default 1)",
    )
    parser.add_argument(
        "--dropout", type=float, default=0.2, help="dropout of all three models (default 0.2)"
    )
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument(
        "--no-overlap", action="store_true", help="skip the extra overlap-style plugin row"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="directory for the corpora and run files (kept; corpora are reused); default: a "
        "temporary directory, removed at the end",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of corpora and models")
    add_machine_options(parser, waits_before="each run")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup_lines < 1 or args.updates < 0 or args.log_interval < 0:
        parser.error("--repeats and --warmup-lines must be >= 1, --updates and --log-interval >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen presets and print (and optionally save) the figures."""
    run_throughput_benchmark(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
