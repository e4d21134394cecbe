"""The issue-28 grid's tables, from each finished run's records (result.json, validation.csv, the
K decisions of atbptt_metrics.jsonl, eval_test_last.log where test_at_last.sh wrote it).

    python docs/pays_for_itself/summarize.py GRID_DIR [GRID_DIR ...] [--plots DIR]

A GRID_DIR holds CORPUS/CONFIGURATION/runs/RUN. The output (Markdown) goes between the table
markers of this directory's README.md. Two tables: one row per run, then mean ± sample
std over seeds per corpus and configuration. Time to target: processed tokens a run needs to reach
the best validation perplexity of the best fixed K (the fixed K with the lowest mean best
validation perplexity, among the protocol's fixed K: configurations named fixed or fixedN) of the
same seed, as a multiple of what that fixed-K run needed. "Mean of the last 5" is the mean
validation perplexity of the run's last five validations (its last 3M processed tokens): a
figure of where training ended that one lucky or unlucky validation moves less. With
--plots, DIR/CORPUS.png draws K (steps) and validation perplexity against processed tokens.

Runs whose train.log lost lines when their sweep was killed (the sweep's log was block-buffered
then) are mended here, and listed under the tables: their validations after the gap are placed
by the exact processed-token count at the budget's stop, and the validations the log lost come
back from recovered_validations.csv (recover_validations.py: the sweeps printed them). A run
started again from scratch after its first attempt died before any checkpoint wrote its first
updates' records twice (until atbptt.records dropped a dead attempt's): the later are kept.
"""

import csv
import json
import re
import statistics
import sys
from pathlib import Path

from atbptt.records import METRICS_FILE, read_records
from atbptt_fairseq.experiments.fairseq_logs import BUDGET_STOP_LINE, LOADED_LINE

RECOVERED = Path(__file__).with_name("recovered_validations.csv")
LOGGED_UPDATE = re.compile(r'"(?:valid_)?num_updates": "(\d+)"')


def decisions(run: Path) -> list[dict]:
    """The run's K decisions: its metrics records (collect.sh copies them beside result.json; a
    grid keeps them in the save dir), or for a run made before the records existed (code before
    atbptt/records.py) the k_decision JSON that the run logged in train.log."""
    for metrics in (run / METRICS_FILE, run / "checkpoints" / METRICS_FILE):
        if metrics.is_file():
            return read_records(metrics, kind="k_decision")
    lines = (run / "train.log").read_text().splitlines()
    return [json.loads(line.split("k_decision ", 1)[1]) for line in lines if "k_decision {" in line]


def last_of_each(rows: list[dict], key: str) -> list[dict]:
    """The last row of each update, in update order: a run started again from scratch (its
    first attempt killed before any checkpoint) wrote its first updates' records twice, until
    the metrics file learnt to drop a dead attempt's records."""
    return sorted({int(row[key]): row for row in rows}.values(), key=lambda row: int(row[key]))


def last_test_ppl(run: Path) -> float | None:
    log = run / "eval_test_last.log"
    found = re.findall(r"Perplexity: ([\d.]+)", log.read_text()) if log.is_file() else []
    return float(found[-1]) if found else None


def log_gap(log: str) -> int | None:
    """The last update a train.log (its text) holds before a resumed attempt that starts past it
    (the lines in between were lost), or None where the log lost nothing."""
    last = 0
    for attempt in log.split("# sweep attempt ")[1:]:
        loaded = LOADED_LINE.search(attempt)
        if loaded is not None and int(loaded.group(1)) > last:
            return last
        last = max([last, *map(int, LOGGED_UPDATE.findall(attempt))])
    return None


