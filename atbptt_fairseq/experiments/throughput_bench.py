"""Training throughput of the plugin against a plain PyTorch loop and fairseq's own ``lstm_lm``.

Details: docs/scripts.md, section scripts/bench_throughput.py.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atbptt_fairseq.experiments.bench import (
    Throughput,
    add_machine_options,
    dictionary_size,
    finish,
    load_token_stream,
    log,
    make_corpus,
    median,
    plugin_model_args,
    rotate,
    run_fairseq_train,
    set_up_machine,
    synchronize,
    throughput_from_log,
    timed_run_args,
    verdict,
    wait_until_quiet,
    warn_if_disturbed,
)
from atbptt_fairseq.experiments.console import format_table

TARGET_VS_PLAIN = 0.95
TARGET_VS_LSTM_LM = 1.8


@dataclass
class Preset:
    """Model and batch size of one comparison, and its default run length."""

    name: str
    vocab: int  # word types of the corpus (the dictionary adds fairseq's specials)
    hidden: int  # embedding = hidden size (tied)
    batch: int
    length: int  # K
    updates: int  # measured updates per run, after the warm-up
    log_interval: int


PRESETS: dict[str, Preset] = {
    "ptb": Preset("ptb", vocab=10_000, hidden=900, batch=32, length=35, updates=20, log_interval=5),
    "small": Preset(
        "small", vocab=500, hidden=512, batch=32, length=35, updates=80, log_interval=10
    ),
    "quick": Preset(
        "quick", vocab=200, hidden=64, batch=16, length=20, updates=60, log_interval=10
    ),
}

CONTENDERS: dict[str, str] = {
    "a": "(a) plugin, fixed K, disjoint",
    "a_overlap": "(a') plugin, fixed K, overlap",
    "b": "(b) plain PyTorch TBPTT loop",
    "c": "(c) fairseq language_modeling + lstm_lm",
}


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


def common_fairseq_args(
    data_dir: Path, save_dir: Path, preset: Preset, total_updates: int, args: argparse.Namespace
) -> list[str]:
    """Options shared by (a) and (c): SGD, fixed update count, JSON log, no validation/saving."""
    return [
        str(data_dir),
        "--optimizer",
        "sgd",
        "--lr",
        str(args.lr),
        "--batch-size",
        str(preset.batch),
        *timed_run_args(save_dir, total_updates, preset.log_interval, args.seed, args.device),
        "--dropout",
        str(args.dropout),
    ]


def plugin_args(preset: Preset, style: str) -> list[str]:
    """(a): the plugin at fixed K."""
    return [
        *plugin_model_args(preset.hidden),
        "--truncation-length",
        str(preset.length),
        "--tbptt-style",
        style,
    ]


def lstm_lm_args(preset: Preset) -> list[str]:
    """(c): fairseq's built-in task and LSTM language model."""
    return [
        "--task",
        "language_modeling",
        "--arch",
        "lstm_lm",
        "--decoder-embed-dim",
        str(preset.hidden),
        "--decoder-hidden-size",
        str(preset.hidden),
        "--decoder-layers",
        "1",
        "--decoder-out-embed-dim",
        str(preset.hidden),
        "--share-decoder-input-output-embed",
        "--tokens-per-sample",
        str(preset.length),
        "--criterion",
        "cross_entropy",
    ]


