"""Cost of the bias estimator: one estimate against training, and a whole adaptive run's overhead.

Details: docs/scripts.md, section scripts/bench_estimator.py.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atbptt import TruncationController
from atbptt.records import METRICS_FILE, read_records
from atbptt_fairseq.experiments.bench import (
    TrainRun,
    add_machine_options,
    finish,
    last_value,
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
    zipf_tokens,
)
from atbptt_fairseq.experiments.console import format_table
from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmConfig

TARGET_OVERHEAD = 0.05
_TASK_FIELDS = AdaptiveTbpttLmConfig.__dataclass_fields__
DEFAULT_INTERVAL = _TASK_FIELDS["estimate_interval"].default  # the plugin's defaults
DEFAULT_BUDGET = _TASK_FIELDS["estimate_budget"].default
DEFAULT_REPEATS = _TASK_FIELDS["estimate_repeats"].default
DEFAULT_MIN_LENGTH = _TASK_FIELDS["min_truncation_length"].default
DEFAULT_SEQUENCES = _TASK_FIELDS["estimate_sequences"].default


@dataclass
class CostPreset:
    """Sizes of part 1."""

    name: str
    vocab: int
    hidden: int
    sequences: int  # S
    window: int  # W (burn-in W // 10, as the task)
    naive_window: int  # window of the naive-vs-one-pass comparison
    batch: int  # B of the training updates compared with
    length: int  # K of the training updates compared with


COST_PRESETS: dict[str, CostPreset] = {
    "ptb": CostPreset("ptb", 10_000, 900, 32, 400, 30, 32, 35),
    "small": CostPreset("small", 500, 512, 32, 100, 50, 32, 35),
    "quick": CostPreset("quick", 200, 64, 8, 50, 50, 16, 20),
}


@dataclass
class RunPreset:
    """Sizes and length of part 2."""

    name: str
    vocab: int
    hidden: int
    batch: int
    length: int  # K0 of the adaptive run
    updates: int  # measured updates after the warm-up; 0: enough for two decisions
    log_interval: int
    window: int  # --estimate-window
    max_length: int  # --max-truncation-length
    interval: int  # --estimate-interval (0: on the token budget)
    budget: float  # --estimate-budget


RUN_PRESETS: dict[str, RunPreset] = {
    "small": RunPreset(
        "small", 500, 512, 32, 35, 0, 10, 400, 300, DEFAULT_INTERVAL, DEFAULT_BUDGET
    ),
    "ptb": RunPreset("ptb", 10_000, 900, 32, 35, 0, 10, 400, 300, DEFAULT_INTERVAL, DEFAULT_BUDGET),
    "quick": RunPreset("quick", 200, 64, 16, 20, 0, 5, 50, 50, DEFAULT_INTERVAL, DEFAULT_BUDGET),
}


# --------------------------------------------------------------------------------------------
# Part 1: one estimate against training
# --------------------------------------------------------------------------------------------


def build_decoder(vocab: int, hidden: int, device: str):
    """The plugin's decoder with a fairseq Dictionary of ``vocab`` entries (tied, 1 layer)."""
    from fairseq.data import Dictionary

    from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmDecoder, TbpttLstmLmConfig

    dictionary = Dictionary()
    for index in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{index}")
    config = TbpttLstmLmConfig(
        embed_dim=hidden, hidden_size=hidden, num_layers=1, dropout=0.2, tie_embeddings=True
    )
    return TbpttLstmDecoder(config, dictionary).to(device)


def fused_step(decoder):
    """The obvious ``StepFn``: a one-step call of the fused ``nn.LSTM`` and the output layer at
    every step. The plugin instead steps with ``torch.lstm_cell`` and reads out only the final
    state; this is the baseline that shows what that saves."""

    def step(tokens, state):
        x = decoder.dropout(decoder.embed_tokens(tokens.unsqueeze(1)))  # B x 1 x E
        _, next_state = decoder.lstm(x, state)
        return decoder.project(next_state[0][-1]), next_state

    return step


