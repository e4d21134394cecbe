"""Cost of the bias estimator: one estimate against training, and a whole adaptive run's overhead.

Details: docs/scripts.md, section scripts/bench_estimator.py.
"""

from __future__ import annotations

import argparse
import sys

from atbptt_fairseq.experiments.bench import add_machine_options
from atbptt_fairseq.experiments.estimator_bench import (
    COST_PRESETS,
    DEFAULT_BUDGET,
    DEFAULT_INTERVAL,
    DEFAULT_REPEATS,
    RUN_PRESETS,
    run_estimator_benchmark,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        choices=["both", "cost", "overhead"],
        default="both",
        help="cost: one estimate vs training (in process); overhead: adaptive vs frozen-K "
        "fairseq-train runs; both (default)",
    )
    parser.add_argument(
        "--preset",
        choices=["all", *COST_PRESETS],
        default="small",
        help="part 1 sizes: ptb (H 900, V 10k, S 32, W 400), small (H 512, V 500, S 32, W 100; "
        "default), quick (a smoke test); all = small then ptb",
    )
    parser.add_argument(
        "--run-preset",
        choices=list(RUN_PRESETS),
        default="small",
        help="part 2 sizes: small (V 500, H 512, B 32, K0 35, W 400; default), ptb, quick",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="part 1: alternated repeats (default 3)"
    )
    parser.add_argument(
        "--naive-window",
        type=int,
        default=-1,
        help="part 1: window of the naive comparison; 0: the full W; -1: the preset's (default: "
        "small 50, ptb 30, quick 50)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=2,
        help="part 2: adaptive/frozen run pairs, alternated (default 2)",
    )
    parser.add_argument(
        "--updates",
        type=int,
        default=0,
        help="part 2: measured updates per run after the warm-up; 0: as many as two decisions "
        "take (the first at K0, the second at K_min, the longest it can take)",
    )
    parser.add_argument(
        "--target-bias", type=float, default=0.1, help="part 2: --target-bias (default 0.1)"
    )
    parser.add_argument(
        "--initial-k",
        type=int,
        default=0,
        help="part 2: K0 (--truncation-length) of the adaptive run; 0: the preset's (35)",
    )
    parser.add_argument(
        "--tbptt-style",
        choices=["overlap", "disjoint"],
        default="overlap",
        help="part 2: TBPTT style of both runs (default overlap, the plugin's default)",
    )
    parser.add_argument(
        "--estimate-interval",
        type=int,
        default=0,
        help="--estimate-interval of part 2 and of part 1's prediction; 0: the preset's (small, "
        f"ptb: the plugin's default, {DEFAULT_INTERVAL}: on the token budget)",
    )
    parser.add_argument(
        "--estimate-budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="--estimate-budget of part 2 and of part 1's prediction (default "
        f"{DEFAULT_BUDGET}, the plugin's)",
    )
    parser.add_argument(
        "--estimate-repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="--estimate-repeats of part 2, and R of part 1's prediction (default 5, the plugin's)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="part 2: directory for the corpus and run files (kept); default: a temporary one",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of corpora, models and windows")
    add_machine_options(parser, waits_before="each repeat / run")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.pairs < 1 or args.updates < 0 or args.estimate_repeats < 1:
        parser.error("--repeats, --pairs and --estimate-repeats must be >= 1, --updates >= 0")
    if args.estimate_interval < 0 or not 0.0 < args.estimate_budget <= 1.0:
        parser.error("--estimate-interval must be >= 0 and --estimate-budget in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts and print (and optionally save) the figures."""
    run_estimator_benchmark(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