def plain_loop(
    stream, vocab: int, preset: Preset, total_updates: int, args: argparse.Namespace
) -> Throughput:
    """(b): the minimal TBPTT loop, timed per group of ``log_interval`` updates."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    hidden, batch, length = preset.hidden, preset.batch, preset.length
    embed = nn.Embedding(vocab, hidden).to(device)
    lstm = nn.LSTM(hidden, hidden, batch_first=True).to(device)
    bias = nn.Parameter(torch.zeros(vocab, device=device))
    dropout = nn.Dropout(args.dropout)
    optimizer = torch.optim.SGD([*embed.parameters(), *lstm.parameters(), bias], lr=args.lr)

    column_length = stream.numel() // batch
    columns = stream[: batch * column_length].view(batch, column_length).to(device)
    inputs, targets = columns[:, :-1], columns[:, 1:]  # B x (L-1)
    steps_per_pass = inputs.size(1) // length
    state = None
    interval_seconds: list[float] = []
    synchronize(args.device)
    started = time.perf_counter()
    for update in range(total_updates):
        step = update % steps_per_pass
        if step == 0:
            state = None
        window = slice(step * length, (step + 1) * length)
        x = dropout(embed(inputs[:, window]))  # B x K x H
        features, state = lstm(x, state)
        logits = F.linear(dropout(features), embed.weight, bias)  # B x K x V
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets[:, window].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state = (state[0].detach(), state[1].detach())
        if (update + 1) % preset.log_interval == 0:
            synchronize(args.device)
            now = time.perf_counter()
            interval_seconds.append(now - started)
            started = now
    measured = interval_seconds[args.warmup_lines :]
    per_interval = preset.log_interval * batch * length
    tokens = per_interval * len(measured)
    seconds = sum(measured)
    rates = [per_interval / s for s in measured]
    return Throughput(tokens, seconds, seconds, rates, preset.log_interval * len(measured))


def run_contender(
    key: str,
    preset: Preset,
    data_dir: Path,
    work: Path,
    stream,
    vocab: int,
    args: argparse.Namespace,
) -> Throughput:
    """One run of one contender, warm-up included; returns its measured throughput."""
    total = preset.log_interval * args.warmup_lines + preset.updates
    if key == "b":
        return plain_loop(stream, vocab, preset, total, args)
    save_dir = work / f"save-{key}"
    base = common_fairseq_args(data_dir, save_dir, preset, total, args)
    if key == "a":
        extra = plugin_args(preset, "disjoint")
    elif key == "a_overlap":
        extra = plugin_args(preset, "overlap")
    else:
        extra = lstm_lm_args(preset)
    run = run_fairseq_train(base + extra, args.threads, CONTENDERS[key])
    return throughput_from_log(run, args.warmup_lines)


# --------------------------------------------------------------------------------------------
# One preset
# --------------------------------------------------------------------------------------------


def bench_preset(preset: Preset, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """All contenders of one preset, alternated over the repeats; prints and returns figures."""
    if args.updates:
        preset.updates = args.updates
    if args.log_interval:
        preset.log_interval = args.log_interval
    preset.updates = max(preset.log_interval, preset.updates - preset.updates % preset.log_interval)
    total_updates = preset.log_interval * args.warmup_lines + preset.updates
    # one fairseq epoch covers the run: no epoch boundary inside the measurement
    train_tokens = int(total_updates * preset.batch * preset.length * 1.2) + 10_000
    data_dir = make_corpus(
        work / f"data-{preset.name}-v{preset.vocab}-n{train_tokens}",
        preset.vocab,
        train_tokens,
        seed=args.seed,
    )
    vocab = dictionary_size(data_dir)
    stream = load_token_stream(data_dir)
    keys = ["a", "b", "c"] if args.no_overlap else ["a", "a_overlap", "b", "c"]
    results: dict[str, list[Throughput]] = {key: [] for key in keys}
    print(
        f"\n== preset {preset.name}: V {vocab} (dictionary), H {preset.hidden}, B {preset.batch}, "
        f"K {preset.length}; {preset.updates} measured updates per run after "
        f"{args.warmup_lines} x {preset.log_interval} warm-up; {args.repeats} repeats; "
        f"{args.threads} threads; {args.device}",
        flush=True,
    )
    for repeat in range(args.repeats):
        for key in rotate(keys, repeat):
            busy = wait_until_quiet(args.quiet_wait)
            log(
                f"{preset.name} repeat {repeat + 1}/{args.repeats}: {CONTENDERS[key]} "
                f"(other work {busy:.0%} of the CPU)"
            )
            result = run_contender(key, preset, data_dir, work, stream, vocab, args)
            result.busy_before = busy
            results[key].append(result)
            log(f"  {result.rate:,.0f} tokens/s ({result.rate_clock:,.0f} by this clock)")

    def ratio_per_repeat(top: str, bottom: str) -> list[float]:
        return [x.rate / y.rate for x, y in zip(results[top], results[bottom], strict=True)]

    def interval_median(key: str) -> float:
        return median([rate for result in results[key] for rate in result.interval_rates])

    rows = []
    for key in keys:
        rates = [result.rate for result in results[key]]
        rows.append(
            [
                CONTENDERS[key],
                f"{median(rates):,.0f}",
                f"{min(rates):,.0f}-{max(rates):,.0f}",
                f"{median([result.rate_clock for result in results[key]]):,.0f}",
                f"{interval_median(key):,.0f}",
            ]
        )
    header = ["contender", "tok/s", "range of runs", "tok/s (clock)", "tok/s (interval median)"]
    print(format_table(header, rows))

    ratios: dict[str, Any] = {}
    checks: list[tuple[str, str, str, float]] = [("a/b", "a", "b", TARGET_VS_PLAIN)]
    checks.append(("a/c", "a", "c", TARGET_VS_LSTM_LM))
    if "a_overlap" in keys:
        checks.append(("a'/a", "a_overlap", "a", float("nan")))
    ratio_rows = []
    for name, top, bottom, target in checks:
        per_repeat = ratio_per_repeat(top, bottom)
        value = median(per_repeat)
        robust = interval_median(top) / interval_median(bottom)
        has_target = not math.isnan(target)
        ratios[name] = {
            "median_of_repeats": value,
            "per_repeat": per_repeat,
            "interval_medians": robust,
            "target": target if has_target else None,
            "met": bool(value >= target) if has_target else None,
        }
        ratio_rows.append(
            [
                name,
                f"{value:.3f}",
                " ".join(f"{r:.2f}" for r in per_repeat),
                f"{robust:.3f}",
                f">= {target}" if has_target else "-",
                verdict(value >= target) if has_target else "-",
            ]
        )
    print()
    print(
        format_table(
            ["ratio", "median", "per repeat", "interval medians", "target", "median vs target"],
            ratio_rows,
        )
    )
    warn_if_disturbed([r.busy_before for runs in results.values() for r in runs])
    return {
        "preset": asdict(preset),
        "dictionary_size": vocab,
        "warmup_updates": preset.log_interval * args.warmup_lines,
        "contenders": {
            key: {
                "label": CONTENDERS[key],
                "tokens_per_s_median": median([r.rate for r in results[key]]),
                "tokens_per_s_interval_median": interval_median(key),
                "runs": [
                    {
                        "tokens_per_s": r.rate,
                        "tokens_per_s_clock": r.rate_clock,
                        "tokens": r.tokens,
                        "seconds": r.seconds_log,
                        "updates": r.updates,
                        "interval_rates": r.interval_rates,
                        "other_cpu_busy_before": r.busy_before,
                    }
                    for r in results[key]
                ],
            }
            for key in keys
        },
        "ratios": ratios,
    }


def run_throughput_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the presets ``args.preset`` names (the options of scripts/bench_throughput.py), print
    the figures, write them to ``args.json`` if given, and return them."""
    payload = set_up_machine(args)
    names = ["small", "ptb"] if args.preset == "all" else [args.preset]
    payload["method"] = (
        "fairseq: train_inner lines after the warm-up, tokens = wpb x updates, "
        "seconds = tokens / wps; plain loop: perf_counter per log interval"
    )
    payload["presets"] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as scratch:
        work = Path(args.workdir) if args.workdir else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            preset = Preset(**asdict(PRESETS[name]))
            payload["presets"][name] = bench_preset(preset, work, args)
    finish(payload, started, args.json)
    return payload


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/bench_throughput.py``."""
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen presets and print (and optionally save) the figures."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup_lines < 1 or args.updates < 0 or args.log_interval < 0:
        parser.error("--repeats and --warmup-lines must be >= 1, --updates and --log-interval >= 0")
    run_throughput_benchmark(args)
    return 0
