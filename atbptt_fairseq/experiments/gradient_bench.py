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
import math
import multiprocessing
import random
import time
from collections.abc import Sequence
from typing import Any

from atbptt_fairseq.experiments.bench import (
    add_machine_options,
    apply_threads,
    log,
    machine_summary,
    resolve_device,
    resolve_threads,
    synchronize,
    write_json,
)
from atbptt_fairseq.experiments.console import fail, format_table
from atbptt_fairseq.experiments.copy_task import SYMBOLS, make_column

MODELS = ("tanh-rnn", "elstm")


def copy_batch(batch: int, length: int, seed: int):
    """``batch`` copy-task columns of ``length`` steps (m ~ U{5..10}): inputs, targets B x T."""
    import torch

    rng = random.Random(f"bench-gradients-{seed}")
    columns = [make_column(length, 5, 10, rng) for _ in range(batch)]
    index = {symbol: i for i, symbol in enumerate(SYMBOLS)}
    inputs = torch.tensor([[index[s] for s in column[0]] for column in columns])
    targets = torch.tensor([[index[s] for s in column[1]] for column in columns])
    return inputs, targets


def build_model(name: str, hidden: int, seed: int, device: str):
    import torch

    from atbptt.estimators import ElementwiseLstm, TanhRnn

    torch.manual_seed(seed)
    kind = {"tanh-rnn": TanhRnn, "elstm": ElementwiseLstm}[name]
    return kind(len(SYMBOLS), hidden).to(device)


def rtrl_estimator(model_name: str, seed: int):
    """The forward-mode method made for the model: KF-RTRL (tanh RNN), exact RTRL (eLSTM)."""
    from atbptt.estimators import ExactRtrl, KfRtrl

    return KfRtrl(seed=seed) if model_name == "tanh-rnn" else ExactRtrl(seed=seed)


def train(model, updates: int, length: int, batch: int, device: str) -> float:
    """Full BPTT with Adam on fresh copy-task batches; returns held-out mean cross-entropy."""
    import torch

    from atbptt.estimators.base import token_loss_sum

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for update in range(updates):
        inputs, targets = (t.to(device) for t in copy_batch(batch, length, seed=10_000 + update))
        logits, _ = model.run_window(inputs, model.zero_state(batch), 0, length)
        loss = token_loss_sum(logits, targets) / targets.numel()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return held_out_loss(model, device)


def held_out_loss(model, device: str) -> float:
    import torch

    from atbptt.estimators.base import token_loss_sum

    inputs, targets = (t.to(device) for t in copy_batch(64, 200, seed=-1))
    with torch.no_grad():
        logits, _ = model.run_window(inputs, model.zero_state(64), 0, inputs.size(1))
        return float(token_loss_sum(logits, targets)) / targets.numel()


def adaptive_k(model, target_bias: float, device: str) -> int:
    """The K the adaptive controller picks for ``model`` on a copy stream (one estimate)."""
    from atbptt import TbpttConfig, TbpttDriver

    inputs, targets = copy_batch(1, 20_000, seed=-2)
    config = TbpttConfig(
        truncation_length=10, target_bias=target_bias, min_truncation_length=1,
        max_truncation_length=60, estimate_window=60, estimate_burnin=10,
        estimate_sequences=64, estimate_repeats=1, estimate_cumulative="exact",
        estimate_tail_anchor=50,
    )  # fmt: skip
    driver = TbpttDriver(inputs[0], 16, config, targets=targets[0])
    return driver.estimate(model).truncation_length


