"""Validations that a grid run's train.log lost, recovered from the sweeps' own output.

Until the sweep wrote train.log line by line, killing it (a session's end) lost the last few KB
of the log; the sweep had already printed each validation to its output (``[RUN] valid @ N:
ppl X`` after ``sweep: ... into DIR``), which queue.sh's lanes kept. This lists every validation
printed there that the run's validation.csv lacks, for summarize.py:

    python docs/pays_for_itself/recover_validations.py GRID_DIR LANE_LOG... \
        > docs/pays_for_itself/recovered_validations.csv
"""

import csv
import re
import sys
from pathlib import Path

SWEEP_LINE = re.compile(r"sweep: .* into (\S+)$")
VALID_LINE = re.compile(r"^\s+\[(\S+)\] valid @ (\d+): ppl ([0-9.e+]+)")


def printed_validations(lane_logs: list[Path]) -> dict[tuple[Path, str], dict[int, tuple]]:
    """(configuration directory, run) -> {update: (valid ppl, lane log)} as the sweeps printed."""
    printed: dict[tuple[Path, str], dict[int, tuple]] = {}
    for lane_log in lane_logs:
        into = None
        for line in lane_log.read_text(errors="replace").splitlines():
            sweep = SWEEP_LINE.search(line)
            if sweep is not None:
                into = Path(sweep.group(1))
                continue
            valid = VALID_LINE.match(line)
            if valid is not None and into is not None:
                run, update, ppl = valid.groups()
                printed.setdefault((into, run), {})[int(update)] = (float(ppl), lane_log.name)
    return printed


def main(grid: Path, lane_logs: list[Path]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["corpus", "configuration", "run", "num_updates", "valid_ppl", "printed_in"])
    for (into, run), validations in sorted(printed_validations(lane_logs).items()):
        run_dir = grid / into.parent.name / into.name / "runs" / run
        if not (run_dir / "result.json").is_file():
            continue  # unfinished (or another grid's)
        logged = {
            int(row["num_updates"]) for row in csv.DictReader(open(run_dir / "validation.csv"))
        }
        for update, (ppl, source) in sorted(validations.items()):
            if update not in logged:
                writer.writerow([into.parent.name, into.name, run, update, ppl, source])


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: recover_validations.py GRID_DIR LANE_LOG...")
    main(Path(sys.argv[1]), [Path(argument) for argument in sys.argv[2:]])