def time_call(function: Callable[[], Any], device: str) -> float:
    """Wall seconds of one call, kernels included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def cost_contenders(preset: CostPreset, naive_window: int, args: argparse.Namespace):
    """The timed closures of part 1 (name -> label, closure) and the estimate function."""
    import torch
    import torch.nn.functional as F

    from atbptt import (
        estimate_bias,
        measure_gradient_profile,
        measure_gradient_profile_naive,
        sample_windows,
    )

    torch.manual_seed(args.seed)
    device = args.device
    decoder = build_decoder(preset.vocab, preset.hidden, device)
    vocab = preset.vocab
    stream = torch.from_numpy(zipf_tokens(vocab - 4, 200_000, args.seed)).long() + 4
    inputs, targets = stream[:-1], stream[1:]
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=1e-3)

    def estimate(
        window: int, step_kind: str = "plugin", naive: bool = False, seed: int | None = None
    ):
        burnin = window // 10
        decoder.eval()
        windows, final_targets = sample_windows(
            inputs,
            targets,
            preset.sequences,
            burnin + window,
            generator if seed is None else torch.Generator().manual_seed(seed),
        )
        windows, final_targets = windows.to(device), final_targets.to(device)
        state = decoder.zero_state(windows.size(0))
        if burnin > 0:
            with torch.no_grad():
                _, extra = decoder(windows[:, :burnin], state=state, output_start=burnin)
            state = extra["state"]
        measure = measure_gradient_profile_naive if naive else measure_gradient_profile
        if step_kind == "plugin":  # exactly what AdaptiveTbpttLmTask._estimate runs
            profile = measure(
                lambda tokens, state: (None, decoder.advance(tokens, state)),
                state,
                windows[:, burnin:],
                final_targets,
                burnin=0,
                batch_dim=1,
                readout=decoder.readout,
            )
        else:
            step = fused_step(decoder)
            profile = measure(step, state, windows[:, burnin:], final_targets, 0, batch_dim=1)
        estimate_bias(profile, "approx")
        decoder.train()
        return profile

    def update_batch(columns: int, length: int):
        windows, _ = sample_windows(inputs, targets, columns, length + 1, generator)
        return windows.to(device)

    def train_update(tokens) -> None:
        logits, _ = decoder(tokens[:, :-1], state=decoder.zero_state(tokens.size(0)))
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def train_updates_bk() -> None:
        count = max(1, round(preset.sequences * preset.window / (preset.batch * preset.length)))
        columns = update_batch(preset.batch, count * preset.length)
        state = decoder.zero_state(preset.batch)
        for index in range(count):
            chunk = columns[:, index * preset.length : (index + 1) * preset.length + 1]
            logits, extra = decoder(chunk[:, :-1], state=state)
            loss = F.cross_entropy(logits.reshape(-1, vocab), chunk[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state = tuple(tensor.detach() for tensor in extra["state"])

    full = preset.window
    sw_tokens = update_batch(preset.sequences, full)
    contenders: dict[str, tuple[str, Callable[[], None]]] = {
        "estimate": (f"one estimate, W {full} (plugin path)", lambda: estimate(full)),
        "estimate_fused": (
            f"one estimate, W {full}, fused nn.LSTM call + readout per step",
            lambda: estimate(full, "fused"),
        ),
        "update_sw": (
            f"one update over S x W = {preset.sequences} x {full}",
            lambda: train_update(sw_tokens),
        ),
        "updates_bk": (
            f"same tokens as updates of B x K = {preset.batch} x {preset.length}",
            train_updates_bk,
        ),
        "naive": (
            f"naive estimate (one backward per lag), W {naive_window}",
            lambda: estimate(naive_window, naive=True),
        ),
    }
    if naive_window != full:
        contenders["estimate_naive_window"] = (
            f"one estimate, W {naive_window} (plugin path)",
            lambda: estimate(naive_window),
        )
    return contenders, estimate


def check_diagnostic_steps(estimate: Callable[..., Any], window: int) -> float:
    """Largest relative difference of the profile phi_k between the plugin's step and the fused
    baseline step on the same windows (they must measure the same thing)."""
    reference = estimate(window, "plugin", seed=12345).norms
    worst = 0.0
    for kind in ("fused",):
        norms = estimate(window, kind, seed=12345).norms
        worst = max(worst, float(((norms - reference).abs() / reference.abs()).max()))
    return worst


def bench_cost(preset: CostPreset, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 for one preset: prints the table and the ratios, returns the figures."""
    naive_window = preset.naive_window if args.naive_window < 0 else args.naive_window
    naive_window = min(naive_window or preset.window, preset.window)
    contenders, estimate = cost_contenders(preset, naive_window, args)
    print(
        f"\n== part 1, preset {preset.name}: V {preset.vocab}, H {preset.hidden}, "
        f"S {preset.sequences}, W {preset.window} (burn-in {preset.window // 10}), training batch "
        f"B {preset.batch} x K {preset.length}; {args.repeats} repeats; {args.threads} threads; "
        f"{args.device}",
        flush=True,
    )
    for key, (_, function) in contenders.items():
        if key != "naive":  # warm-up: allocator, kernels, caches (naive uses the same kernels)
            function()
    difference = check_diagnostic_steps(estimate, min(preset.window, 50))
    seconds: dict[str, list[float]] = {key: [] for key in contenders}
    busy_before: list[float] = []
    for repeat in range(args.repeats):
        busy_before.append(wait_until_quiet(args.quiet_wait))
        for key in rotate(list(contenders), repeat):
            seconds[key].append(time_call(contenders[key][1], args.device))
        log(
            f"{preset.name} repeat {repeat + 1}/{args.repeats} done (other work before it: "
            f"{busy_before[-1]:.0%} of the CPU)"
        )
    med = {key: median(values) for key, values in seconds.items()}
    rows = [
        [
            label,
            f"{med[key]:.3f}",
            " ".join(f"{value:.3f}" for value in seconds[key]),
        ]
        for key, (label, _) in contenders.items()
    ]
    print(format_table(["measurement", "median s", "per repeat s"], rows))

    def per_repeat(top: str, bottom: str) -> float:
        return median([x / y for x, y in zip(seconds[top], seconds[bottom], strict=True)])

    one_pass_key = "estimate_naive_window" if "estimate_naive_window" in seconds else "estimate"
    ratios = {
        "estimate / update over S x W": per_repeat("estimate", "update_sw"),
        "estimate / B x K updates over S x W tokens": per_repeat("estimate", "updates_bk"),
        "fused-step estimate / estimate": per_repeat("estimate_fused", "estimate"),
        f"naive / one-pass estimate at W {naive_window}": per_repeat("naive", one_pass_key),
    }
    updates_in_bk = max(1, round(preset.sequences * preset.window / (preset.batch * preset.length)))
    seconds_per_update = med["updates_bk"] / updates_in_bk
    interval = args.estimate_interval or DEFAULT_INTERVAL
    estimate_tokens = preset.sequences * (preset.window // 10 + preset.window)
    seconds_per_estimate_token = med["estimate"] / estimate_tokens
    seconds_per_training_token = seconds_per_update / (preset.batch * preset.length)
    if interval:
        predicted = args.estimate_repeats * med["estimate"] / (interval * seconds_per_update)
        schedule = (
            f"{args.estimate_repeats} estimates every {interval} disjoint updates of B x K): "
            f"{args.estimate_repeats} x {med['estimate']:.3f} s / ({interval} x "
            f"{seconds_per_update:.4f} s)"
        )
    else:
        predicted = args.estimate_budget * seconds_per_estimate_token / seconds_per_training_token
        schedule = (
            f"budget {args.estimate_budget} of the training tokens): {args.estimate_budget} x "
            f"{seconds_per_estimate_token * 1e6:.1f} us per estimate token (S x (burn-in + W)) / "
            f"{seconds_per_training_token * 1e6:.1f} us per training token (disjoint B x K)"
        )
    print()
    print(
        format_table(
            ["ratio (median of per-repeat ratios)", "value"],
            [[name, f"{value:.2f}"] for name, value in ratios.items()],
        )
    )
    print(
        f"estimate / training seconds per token: "
        f"{seconds_per_estimate_token / seconds_per_training_token:.2f}"
    )
    print(f"predicted overhead of the schedule ({schedule} = {predicted:.1%}")
    print(
        f"diagnostic steps vs the plugin's step: max relative difference of phi_k {difference:.1e}"
    )
    warn_if_disturbed(busy_before, unit="repeat")
    return {
        "preset": asdict(preset),
        "naive_window": naive_window,
        "labels": {key: label for key, (label, _) in contenders.items()},
        "seconds": seconds,
        "median_seconds": med,
        "ratios": ratios,
        "seconds_per_bk_update": seconds_per_update,
        "estimate_to_training_seconds_per_token": (
            seconds_per_estimate_token / seconds_per_training_token
        ),
        "predicted_overhead_default_schedule": predicted,
        "diagnostic_steps_max_relative_difference": difference,
        "other_cpu_busy_before_repeats": busy_before,
    }


# --------------------------------------------------------------------------------------------
# Part 2: a whole adaptive run against a frozen-K run
# --------------------------------------------------------------------------------------------


def run_args(
    preset: RunPreset,
    data_dir: Path,
    save_dir: Path,
    length: int,
    adaptive: bool,
    args: argparse.Namespace,
) -> list[str]:
    """``fairseq-train`` options of an adaptive (K0 = ``length``) or frozen-K run."""
    total = preset.log_interval + preset.updates
    options = [
        str(data_dir),
        *plugin_model_args(preset.hidden),
        "--dropout",
        "0.2",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--batch-size",
        str(preset.batch),
        "--truncation-length",
        str(length),
        "--tbptt-style",
        args.tbptt_style,
        *timed_run_args(save_dir, total, preset.log_interval, args.seed, args.device),
    ]
    if adaptive:
        options += [
            "--target-bias",
            str(args.target_bias),
            "--estimate-window",
            str(preset.window),
            "--max-truncation-length",
            str(preset.max_length),
            "--estimate-interval",
            str(preset.interval),
            "--estimate-budget",
            str(preset.budget),
            "--estimate-repeats",
            str(args.estimate_repeats),
        ]
    return options


def schedule_of(preset: RunPreset, args: argparse.Namespace) -> TruncationController:
    """The plugin's controller for part 2's adaptive run (for its schedule arithmetic)."""
    return TruncationController(
        initial_length=preset.length,
        min_length=DEFAULT_MIN_LENGTH,
        max_length=preset.max_length,
        target_bias=args.target_bias,
        window=preset.window,
        burnin=preset.window // 10,
        num_sequences=DEFAULT_SEQUENCES,
        num_estimates=args.estimate_repeats,
        interval=preset.interval,
        budget=preset.budget,
    )


def window_tokens(preset: RunPreset, length: int, style: str) -> int:
    """Tokens one update runs through the model at K (what the budget counts)."""
    return preset.batch * (2 * length - 1 if style == "overlap" else length)


def updates_between_decisions(
    preset: RunPreset, controller: TruncationController, length: int, style: str
) -> int:
    """Updates from one decision to the next at a constant K."""
    if controller.interval:
        return controller.interval
    return math.ceil(controller.tokens_between_estimates / window_tokens(preset, length, style))


@dataclass
class RunFigures:
    """Figures of one fairseq-train run of part 2 (after the warm-up log line)."""

    seconds: float  # fairseq's clock: sum of tokens / wps
    seconds_clock: float  # this process's clock
    tokens: float
    est_sec: float  # summed est_sec of the measured lines
    est_sec_total: float  # summed est_sec of all lines
    final_k: int  # trunc_k of the last log line
    updates: int  # measured updates
    decisions: list[tuple[int, int, float]]  # (update, K after it, seconds) of every estimate


def run_figures(run: TrainRun, save_dir: Path) -> RunFigures:
    """Wall time, tokens, estimate seconds and K of a run, from its JSON log (and the individual
    decisions from the ``k_decision`` records of its ``atbptt_metrics.jsonl`` in ``save_dir``)."""
    throughput = throughput_from_log(run, 1)
    est = [line.stats.get("est_sec", 0.0) for line in run.lines]
    final_k = last_value(run, "trunc_k")
    decisions = [
        (int(record["update"]), int(record["truncation_length"]), float(record["seconds"]))
        for record in read_records(save_dir / METRICS_FILE, "k_decision")
    ]
    return RunFigures(
        seconds=throughput.seconds_log,
        seconds_clock=throughput.seconds_clock,
        tokens=throughput.tokens,
        est_sec=sum(est[1:]),
        est_sec_total=sum(est),
        final_k=round(final_k) if math.isfinite(final_k) else -1,
        updates=throughput.updates,
        decisions=decisions,
    )


def bench_overhead(preset: RunPreset, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: alternated adaptive and frozen-K runs; prints and returns the figures."""
    if args.initial_k:
        preset.length = args.initial_k
    if args.estimate_interval:
        preset.interval = args.estimate_interval
    preset.budget = args.estimate_budget
    controller = schedule_of(preset, args)
    if args.updates:
        preset.updates = args.updates
    elif preset.updates == 0:
        # two decisions: the first after the budget's tokens at K0, the second at K_min at the
        # latest (the smaller K, the more updates the same tokens take)
        preset.updates = (
            updates_between_decisions(preset, controller, preset.length, args.tbptt_style)
            + updates_between_decisions(preset, controller, DEFAULT_MIN_LENGTH, args.tbptt_style)
            + 2
        )
    total = preset.log_interval + preset.updates
    train_tokens = int(total * preset.batch * preset.length * 1.2) + 20_000
    data_dir = make_corpus(
        work / f"data-{preset.name}-v{preset.vocab}-n{train_tokens}",
        preset.vocab,
        train_tokens,
        seed=args.seed,
    )
    print(
        f"\n== part 2, preset {preset.name}: V {preset.vocab}, H {preset.hidden}, "
        f"B {preset.batch}, K0 {preset.length}, {args.tbptt_style}, --target-bias "
        f"{args.target_bias}, W {preset.window}, K in [{DEFAULT_MIN_LENGTH}, {preset.max_length}], "
        f"{args.estimate_repeats} estimates every "
        + (
            f"{preset.interval} updates"
            if preset.interval
            else f"{controller.tokens_between_estimates:,} training tokens (budget {preset.budget})"
        )
        + f"; {preset.updates} measured updates "
        f"after {preset.log_interval} warm-up; {args.pairs} pairs; {args.threads} threads; "
        f"{args.device}",
        flush=True,
    )
    adaptive: list[RunFigures] = []
    fixed: list[RunFigures] = []
    frozen_k = None
    busy_before: list[float] = []
    for pair in range(args.pairs):
        order = ["adaptive", "fixed"] if pair == 0 else rotate(["adaptive", "fixed"], pair)
        for kind in order:
            is_adaptive = kind == "adaptive"
            length = preset.length if is_adaptive else frozen_k
            busy = wait_until_quiet(args.quiet_wait)
            busy_before.append(busy)
            log(
                f"pair {pair + 1}/{args.pairs}: {kind} run "
                f"({'K0' if is_adaptive else 'K'} {length}; other work {busy:.0%} of the CPU)"
            )
            save_dir = work / f"save-{pair}-{kind}"  # its own metrics file
            options = run_args(preset, data_dir, save_dir, length, is_adaptive, args)
            figures = run_figures(run_fairseq_train(options, args.threads, f"{kind} run"), save_dir)
            (adaptive if is_adaptive else fixed).append(figures)
            if is_adaptive and frozen_k is None:
                frozen_k = figures.final_k
            log(
                f"  {figures.seconds:.1f} s ({figures.seconds_clock:.1f} s by this clock), "
                f"est_sec {figures.est_sec_total:.2f}, final K {figures.final_k}"
            )
    ratios = [a.seconds / f.seconds for a, f in zip(adaptive, fixed, strict=True)]
    per_token = [
        (a.seconds / a.tokens) / (f.seconds / f.tokens)
        for a, f in zip(adaptive, fixed, strict=True)
    ]
    share = [a.est_sec / max(a.seconds - a.est_sec, 1e-9) for a in adaptive]
    # steady state of the schedule at the final K: one decision's estimates against the frozen
    # run's time between two decisions
    interval_at_frozen_k = updates_between_decisions(preset, controller, frozen_k, args.tbptt_style)
    steady = [
        (a.est_sec_total / max(len(a.decisions), 1))
        / (interval_at_frozen_k * f.seconds / f.updates)
        for a, f in zip(adaptive, fixed, strict=True)
    ]
    overhead = median(ratios) - 1.0
    rows = []
    for index, (a, f) in enumerate(zip(adaptive, fixed, strict=True)):
        rows.append(
            [
                f"pair {index + 1}",
                f"{a.seconds:.1f}",
                f"{f.seconds:.1f}",
                f"{a.est_sec:.2f}",
                f"{a.final_k}",
                f"{ratios[index] - 1:+.1%}",
                f"{per_token[index] - 1:+.1%}",
                f"{share[index]:.1%}",
                f"{steady[index]:.1%}",
            ]
        )
    header = [
        "",
        "adaptive s",
        f"frozen K={frozen_k} s",
        "est_sec",
        "final K",
        "overhead",
        "per token",
        "est share",
        "steady state",
    ]
    print(format_table(header, rows))
    k_path = ", ".join(
        f"update {update}: K {k} ({seconds:.2f} s)" for update, k, seconds in adaptive[0].decisions
    )
    print(f"decisions of the first adaptive run (K0 {preset.length}): {k_path or 'none'}")
    if any(a.final_k != frozen_k for a in adaptive):
        print("note: the adaptive runs did not all end at the same K")
    token_ratio = median([a.tokens / f.tokens for a, f in zip(adaptive, fixed, strict=True)])
    print(
        f"overhead of adaptation over the same updates (median adaptive / frozen - 1): "
        f"{overhead:+.1%}, with the adaptive run reading {token_ratio:.2f}x the frozen run's "
        f"tokens; target <= {TARGET_OVERHEAD:.0%}: {verdict(overhead <= TARGET_OVERHEAD)}"
    )
    print(
        f"per-token overhead {median(per_token) - 1:+.1%}; estimate share est_sec / (adaptive "
        f"time - est_sec) {median(share):.1%}; summed est_sec per adaptive run "
        f"{median([a.est_sec_total for a in adaptive]):.2f} s"
    )
    print(
        f"steady-state overhead at K {frozen_k} (est_sec per decision / {interval_at_frozen_k} "
        f"frozen-K updates): {median(steady):.1%}; target <= {TARGET_OVERHEAD:.0%}: "
        f"{verdict(median(steady) <= TARGET_OVERHEAD)}"
    )
    warn_if_disturbed(busy_before)
    return {
        "preset": asdict(preset),
        "target_bias": args.target_bias,
        "tbptt_style": args.tbptt_style,
        "frozen_k": frozen_k,
        "adaptive_runs": [asdict(a) for a in adaptive],
        "fixed_runs": [asdict(f) for f in fixed],
        "overhead": overhead,
        "overhead_per_pair": [r - 1 for r in ratios],
        "overhead_per_token": median(per_token) - 1,
        "estimate_share": median(share),
        "steady_state_overhead": median(steady),
        "updates_between_decisions_at_frozen_k": interval_at_frozen_k,
        "target": TARGET_OVERHEAD,
        "met": overhead <= TARGET_OVERHEAD,
        "steady_state_met": median(steady) <= TARGET_OVERHEAD,
        "other_cpu_busy_before_runs": busy_before,
    }


def run_estimator_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts ``args.part`` names (the options of scripts/bench_estimator.py), print the
    figures, write them to ``args.json`` if given, and return them."""
    payload = set_up_machine(args)
    started = time.perf_counter()
    if args.part in ("both", "cost"):
        names = ["small", "ptb"] if args.preset == "all" else [args.preset]  # part 1
        payload["cost"] = {
            name: bench_cost(CostPreset(**asdict(COST_PRESETS[name])), args) for name in names
        }
    if args.part in ("both", "overhead"):
        with tempfile.TemporaryDirectory(prefix="bench-estimator-") as scratch:
            work = Path(args.workdir) if args.workdir else Path(scratch)
            work.mkdir(parents=True, exist_ok=True)
            preset = RunPreset(**asdict(RUN_PRESETS[args.run_preset]))
            payload["overhead"] = bench_overhead(preset, work, args)
    finish(payload, started, args.json)
    return payload


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``scripts/bench_estimator.py``."""
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts and print (and optionally save) the figures."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.pairs < 1 or args.updates < 0 or args.estimate_repeats < 1:
        parser.error("--repeats, --pairs and --estimate-repeats must be >= 1, --updates >= 0")
    if args.estimate_interval < 0 or not 0.0 < args.estimate_budget <= 1.0:
        parser.error("--estimate-interval must be >= 0 and --estimate-budget in (0, 1]")
    run_estimator_benchmark(args)
    return 0