def bias_rows(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    import torch

    from atbptt.estimators import Artbp, Truncated, Uoro, full_gradient, sequence_gradient

    rows: list[dict[str, Any]] = []
    for model_name in MODELS:
        model = build_model(model_name, args.hidden, args.seed, device)
        for trained in (False, True):
            if trained:
                loss = train(model, args.train_updates, 40, 32, device)
            else:
                loss = held_out_loss(model, device)
            k_adaptive = adaptive_k(model, args.target_bias, device)
            state = "trained" if trained else "untrained"
            log(f"{model_name} {state}: held-out loss {loss:.3f} nats, adaptive K {k_adaptive}")
            inputs, targets = (t.to(device) for t in copy_batch(args.batch, args.length, args.seed))
            normaliser = inputs.numel()
            exact = full_gradient(model, inputs, targets, normaliser)
            contenders = [(f"tbptt K={k}", lambda seed, k=k: Truncated(k), 1) for k in args.ks]
            contenders += [
                (f"adaptive (K={k_adaptive})", lambda seed, k=k_adaptive: Truncated(k), 1),
                (f"artbp (mean {args.segment})", lambda seed: Artbp(seed=seed), args.repeats),
                ("uoro", lambda seed: Uoro(seed=seed), args.repeats),
                (
                    "kf-rtrl" if model_name == "tanh-rnn" else "exact rtrl",
                    lambda seed, name=model_name: rtrl_estimator(name, seed),
                    args.repeats if model_name == "tanh-rnn" else 1,
                ),
            ]
            for label, make, repeats in contenders:
                started = time.perf_counter()
                estimates = torch.stack(
                    [
                        sequence_gradient(
                            make(seed), model, inputs, targets, args.segment, normaliser
                        )
                        for seed in range(repeats)
                    ]
                )
                seconds = time.perf_counter() - started
                mean = estimates.mean(0)
                scale = float(exact.norm())
                variance = float((estimates - mean).pow(2).sum(1).mean()) / scale**2
                rows.append(
                    {
                        "model": model_name,
                        "state": state,
                        "held_out_loss": round(loss, 4),
                        "estimator": label,
                        "repeats": repeats,
                        "relative_bias": float((mean - exact).norm()) / scale,
                        "noise_of_mean": math.sqrt(variance / repeats) if repeats > 1 else 0.0,
                        "relative_variance": variance,
                        "seconds": seconds,
                    }
                )
                log(f"  {label}: bias {rows[-1]['relative_bias']:.3g}, variance {variance:.3g}")
    return rows


def cost_cell(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, estimator, hidden) pass in this (fresh) process: seconds and peak memory."""
    import torch

    from atbptt.estimators import Artbp, Truncated, Uoro, full_gradient, run_segments

    apply_threads(job["threads"])
    device = job["device"]
    model = build_model(job["model"], job["hidden"], 0, device)
    inputs, targets = (t.to(device) for t in copy_batch(job["batch"], job["length"], 0))
    name = job["estimator"]
    makers = {
        "tbptt K=10": lambda: Truncated(10),
        "artbp": lambda: Artbp(seed=0),
        "uoro": lambda: Uoro(seed=0),
        "rtrl": lambda: rtrl_estimator(job["model"], 0),
    }

    def run(rows: int, steps: int) -> None:
        window, expected = inputs[:rows, :steps], targets[:rows, :steps]
        if name == "full bptt":
            full_gradient(model, window, expected, window.numel())
        else:
            for _ in run_segments(makers[name](), model, window, expected, job["segment"]):
                pass
            model.zero_grad(set_to_none=True)

    run(1, job["segment"])  # warm-up on one sequence: lazy imports, torch.func's first calls
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_resident_memory()
    synchronize(device)
    started = time.perf_counter()
    run(inputs.size(0), inputs.size(1))
    synchronize(device)
    seconds = time.perf_counter() - started
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    tokens = inputs.numel()
    return {**job, "seconds_per_token": seconds / tokens, "peak_mib": peak / 2**20}


def reset_peak_resident_memory() -> int:
    """Reset this process's peak resident set (Linux ``clear_refs``); return the current one."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        raise fail("peak memory on CPU needs Linux's /proc/self/clear_refs; use --part bias")


def _status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise fail(f"/proc/self/status has no {key}")


def cost_rows(args: argparse.Namespace, device: str, threads: int) -> list[dict[str, Any]]:
    jobs = [
        {
            "model": model_name,
            "estimator": estimator,
            "hidden": hidden,
            "device": device,
            "threads": threads,
            "batch": args.batch,
            "length": args.length,
            "segment": args.segment,
        }
        for model_name in MODELS
        for hidden in args.cost_hidden
        for estimator in ("full bptt", "tbptt K=10", "artbp", "uoro", "rtrl")
    ]
    context = multiprocessing.get_context("spawn")
    rows = []
    for job in jobs:
        with context.Pool(1) as pool:  # a fresh process: its peak memory is this pass's
            row = pool.apply(cost_cell, (job,))
        if row["estimator"] == "rtrl":
            row["estimator"] = "kf-rtrl" if row["model"] == "tanh-rnn" else "exact rtrl"
        log(
            f"{row['model']} H={row['hidden']} {row['estimator']}: "
            f"{row['seconds_per_token'] * 1e3:.3f} ms/token, {row['peak_mib']:.1f} MiB"
        )
        rows.append(row)
    return rows


def print_bias_table(rows: list[dict[str, Any]]) -> None:
    print(
        format_table(
            ["model", "state", "estimator", "rel. bias", "(noise of mean)", "rel. variance"],
            [
                [
                    r["model"],
                    f"{r['state']} ({r['held_out_loss']:.2f})",
                    r["estimator"],
                    f"{r['relative_bias']:.3g}",
                    f"{r['noise_of_mean']:.2g}" if r["repeats"] > 1 else "-",
                    f"{r['relative_variance']:.3g}" if r["repeats"] > 1 else "0 (det.)",
                ]
                for r in rows
            ],
        )
    )


def print_cost_table(rows: list[dict[str, Any]]) -> None:
    sizes = sorted({r["hidden"] for r in rows})
    header = ["model", "estimator"] + [f"H={h}" for h in sizes]
    table = []
    for model_name in MODELS:
        for estimator in dict.fromkeys(r["estimator"] for r in rows if r["model"] == model_name):
            cells = {
                r["hidden"]: f"{r['seconds_per_token'] * 1e3:.3g} ms, {r['peak_mib']:.3g} MiB"
                for r in rows
                if r["model"] == model_name and r["estimator"] == estimator
            }
            table.append([model_name, estimator] + [cells.get(h, "-") for h in sizes])
    print(format_table(header, table))


def run_gradient_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts ``args.part`` names (the options of scripts/bench_gradients.py; ``--ks``
    and ``--cost-hidden`` parsed in place), print the tables, write the figures to
    ``args.json`` if given, and return them."""
    try:
        args.ks = [int(k) for k in args.ks.split(",")]
        args.cost_hidden = [int(h) for h in args.cost_hidden.split(",")]
    except ValueError:
        raise fail("--ks and --cost-hidden take comma-separated integers") from None
    if min(args.ks + args.cost_hidden) < 1 or args.segment < 2 or args.repeats < 2:
        raise fail("K and hidden sizes must be positive, --segment and --repeats at least 2")
    threads = resolve_threads(args.threads)
    apply_threads(threads)
    device = resolve_device(args.device)
    payload: dict[str, Any] = {"machine": machine_summary(threads, device), "args": vars(args)}
    if args.part in ("bias", "both"):
        payload["bias"] = bias_rows(args, device)
        print(
            f"\n## Bias and variance against full BPTT (H={args.hidden}, B={args.batch}, "
            f"T={args.length}, segments of {args.segment}, {args.repeats} seeds)\n"
        )
        print_bias_table(payload["bias"])
    if args.part in ("cost", "both"):
        payload["cost"] = cost_rows(args, device, threads)
        print(
            f"\n## Cost per token (B={args.batch}, T={args.length}, segments of {args.segment}, "
            f"{threads} thread(s), {device})\n"
        )
        print_cost_table(payload["cost"])
    write_json(args.json, payload)
    return payload


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/bench_gradients.py``."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts and print (and optionally save) the tables."""
    run_gradient_benchmark(build_parser().parse_args(argv))
    return 0