def mend(run: Path, valid: list[dict], trajectory: list[dict], recovered: list[dict]) -> str:
    """Mend the validations and trajectory of a run whose log lost lines (in place); say how.

    The tokens the log lost are the gap between its parsed count at the last validation (the
    budget's stop) and the exact count of the stop line; every record after the gap moves by
    it. A recovered validation sits between its neighbours, evenly (the protocol validates at
    equal processed-token intervals)."""
    log = (run / "train.log").read_text()
    gap = log_gap(log)
    if gap is None:
        return ""
    stops = BUDGET_STOP_LINE.findall(log)
    exact = float(stops[-1][1].replace(",", "")) if stops else None  # None: a run without a budget
    offset = 0.0 if exact is None else exact - float(valid[-1]["processed_tokens"])
    for row in (*valid, *trajectory):
        if int(row["num_updates"]) > gap:
            row["processed_tokens"] = float(row["processed_tokens"]) + offset
    valid.extend(recovered)
    valid.sort(key=lambda row: int(row["num_updates"]))
    lost = {id(row) for row in recovered}
    for index, row in enumerate(valid):
        if id(row) in lost:  # evenly between the row before and the next logged one
            logged = next(i for i in range(index, len(valid)) if id(valid[i]) not in lost)
            before = float(valid[index - 1]["processed_tokens"])
            span = float(valid[logged]["processed_tokens"]) - before
            row["processed_tokens"] = before + span / (logged - index + 1)
    positions = [float(row["processed_tokens"]) for row in valid]
    steps = [later - before for before, later in zip(positions, positions[1:])]
    missing = sum(round(step / statistics.median(steps)) - 1 for step in steps)
    return (
        f"{run.parts[-4]} {run.parts[-3]} {run.name}: the log lost the lines after update "
        f"{gap}; later records moved by {offset / 1e6:+.2f}M processed tokens; "
        f"{len(recovered)} validation(s) recovered, {missing} missing (not printed in a kept "
        "sweep output)"
    )


def read_runs(grids: list[Path]) -> list[dict]:
    recovered = list(csv.DictReader(RECOVERED.open())) if RECOVERED.is_file() else []
    runs = []
    for grid in grids:
        for result in sorted(grid.glob("*/*/runs/*/result.json")):
            run = result.parent
            corpus, variant = run.parts[-4], run.parts[-3]
            record = json.loads(result.read_text())
            valid = list(csv.DictReader((run / "validation.csv").open()))
            trajectory = list(csv.DictReader((run / "trajectory.csv").open()))
            mine = [
                dict(row)
                for row in recovered
                if (row["corpus"], row["configuration"], row["run"]) == (corpus, variant, run.name)
            ]
            mended = mend(run, valid, trajectory, mine)
            once = last_of_each(trajectory, "num_updates")
            if len(once) < len(trajectory):
                twice = len(trajectory) - len(once)
                trajectory = once
                mended = mended or f"{corpus} {variant} {run.name}:"
                mended += (
                    f" records of {twice} updates written twice (the run was started again from"
                    " scratch), the later kept"
                )
            curve = [(float(v["processed_tokens"]), float(v["valid_ppl"])) for v in valid]
            adaptive = record["mode"] == "adaptive"
            baseline = not adaptive and re.fullmatch(r"fixed\d*", variant) is not None
            if adaptive:
                name = f"{variant} delta {record['delta']:g}"
            else:
                name = record["config"] if baseline else f"{variant} ({record['config']})"
            runs.append(
                {
                    "corpus": corpus,
                    "configuration": name,
                    "fixed": baseline,
                    "seed": int(record["seed"]),
                    "curve": curve,
                    "best_valid": min(p for _, p in curve),
                    "last_valid": curve[-1][1],
                    "last_five": statistics.mean(p for _, p in curve[-5:]),
                    "test_best": record["test_ppl"],
                    "test_last": last_test_ppl(run),
                    "ks": [d["truncation_length"] for d in last_of_each(decisions(run), "update")]
                    if adaptive
                    else [],
                    "final_k": record["final_k"],
                    "trajectory": trajectory,
                    "mended": mended,
                }
            )
    return runs


def in_order(name: str) -> str:
    """Sort key of a configuration name: numbers by value (fixed_k20 before fixed_k100)."""
    return re.sub(r"\d+", lambda number: number.group().zfill(6), name)


def best_fixed(runs: list[dict], corpus: str) -> str | None:
    """The fixed K of ``corpus`` with the lowest mean best validation perplexity."""
    fixed = {}
    for run in runs:
        if run["corpus"] == corpus and run["fixed"]:
            fixed.setdefault(run["configuration"], []).append(run["best_valid"])
    return min(fixed, key=lambda name: statistics.mean(fixed[name])) if fixed else None


def time_to_target(runs: list[dict], run: dict, reference: str | None) -> str:
    same_seed = [
        other
        for other in runs
        if other["corpus"] == run["corpus"]
        and other["configuration"] == reference
        and other["seed"] == run["seed"]
    ]
    if not same_seed:
        return "n/a"
    target_curve = same_seed[0]["curve"]
    target = min(p for _, p in target_curve)
    needed = next(t for t, p in target_curve if p <= target)
    if run is same_seed[0]:
        return f"(target {target:.1f} at {needed / 1e6:.2f}M)"
    reached = next((t for t, p in run["curve"] if p <= target), None)
    return "never" if reached is None else f"{reached / needed:.2f}x"


def spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    if len(known) == 1:
        return f"{known[0]:.1f}"
    return f"{statistics.mean(known):.1f} ± {statistics.stdev(known):.1f}"


def main(runs: list[dict]) -> None:
    corpora = sorted({run["corpus"] for run in runs})
    references = {corpus: best_fixed(runs, corpus) for corpus in corpora}
    print(
        "| corpus | configuration | seed | best valid ppl | test ppl (best valid) | last valid ppl "
        "| test ppl (last) | valid ppl, mean of the last 5 | K at the decisions | processed tokens "
        "to the best fixed K's best valid ppl |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in sorted(runs, key=lambda r: (r["corpus"], in_order(r["configuration"]), r["seed"])):
        ks = ", ".join(map(str, run["ks"])) or f"{run['final_k']:g}"
        last = "n/a" if run["test_last"] is None else f"{run['test_last']:.1f}"
        print(
            f"| {run['corpus']} | {run['configuration']} | {run['seed']} | {run['best_valid']:.1f} "
            f"| {run['test_best']:.1f} | {run['last_valid']:.1f} | {last} "
            f"| {run['last_five']:.1f} | {ks} | "
            f"{time_to_target(runs, run, references[run['corpus']])} |"
        )
    print()
    print(
        "| corpus | configuration | seeds | best valid ppl | test ppl (best valid) "
        "| last valid ppl | test ppl (last) | valid ppl, mean of the last 5 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for corpus in corpora:
        names = sorted({r["configuration"] for r in runs if r["corpus"] == corpus}, key=in_order)
        for name in names:
            mine = [r for r in runs if r["corpus"] == corpus and r["configuration"] == name]
            marker = " (best fixed)" if name == references[corpus] else ""
            print(
                f"| {corpus} | {name}{marker} | {len(mine)} | "
                f"{spread([r['best_valid'] for r in mine])} | "
                f"{spread([r['test_best'] for r in mine])} | "
                f"{spread([r['last_valid'] for r in mine])} | "
                f"{spread([r['test_last'] for r in mine])} | "
                f"{spread([r['last_five'] for r in mine])} |"
            )
    mended = [run["mended"] for run in runs if run["mended"]]
    if mended:
        print()
        print("Mended records (what killed sweeps left; see the module's docstring):")
        print()
        for line in mended:
            print(f"- {line}")


def plot(runs: list[dict], out: Path) -> None:
    """K and validation perplexity against processed tokens, every run of a corpus in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for corpus in sorted({run["corpus"] for run in runs}):
        mine = sorted(
            (r for r in runs if r["corpus"] == corpus),
            key=lambda r: (r["configuration"], r["seed"]),
        )
        names = sorted({r["configuration"] for r in mine})
        colours = {name: f"C{index % 10}" for index, name in enumerate(names)}
        figure, (k_axis, ppl_axis) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
        for run in mine:
            label = f"{run['configuration']} s{run['seed']}"
            style = {"color": colours[run["configuration"]], "alpha": 0.8, "label": label}
            # K as logged per update interval, extended to the end of the run (a jump is a step)
            points = [
                (float(row["processed_tokens"]), float(row["trunc_k"])) for row in run["trajectory"]
            ]
            points.append((run["curve"][-1][0], points[-1][1]))
            k_axis.plot(*zip(*points), drawstyle="steps-post", **style)
            ppl_axis.plot(*zip(*run["curve"]), marker=".", **style)
        k_axis.set_ylabel("K")
        k_axis.set_yscale("log")
        k_axis.legend(fontsize=7, ncol=2)
        ppl_axis.set_ylabel("validation perplexity")
        ppl_axis.set_yscale("log")
        best = min(run["best_valid"] for run in mine)  # the end of training, not the early spikes
        ppl_axis.set_ylim(0.95 * best, 3 * best)
        ppl_axis.set_xlabel("processed tokens")
        figure.suptitle(f"{corpus}: K and validation perplexity at equal processed tokens")
        figure.tight_layout()
        figure.savefig(out / f"{corpus}.png", dpi=110)
        plt.close(figure)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    plots = None
    if "--plots" in arguments:
        index = arguments.index("--plots")
        plots = Path(arguments[index + 1])
        del arguments[index : index + 2]
    runs = read_runs([Path(argument) for argument in arguments])
    main(runs)
    if plots is not None:
        plot(runs, plots)
