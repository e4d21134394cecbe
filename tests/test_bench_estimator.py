"""The estimator benchmark reads a run's K decisions from its metrics records, not its log."""

from atbptt import TruncationDecision
from atbptt.records import MetricsFile, decision_record
from atbptt_fairseq.experiments.bench import LogLine, TrainRun
from atbptt_fairseq.experiments.estimator_bench import run_figures


def test_run_figures_take_the_decisions_from_the_metrics_file(tmp_path):
    metrics = MetricsFile(tmp_path)
    for update, length, seconds in [(3, 4, 0.5), (6, 8, 0.25)]:
        decision = TruncationDecision(length, 0.05, 0.6, seconds, True)
        metrics.write(decision_record(update, decision), {"kind": "update", "update": update})
    lines = [
        LogLine({"num_updates": n, "wpb": 10.0, "wps": 100.0, "trunc_k": 8.0}, float(n))
        for n in (1, 2, 3)
    ]
    # a log line in the old text form must not count: the records are the source
    run = TrainRun(lines, 3.0, ["| adaptive_tbptt_lm | update 9: K = 2 (bias_hat 0.1, 1.00s)"])
    figures = run_figures(run, tmp_path)
    assert figures.decisions == [(3, 4, 0.5), (6, 8, 0.25)]
    assert figures.final_k == 8
