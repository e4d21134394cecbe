"""The alternatives to truncation side by side: bias, variance and cost of each gradient estimator.

Part 1 (``--part bias``): on the variable-length copy task (m ~ U{5..10}), for a tanh RNN and
the element-wise LSTM, untrained and trained (full BPTT with Adam on the copy task), B sequences of
T steps from the zero state: the full-BPTT gradient g of their mean loss, and for each estimator
its gradient summed over the segments of the same sequences (``atbptt.estimators``), repeated
with R seeds for the random ones. Reported: relative bias ||mean - g|| / ||g|| (for a random
estimator it includes the noise of the mean of R, about sqrt(variance / R), printed as well) and
relative variance mean ||estimate - mean||^2 / ||g||^2 (the estimator's own noise, data fixed).
TBPTT runs in the paper's overlap style at several K; "adaptive" is TBPTT at the K that the
adaptive controller (target bias 0.1) picks for the model on the copy stream.

Part 2 (``--part cost``): seconds per token and peak memory of one pass over B x T tokens as the
hidden size grows, each (model, estimator, size) in a fresh process (peak resident memory above
the process's level before the pass on CPU, ``max_memory_allocated`` on CUDA).

    python scripts/bench_gradients.py --threads 1                  # both parts
    python scripts/bench_gradients.py --part cost --cost-hidden 16,64,256
"""

from __future__ import annotations

import argparse

from atbptt_fairseq.experiments.bench import add_machine_options
from atbptt_fairseq.experiments.gradient_bench import run_gradient_benchmark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("bias", "cost", "both"), default="both")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (part 1)")
    parser.add_argument("--batch", type=int, default=16, help="sequences B")
    parser.add_argument("--length", type=int, default=100, help="steps T per sequence")
    parser.add_argument("--segment", type=int, default=10, help="segment (update) length")
    parser.add_argument("--ks", default="1,5,10,20", help="TBPTT truncation lengths (part 1)")
    parser.add_argument("--repeats", type=int, default=20, help="seeds of a random estimator")
    parser.add_argument("--train-updates", type=int, default=300, help="for the trained model")
    parser.add_argument("--target-bias", type=float, default=0.1, help="adaptive delta")
    parser.add_argument("--cost-hidden", default="16,64,256", help="hidden sizes of part 2")
    parser.add_argument("--seed", type=int, default=1)
    add_machine_options(parser, waits_before="the measurement")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the chosen parts and print (and optionally save) the tables."""
    run_gradient_benchmark(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
