"""Sweep and plot scripts: log parsing, CSV writers, figures, and a two-run sweep end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from atbptt import TbpttConfig
from atbptt_fairseq.experiments import (
    console,
    demo,
    fairseq_logs,
    launch,
    launchers,
    plots,
    presets,
    results,
    run_records,
    runs,
    sweep,
)

REPO = Path(__file__).resolve().parents[1]


# Two attempts of one run: the first logs up to update 30, is interrupted, and the second
# resumes from the checkpoint at update 20 (fairseq's wall meter then reads 0).
CANNED_LOG = """\
# sweep attempt 2024-01-01T00:00:00: fairseq-train data ...
2024-01-01 00:00:01 | INFO | fairseq.trainer | No existing checkpoint found checkpoints/checkpoint_last.pt
2024-01-01 00:00:05 | INFO | train_inner | {"epoch": 1, "loss": "3.0", "trunc_k": "10", "est_sec": "0", "ppl": "8", "wpb": "40", "num_updates": "10", "wall": "5"}
2024-01-01 00:00:06 | INFO | atbptt_fairseq.tasks.adaptive_tbptt_lm | update 10: K = 4 (bias_hat 0.08, beta_hat 0.6, 1.00s)
2024-01-01 00:00:10 | INFO | train_inner | {"epoch": 1, "loss": "2.0", "trunc_k": "5.2", "est_sec": "1", "bias_hat": "0.08", "beta_hat": "0.6", "ppl": "4", "wpb": "20.8", "num_updates": "20", "wall": "10"}
2024-01-01 00:00:13 | INFO | valid | {"epoch": 1, "valid_loss": "2.0", "valid_ppl": "4", "valid_num_updates": "20"}
2024-01-01 00:00:19 | INFO | atbptt_fairseq.tasks.adaptive_tbptt_lm | update 20: K = 5 (bias_hat 0.09, beta_hat 0.6, 1.00s)
2024-01-01 00:00:20 | INFO | train_inner | {"epoch": 1, "loss": "9.9", "trunc_k": "5", "est_sec": "1", "ppl": "955", "wpb": "99", "num_updates": "30", "wall": "20"}
# sweep attempt 2024-01-01T01:00:00: fairseq-train data ...
2024-01-01 01:00:02 | INFO | fairseq.trainer | Loaded checkpoint checkpoints/checkpoint_last.pt (epoch 1 @ 20 updates)
2024-01-01 01:00:03 | INFO | atbptt_fairseq.tasks.adaptive_tbptt_lm | update 20: K = 4 (bias_hat 0.07, beta_hat 0.5, 1.00s)
2024-01-01 01:00:07 | INFO | train_inner | {"epoch": 1, "loss": "1.5", "trunc_k": "4", "est_sec": "1", "bias_hat": "0.07", "beta_hat": "0.5", "ppl": "2.83", "wpb": "16", "num_updates": "30", "wall": "0"}
[2024-01-01 01:00:09,123][valid][INFO] - {"epoch": 1, "valid_loss": "1.0", "valid_ppl": "2", "valid_num_updates": "30"}
2024-01-01 01:00:09 | INFO | train | {"epoch": 1, "train_loss": "2", "train_wpb": "25.6", "train_num_updates": "30", "train_wall": "0"}
2024-01-01 01:00:10 | INFO | fairseq_cli.train | done training in 8.0 seconds
"""  # noqa: E501


def test_parse_log_stitches_a_resumed_run():
    parsed = fairseq_logs.parse_log(CANNED_LOG)
    assert [row["num_updates"] for row in parsed.train] == [10, 20, 30]
    last = parsed.train[-1]  # the resumed attempt's record replaces the interrupted one
    assert last["loss"] == 1.5 and last["trunc_k"] == 4 and last["bias_hat"] == 0.07
    assert [row["tokens"] for row in parsed.train] == [400, 608, 768]
    assert [row["est_sec"] for row in parsed.train] == [0, 1, 2]
    assert math.isnan(parsed.train[0]["bias_hat"])
    # wall: fairseq's, then the checkpoint's wall (13 s, its validation) plus log time since
    assert [row["wall"] for row in parsed.train] == [5, 10, 18]
    assert [(v["num_updates"], v["wall"], v["tokens"]) for v in parsed.valid] == [
        (20, 13, 608),
        (30, 20, 768),
    ]
    assert parsed.valid[-1]["valid_ppl"] == pytest.approx(2.0)
    assert [(e["num_updates"], e["trunc_k"]) for e in parsed.estimates] == [(10, 4), (20, 4)]
    assert (parsed.tokens, parsed.est_sec, parsed.wall_sec, parsed.updates) == (768, 2, 20, 30)


def test_parse_eval_uses_the_precise_loss():
    text = "INFO:fairseq_cli.eval_lm:Loss (base 2): 0.0500, Perplexity: 1.04\n"
    loss, ppl = fairseq_logs.parse_eval(text)
    assert loss == 0.05 and ppl == pytest.approx(2**0.05)
    with pytest.raises(ValueError):
        fairseq_logs.parse_eval("no result here")


def test_training_finished_looks_at_the_last_attempt(tmp_path):
    log = tmp_path / "train.log"
    assert not fairseq_logs.training_finished(log)
    log.write_text(CANNED_LOG)
    assert fairseq_logs.training_finished(log)
    log.write_text(CANNED_LOG + "# sweep attempt 2024-01-02T00:00:00: fairseq-train ...\n")
    assert not fairseq_logs.training_finished(log)


def fake_result(spec: runs.RunSpec, valid_ppl: float, final_k: float) -> dict:
    parsed = fairseq_logs.parse_log(CANNED_LOG)
    valid, test = (math.log2(valid_ppl), valid_ppl), (math.log2(valid_ppl + 0.1), valid_ppl + 0.1)
    result = results.summarize_run(spec, parsed, valid, test)
    result["final_k"] = final_k
    return result


def test_trajectory_and_results_writers(tmp_path):
    parsed = fairseq_logs.parse_log(CANNED_LOG)
    results.write_trajectories(tmp_path, parsed)
    rows = results.read_csv(tmp_path / "trajectory.csv")
    assert list(rows[0]) == list(results.TRAJECTORY_COLUMNS)
    assert [r["tokens"] for r in rows] == [400, 608, 768] and math.isnan(rows[0]["bias_hat"])
    valid = results.read_csv(tmp_path / "validation.csv")
    assert [(r["num_updates"], r["valid_ppl"]) for r in valid] == [(20, 4), (30, 2)]

    out = tmp_path / "sweep"
    specs = runs.plan_runs([10, 5], [0.1, 0.5], [1])
    assert [s.name for s in specs] == ["fixed_k5_s1", "fixed_k10_s1", "delta0.5_s1", "delta0.1_s1"]
    for spec in reversed(specs):
        (out / "runs" / spec.name).mkdir(parents=True)
        console.write_json(out / "runs" / spec.name / "result.json", fake_result(spec, 3.0, 4))
    table = results.read_csv(results.write_results(out))
    assert [r["run"] for r in table] == [s.name for s in specs]
    assert list(table[0]) == list(results.RESULT_COLUMNS)
    fixed, adaptive = table[0], table[-1]
    assert (fixed["mode"], fixed["k"], math.isnan(fixed["delta"])) == ("fixed", 5, True)
    assert (adaptive["mode"], adaptive["delta"], math.isnan(adaptive["k"])) == (
        "adaptive",
        0.1,
        True,
    )
    assert (adaptive["tokens"], adaptive["updates"], adaptive["est_sec"]) == (768, 30, 2)
    assert adaptive["test_ppl"] == pytest.approx(3.1)


def test_presets_take_their_grids_from_the_configs():
    assert presets.get_preset("copy").fixed_grid == "5,10,15,20,30"
    assert presets.get_preset("ptb").fixed_grid == "10,50,100,200,300"
    assert presets.get_preset("wiki2").delta_grid == "0.9,0.5,0.1"


def test_train_command_applies_the_copy_preset(tmp_path):
    data = tmp_path / "data"
    (data / "targets").mkdir(parents=True)
    (data / "targets" / "dict.txt").write_text("")
    settings = runs.SweepSettings(
        data=data,
        out=tmp_path,
        budget_updates=100,
        valid_interval=20,
        log_interval=5,
        preset=presets.get_preset("copy"),
        extra_args=["--estimate-interval", "25"],
    )
    fixed = runs.train_command(runs.RunSpec("fixed", 9, 2), settings, tmp_path / "run")
    adaptive = runs.train_command(runs.RunSpec("adaptive", 0.1, 2), settings, tmp_path / "run")
    assert runs.option_value(fixed, "--truncation-length") == "9" and "--monitor-bias" in fixed
    assert runs.option_value(adaptive, "--truncation-length") == "15"  # K0 of the config
    assert runs.option_value(adaptive, "--target-bias") == "0.1"
    for cmd in (fixed, adaptive):
        assert runs.option_value(cmd, "--arch") == "tbptt_lstm_copy"
        assert runs.option_value(cmd, "--target-dir") == "targets"
        assert runs.option_value(cmd, "--estimate-interval") == "25"
        assert cmd.count("--lr") == 1 and cmd.count("--arch") == 1
        # the paper's lr 1.0 * sqrt(K), for fixed K and as K adapts
        assert runs.option_value(cmd, "--lr") == "1.0"
        assert runs.option_value(cmd, "--lr-scaling") == "sqrt"
        assert runs.option_value(cmd, "--lr-scaling-reference") == "1"
    evaluation = runs.eval_command(fixed, tmp_path / "best.pt", "test")
    assert runs.option_value(evaluation, "--target-dir") == "targets"
    with pytest.raises(SystemExit):
        runs.check_extra_args(["--seed", "3"])
    assert runs.default_log_interval(20, 100) == 4 and runs.default_log_interval(30, 100) == 5


def test_a_recorded_command_gives_each_option_once_with_the_value_that_wins(tmp_path):
    args = ["data", "--optimizer", "tbptt_sgd", "--lr", "1.0", "--monitor-bias", "--lr=0.01",
            "--optimizer", "adam", "--estimate-burnin", "-1", "--monitor-bias"]  # fmt: skip
    assert runs.once_each(args) == [
        "data", "--lr=0.01", "--optimizer", "adam", "--estimate-burnin", "-1", "--monitor-bias"
    ]  # fmt: skip
    # the demo's settings: Adam and K = 10 over the copy preset's SGD and K0 = 15
    settings = runs.SweepSettings(
        data=tmp_path, out=tmp_path, budget_updates=100, valid_interval=20, log_interval=5,
        preset=presets.get_preset("copy"),
        extra_args=["--optimizer", "adam", "--lr", "0.01", "--truncation-length", "10"],
    )  # fmt: skip
    for spec in (runs.RunSpec("adaptive", 0.1, 1), runs.RunSpec("fixed", 10, 1)):
        command = runs.train_command(spec, settings, tmp_path / "run")
        options = [arg.split("=")[0] for arg in command if arg.startswith("--")]
        assert len(options) == len(set(options)), command
        assert runs.option_value(command, "--optimizer") == "adam"
        assert runs.option_value(command, "--truncation-length") == "10"


def test_a_token_budget_becomes_max_train_tokens(tmp_path):
    (tmp_path / "dict.txt").write_text("a 1\n")
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--fixed", "5"]
    settings = sweep.settings_from_args(
        sweep.build_parser().parse_args(
            [*base, "--budget-tokens", "5e3", "--valid-interval", "30"]
        ),
        [],
    )
    assert settings.budget_label == "5000 tokens" and settings.log_interval == 6
    cmd = runs.train_command(runs.RunSpec("fixed", 5, 1), settings, tmp_path / "run")
    assert runs.option_value(cmd, "--max-train-tokens") == "5000" and "--max-update" not in cmd
    with pytest.raises(SystemExit, match="needs --valid-interval"):
        sweep.settings_from_args(
            sweep.build_parser().parse_args([*base, "--budget-tokens", "5000"]), []
        )
    with pytest.raises(SystemExit):  # one budget or the other
        sweep.build_parser().parse_args(
            [*base, "--budget-tokens", "5000", "--budget-updates", "10"]
        )
    with pytest.raises(SystemExit):
        runs.check_extra_args(["--max-train-tokens", "3"])


def test_a_processed_token_budget_becomes_max_processed_tokens(tmp_path):
    (tmp_path / "dict.txt").write_text("a 1\n")
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--fixed", "5"]
    settings = sweep.settings_from_args(
        sweep.build_parser().parse_args([*base, "--budget-processed-tokens", "2e4"]),
        [],
    )
    assert settings.budget_label == "20000 processed tokens" and settings.updates_of == ""
    cmd = runs.train_command(runs.RunSpec("adaptive", 0.1, 1), settings, tmp_path / "run")
    assert runs.option_value(cmd, "--max-processed-tokens") == "20000"
    # validations at equal compute: every budget / 20 processed tokens, not every N updates
    assert runs.option_value(cmd, "--validate-interval-processed-tokens") == "1000"
    assert "--validate-interval-updates" not in cmd and "--save-interval-updates" not in cmd
    assert "--max-update" not in cmd and "--max-train-tokens" not in cmd
    custom = sweep.settings_from_args(
        sweep.build_parser().parse_args(
            [*base, "--budget-processed-tokens", "2e4", "--valid-tokens", "4e3"]
        ),
        [],
    )
    assert custom.valid_processed_tokens == 4000
    with pytest.raises(SystemExit, match="goes with --budget-processed-tokens"):
        sweep.settings_from_args(
            sweep.build_parser().parse_args(
                [*base, "--budget-updates", "5", "--valid-tokens", "9"]
            ),
            [],
        )
    with pytest.raises(SystemExit):  # one budget only
        sweep.build_parser().parse_args(
            [*base, "--budget-processed-tokens", "5000", "--budget-tokens", "10"]
        )
    with pytest.raises(SystemExit):
        runs.check_extra_args(["--max-processed-tokens", "3"])


METHODS, ARCHS = ["tbptt", "artbp", "uoro"], ["tanh_rnn_copy", "tbptt_lstm_copy"]


def test_estimator_specs_are_parsed_or_refused_in_one_line():
    def parse(text: str) -> list:
        return runs.parse_estimators(text, METHODS, ARCHS, "tbptt_lstm_copy")

    assert parse("none") == [] and parse("") == []
    assert parse("uoro, artbp@tanh_rnn_copy,tbptt@tanh_rnn_copy") == [
        runs.EstimatorSpec("uoro"),
        runs.EstimatorSpec("artbp", "tanh_rnn_copy"),
        runs.EstimatorSpec("tbptt", "tanh_rnn_copy"),
    ]
    assert parse("uoro@tbptt_lstm_copy") == [runs.EstimatorSpec("uoro")]  # the sweep's model
    refusals = {
        "uoro,,artbp": "holds an empty spec",
        "uoro,": "holds an empty spec",
        "kalman": "unknown gradient estimator 'kalman' in --estimators spec 'kalman'; choose "
        "from tbptt, artbp, uoro",
        "@tanh_rnn_copy": "unknown gradient estimator ''",
        "uoro@": "has '@' but no architecture",
        "uoro@lstm_big": "unknown architecture 'lstm_big'",
        "tbptt": "fixed-K TBPTT on the sweep's model (tbptt_lstm_copy), which --fixed runs",
        "tbptt@tbptt_lstm_copy": "which --fixed runs",
        "uoro,uoro@tbptt_lstm_copy": "specs 'uoro' and 'uoro@tbptt_lstm_copy' train the same",
        "artbp@tanh_rnn_copy,artbp@tanh_rnn_copy": "train the same runs",
    }
    for text, words in refusals.items():
        with pytest.raises(SystemExit) as refused:
            parse(text)
        message = str(refused.value)
        assert message.startswith("error: ") and "\n" not in message and words in message, text


def test_estimator_runs_train_the_fixed_config_at_k0(tmp_path):
    data = tmp_path / "data"
    (data / "targets").mkdir(parents=True)
    (data / "targets" / "dict.txt").write_text("")
    settings = runs.SweepSettings(
        data=data, out=tmp_path, budget_updates=0, valid_interval=0, log_interval=20,
        budget_processed_tokens=20000, valid_processed_tokens=1000,
        preset=presets.get_preset("copy"), extra_args=["--lr", "0.5"],
    )  # fmt: skip
    # K0: the truncation length the adaptive config starts at, read from it
    config = yaml.safe_load((presets.CONFIG_DIR / "copy_adaptive.yaml").read_text())
    k0 = runs.initial_truncation_length(settings)
    assert k0 == config["task"]["truncation_length"]
    estimators = [runs.EstimatorSpec("uoro"), runs.EstimatorSpec("kf-rtrl", "x_y")]
    specs = runs.plan_runs([10], [0.1], [1, 2], estimators, k0)
    assert [s.name for s in specs] == [
        "fixed_k10_s1", "fixed_k10_s2", "delta0.1_s1", "delta0.1_s2",
        f"uoro_k{k0}_s1", f"uoro_k{k0}_s2", f"kf-rtrl_on_x_y_k{k0}_s1", f"kf-rtrl_on_x_y_k{k0}_s2",
    ]  # fmt: skip
    fixed = runs.train_command(specs[0], settings, tmp_path / "run")
    uoro = runs.train_command(specs[4], settings, tmp_path / "run")
    other = runs.train_command(specs[6], settings, tmp_path / "run")
    assert runs.option_value(uoro, "--gradient-estimator") == "uoro"
    assert runs.option_value(other, "--gradient-estimator") == "kf-rtrl"
    assert runs.option_value(uoro, "--arch") == "tbptt_lstm_copy"
    assert runs.option_value(other, "--arch") == "x_y" and other.count("--arch") == 1
    for cmd in (uoro, other):
        assert runs.option_value(cmd, "--truncation-length") == str(k0)
        assert cmd.count("--truncation-length") == 1
        assert "--monitor-bias" not in cmd and "--target-bias" not in cmd
        # the fixed-K config, the pass-through options, the budget and validations of the others
        for option in ("--lr", "--lr-scaling", "--max-processed-tokens", "--target-dir",
                       "--validate-interval-processed-tokens", "--estimate-window"):  # fmt: skip
            assert runs.option_value(cmd, option) == runs.option_value(fixed, option), option
    assert "--gradient-estimator" not in fixed
    # a spec on the sweep's model whose model changed is caught like any other change
    moved = {"command": uoro, "code": None}
    settings.extra_args = ["--arch", "tbptt_lstm_lm_tiny"]
    changed = {"command": runs.train_command(specs[4], settings, tmp_path / "run"), "code": {}}
    assert "--arch tbptt_lstm_copy -> tbptt_lstm_lm_tiny" in run_records.record_differences(
        moved, changed
    )
    with pytest.raises(SystemExit, match="--estimators"):
        runs.check_extra_args(["--gradient-estimator", "uoro"])
    # without a preset: the K0 given after --, else the task's default
    settings.preset, settings.extra_args = None, ["--truncation-length", "8"]
    assert runs.initial_truncation_length(settings) == 8
    settings.extra_args = []
    assert runs.initial_truncation_length(settings) == TbpttConfig().truncation_length
    (tmp_path / "data" / "dict.txt").write_text("a 1\n")
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--fixed", "5",
            "--budget-updates", "10"]  # fmt: skip
    with pytest.raises(SystemExit, match="--estimator-length goes with --estimators"):
        sweep.main([*argv, "--estimator-length", "5"])


def test_processed_tokens_cumulate_from_the_ppb_log_key():
    lines = [
        '{"epoch": 1, "num_updates": "2", "wpb": "10", "ppb": "30", "wall": "1", "loss": "2"}',
        '{"epoch": 1, "num_updates": "4", "wpb": "10", "ppb": "50", "wall": "2", "loss": "2"}',
    ]
    text = "\n".join(
        f"[2026-12-01 07:00:0{i}] | INFO | train_inner | {line}" for i, line in enumerate(lines)
    )
    parsed = fairseq_logs.parse_log(text)
    assert [row["processed_tokens"] for row in parsed.train] == [60, 160]
    assert [row["tokens"] for row in parsed.train] == [20, 40]
    assert parsed.processed_tokens == 160
    # where the budget stopped the run, the task's exact count (K may change after the last log)
    stop = "[2026-12-01 07:00:09] | INFO | atbptt_fairseq | Stopping training due to processed "
    stop += "tokens: 1,234 >= max_processed_tokens: 1,200"
    assert fairseq_logs.parse_log(text + "\n" + stop).processed_tokens == 1234


def test_decisions_and_token_counts_are_read_from_the_metrics_records(tmp_path):
    """A run's atbptt_metrics.jsonl, not its log text, gives the decisions on K and the exact
    token counts (the log text below says otherwise and is not read for them)."""
    from atbptt.records import METRICS_FILE, append_records

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    line = '{"epoch": 1, "num_updates": "2", "wpb": "10", "ppb": "30", "wall": "1", "loss": "2"}'
    (run_dir / "train.log").write_text(
        f"[2026-12-01 07:00:00] | INFO | train_inner | {line}\n"
        "[2026-12-01 07:00:00] | INFO | x | update 1: K = 7 (bias_hat 0.5, beta_hat 0.9, 1.00s)\n"
    )
    decision = {"kind": "k_decision", "update": 1, "truncation_length": 12,
                "relative_bias": 0.04, "decay_rate": 0.8, "seconds": 0.5, "changed": True,
                "fallback": "", "raw_choice": 12, "reason": "mean of 1 smallest K"}  # fmt: skip
    updates = [{"kind": "update", "update": u, "trunc_k": 12, "processed_tokens": 31 * (u + 1),
                "scored_tokens": 9 * (u + 1)} for u in range(2)]  # fmt: skip
    append_records(run_dir / "checkpoints" / METRICS_FILE, [updates[0], decision, updates[1]])
    parsed = fairseq_logs.parse_run(run_dir)
    assert [(e["num_updates"], e["trunc_k"]) for e in parsed.estimates] == [(1, 12)]
    assert parsed.train[0]["bias_hat"] == 0.04
    assert parsed.tokens == 18 and parsed.processed_tokens == 62


def test_decisions_are_read_from_the_k_decision_lines_of_old_logs():
    record = {"update": 40, "truncation_length": 100, "relative_bias": float("inf"),
              "decay_rate": 0.99, "seconds": 1.5, "changed": True,
              "fallback": "5 of 5 estimates: gradient norms do not decay; K_max 100 stood in"}  # fmt: skip
    log = "\n".join([
        "2026-12-01 07:00:00 | INFO | atbptt_fairseq.tasks.adaptive_tbptt_lm | update 40: K = 100 "
        "(bias_hat inf, beta_hat 0.99, 1.50s)",
        "2026-12-01 07:00:00 | INFO | atbptt_fairseq.tasks.adaptive_tbptt_lm | k_decision "
        + json.dumps(record),
    ])  # fmt: skip
    (estimate,) = fairseq_logs.parse_log(log).estimates
    assert estimate["num_updates"] == 40 and estimate["trunc_k"] == 100
    assert math.isinf(estimate["bias_hat"]) and "do not decay" in estimate["fallback"]


def synthetic_sweep(root: Path) -> None:
    """Finished runs of 2 fixed K and 2 deltas over 2 seeds, with trajectories."""
    for spec in runs.plan_runs([5, 10], [0.5, 0.1], [1, 2]):
        run_dir = root / "runs" / spec.name
        run_dir.mkdir(parents=True)
        k = spec.value if spec.mode == "fixed" else 20
        offset = 0.01 * spec.seed + (0.5 if spec.value == 5 else 0.0)
        train = [
            {
                "num_updates": u,
                "wall": u / 10,
                "tokens": 64 * k * u,
                "processed_tokens": 64 * (2 * k - 1) * u,
                "est_sec": u / 100,
                "trunc_k": k if spec.mode == "fixed" else 15 + u / 100,
                "bias_hat": 0.001 * (1 + u / 100) if spec.mode == "fixed" else spec.value * 0.9,
                "beta_hat": 0.6,
                "loss": 2 - u / 1000,
                "ppl": 4.0,
            }
            for u in range(10, 510, 10)
        ]
        valid = [
            {"num_updates": u, "wall": u / 10, "tokens": 64 * k * u,
             "processed_tokens": 64 * (2 * k - 1) * u, "est_sec": u / 100,
             "valid_loss": math.log2(1.1 + 100 / u + offset), "valid_ppl": 1.1 + 100 / u + offset}
            for u in range(100, 600, 100)
        ]  # fmt: skip
        results.write_csv(run_dir / "trajectory.csv", results.TRAJECTORY_COLUMNS, train)
        results.write_csv(run_dir / "validation.csv", results.VALIDATION_COLUMNS, valid)
        result = fake_result(spec, valid[-1]["valid_ppl"], train[-1]["trunc_k"])
        result["tokens"] = train[-1]["tokens"]
        result["processed_tokens"] = train[-1]["processed_tokens"]
        console.write_json(run_dir / "result.json", result)


def test_plot_compares_a_labelled_second_sweep(tmp_path):
    synthetic_sweep(tmp_path / "sweep")
    synthetic_sweep(tmp_path / "other")
    out = tmp_path / "figures"
    assert plots.main([str(tmp_path / "sweep"), "--also", f"{tmp_path / 'other'}=in-window",
                      "--out", str(out)]) == 0  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert "| adaptive delta=0.1 (in-window) | 2 |" in summary
    assert "| adaptive delta=0.1 | 2 |" in summary
    with pytest.raises(SystemExit, match="DIR=LABEL"):
        plots.main([str(tmp_path / "sweep"), "--also", str(tmp_path / "other")])


def test_plot_writes_figures_and_summary(tmp_path):
    synthetic_sweep(tmp_path / "sweep")
    assert plots.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "figures")]) == 0
    for name in plots.FIGURES:
        data = (tmp_path / "figures" / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    summary = (tmp_path / "figures" / "summary.md").read_text()
    main_table = summary.split("## Time to target")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "---" not in line]
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    assert labels == [
        "fixed K=5",
        "**fixed K=10** (best fixed)",
        "adaptive delta=0.5",
        "adaptive delta=0.1",
    ]
    cells = [cell.strip() for cell in rows[2].split("|")]
    assert cells[2] == "2" and cells[3] == "1.315 ± 0.0071"  # valid ppl over seeds 1 and 2
    assert cells[5] == "10 ± 0"  # final K, the same for both seeds
    # at equal data, the fewest tokens of any run (K = 5's 160k): K = 10 validated twice by then,
    # the adaptive runs (K 20, 1280 tokens per update) once
    within = [row.split("|")[10].strip() for row in rows[1:5]]
    assert within == ["1.815 ± 0.0071", "1.615 ± 0.0071", "2.115 ± 0.0071", "2.115 ± 0.0071"]
    assert "within 1.6e+05 tokens" in rows[0]
    # a later point: K = 5 stopped short of it and is left out rather than flattered
    runs = plots.load_runs(tmp_path / "sweep")
    later = plots.summary_table(runs, equal_tokens=320_000).splitlines()[2]
    assert later.split("|")[10].strip() == "-"
    # time to target: adaptive delta 0.5 (K 20) reaches K = 10's best valid ppl at the same
    # update, with 39 / 19 of its processed tokens
    target_rows = summary.split("## Time to target")[1].splitlines()
    ratios = {row.split("|")[1].strip() + row.split("|")[2].strip(): row.split("|")[6].strip()
              for row in target_rows if row.startswith("| adaptive")}  # fmt: skip
    assert ratios["adaptive delta=0.51"] == f"{39 / 19:.2f}"
    with pytest.raises(SystemExit, match="--equal-tokens must be positive"):
        plots.main([str(tmp_path / "sweep"), "--equal-tokens", "0"])


def test_plot_labels_and_tabulates_estimator_runs(tmp_path):
    synthetic_sweep(tmp_path / "sweep")
    estimators = [runs.EstimatorSpec("uoro"), runs.EstimatorSpec("tbptt", "tbptt_lstm_copy")]
    for spec in runs.plan_runs([], [], [1, 2], estimators, 8):
        run_dir = tmp_path / "sweep" / "runs" / spec.name
        run_dir.mkdir(parents=True)
        valid = [
            {"num_updates": u, "wall": u / 5, "tokens": 32 * u, "processed_tokens": 32 * u,
             "est_sec": 0, "valid_loss": 2.0 - u / 1000 - spec.seed / 10,
             "valid_ppl": 2 ** (2.0 - u / 1000 - spec.seed / 10)}
            for u in range(100, 600, 100)
        ]  # fmt: skip
        train = [{"num_updates": u, "wall": u / 5, "tokens": 32 * u, "processed_tokens": 32 * u,
                  "trunc_k": 8, "loss": 2.0} for u in range(10, 510, 10)]  # fmt: skip
        results.write_csv(run_dir / "trajectory.csv", results.TRAJECTORY_COLUMNS, train)
        results.write_csv(run_dir / "validation.csv", results.VALIDATION_COLUMNS, valid)
        result = fake_result(spec, 3.0 + spec.seed, 8)
        result["arch"] = spec.arch or "tbptt_lstm_lm_tiny"
        result["processed_tokens"] = 16000
        console.write_json(run_dir / "result.json", result)
    # a run of an older sweep: no arch in its result, but its command records one
    (tmp_path / "sweep" / "runs" / "fixed_k10_s1" / "command.txt").write_text(
        "fairseq-train data --arch tbptt_lstm_copy --lr 1.0"
    )
    out = tmp_path / "figures"
    assert plots.main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    for name in ("valid_loss_vs_processed", "valid_loss_vs_wall", "bias_vs_updates"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    summary = (out / "summary.md").read_text()
    table = summary.split("## Test perplexity by configuration")[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    rows = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[2:]}
    # test ppl = valid ppl + 0.1 (fake_result): 4.1 and 5.1 over seeds 1 and 2
    assert rows["uoro K=8 on tbptt_lstm_lm_tiny"][:3] == ["tbptt_lstm_lm_tiny", "2", "4.6 ± 0.71"]
    assert rows["tbptt K=8 on tbptt_lstm_copy"][:2] == ["tbptt_lstm_copy", "2"]
    assert rows["fixed K=5"][0] == "-"  # a result of an older sweep: no arch recorded
    assert rows["fixed K=10"][0] == "tbptt_lstm_copy"  # ... but its command.txt has one
    assert list(rows)[-2:] == ["tbptt K=8 on tbptt_lstm_copy", "uoro K=8 on tbptt_lstm_lm_tiny"]
    # they reach the best fixed K's target too: in the time-to-target table
    assert "| uoro K=8 on tbptt_lstm_lm_tiny | 1 |" in summary.split("## Time to target")[1]


# fairseq-train options of the mini sweeps (after ``--``): the tiny model, an adaptive range
MINI_SWEEP_TRAIN = [
    "--arch", "tbptt_lstm_lm_tiny", "--batch-size", "4", "--lr", "1.0", "--cpu",
    "--truncation-length", "8", "--min-truncation-length", "2",
    "--max-truncation-length", "20", "--estimate-window", "20",
    "--estimate-sequences", "4", "--estimate-repeats", "1",
]  # fmt: skip


@pytest.mark.e2e
def test_mini_sweep_end_to_end_then_skips(tiny_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    argv = [
        "--data", str(tiny_corpus), "--out", str(out),
        "--fixed", "6", "--deltas", "0.5", "--seeds", "1",
        "--budget-updates", "24", "--valid-interval", "12",
        "--tensorboard-logdir", str(tmp_path / "tb"),
        "--", *MINI_SWEEP_TRAIN, "--estimate-interval", "10",
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    assert "run 1/2 fixed_k6_s1: start" in first and "run 2/2 delta0.5_s1: done" in first
    assert "valid @ 12/24" in first
    table = results.read_csv(out / "results.csv")
    assert [(r["run"], r["mode"], r["updates"]) for r in table] == [
        ("fixed_k6_s1", "fixed", 24),
        ("delta0.5_s1", "adaptive", 24),
    ]
    for row in table:
        assert 1 < row["valid_ppl"] < 60 and 1 < row["test_ppl"] < 60
        assert row["final_bias_hat"] > 0 and row["est_sec"] > 0 and row["wall_sec"] > 0
    assert table[0]["final_k"] == 6 and table[0]["tokens"] == 24 * 4 * 6
    assert 2 <= table[1]["final_k"] <= 20
    trajectory = results.read_csv(out / "runs" / "delta0.5_s1" / "trajectory.csv")
    assert trajectory[-1]["num_updates"] == 24 and 2 <= trajectory[0]["trunc_k"] <= 20
    validation = results.read_csv(out / "runs" / "delta0.5_s1" / "validation.csv")
    assert [row["num_updates"] for row in validation] == [12, 24]
    assert list((tmp_path / "tb" / "delta0.5_s1").rglob("events.out.tfevents.*"))

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert sweep.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier, skipped") == 2 and "start" not in again
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert json.loads((out / "runs" / "fixed_k6_s1" / "result.json").read_text())["k"] == 6
    for run in ("fixed_k6_s1", "delta0.5_s1"):
        assert_records_alone_give_the_log_validations(out / "runs" / run, tmp_path / run)


def assert_records_alone_give_the_log_validations(run_dir: Path, copy: Path) -> None:
    """A run's metrics records, its stdout deleted, give the validation rows that its fairseq
    log lines give (up to the log's rounding: losses to 3 decimals, wall clock to seconds)."""
    from atbptt.records import METRICS_FILE

    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / METRICS_FILE, copy / "checkpoints" / METRICS_FILE)
    from_records = fairseq_logs.parse_run(copy)  # no train.log there
    from_log = fairseq_logs.parse_log((run_dir / "train.log").read_text())
    assert [row["num_updates"] for row in from_records.valid] == [12, 24]
    assert len(from_records.valid) == len(from_log.valid)
    for recorded, logged in zip(from_records.valid, from_log.valid, strict=True):
        assert set(recorded) == set(results.VALIDATION_COLUMNS) == set(logged)
        assert recorded["num_updates"] == logged["num_updates"]
        assert recorded["valid_loss"] == pytest.approx(logged["valid_loss"], abs=6e-4)
        assert recorded["valid_ppl"] == pytest.approx(logged["valid_ppl"], rel=1e-3)
        for key in ("tokens", "processed_tokens"):
            assert recorded[key] == pytest.approx(logged[key], rel=1e-3)
        assert recorded["est_sec"] == pytest.approx(logged["est_sec"], abs=0.1)
        assert recorded["wall"] == pytest.approx(logged["wall"], abs=2.5)
    assert from_records.updates == from_log.updates == 24
    assert from_records.tokens == from_log.tokens


@pytest.mark.e2e
def test_mini_sweep_with_a_token_budget(tiny_corpus, tmp_path, monkeypatch, capsys):
    """Every run scores the same tokens: the fixed run in a known number of updates, the adaptive
    one in as many as its K takes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    argv = [
        "--data", str(tiny_corpus), "--out", str(out),
        "--fixed", "6", "--deltas", "0.5", "--seeds", "1",
        "--budget-tokens", "480", "--valid-interval", "10",
        "--", *MINI_SWEEP_TRAIN, "--estimate-interval", "5",
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    output = capsys.readouterr().out
    assert "480 tokens each" in output and "valid @ 10: ppl" in output
    fixed, adaptive = results.read_csv(out / "results.csv")
    assert (fixed["updates"], fixed["tokens"]) == (20, 480)  # 4 columns x K 6 per update
    assert 480 <= adaptive["tokens"] < 480 + 4 * 20  # stops at the first update past the budget
    log = (out / "runs" / "delta0.5_s1" / "train.log").read_text()
    assert f"scored tokens: {int(adaptive['tokens']):,} >= max_train_tokens: 480" in log
    assert json.loads((out / "runs" / "fixed_k6_s1" / "result.json").read_text())["budget"] == (
        "480 tokens"
    )


# ------------------------------------------- sweeps that would mix configurations, or runs


def test_run_records_name_what_differs(tmp_path):
    settings = runs.SweepSettings(
        data=tmp_path / "a", out=tmp_path / "out", budget_updates=100, valid_interval=20,
        log_interval=5, extra_args=["--lr", "1.0", "--clip-norm", "0.5"],
    )  # fmt: skip
    spec = runs.RunSpec("fixed", 5, 1)
    code = {"source_sha256": "a" * 64, "git_commit": "c1"}
    recorded = {"command": runs.train_command(spec, settings, tmp_path / "r1"), "code": code}
    # the same run in a moved sweep directory is the same run
    moved = {"command": runs.train_command(spec, settings, tmp_path / "r2"), "code": code}
    assert run_records.record_differences(recorded, moved) == []
    settings.data, settings.budget_updates = tmp_path / "b", 200
    settings.extra_args = ["--lr", "1.0", "--lr", "0.5", "--dropout=0.1"]
    current = {
        "command": runs.train_command(spec, settings, tmp_path / "r1"),
        "code": {"source_sha256": "b" * 64, "git_commit": "c2"},
    }
    assert run_records.record_differences(recorded, current) == [
        "--clip-norm 0.5 -> unset",
        "--dropout unset -> 0.1",
        "--lr 1.0 -> 0.5",
        "--max-update 100 -> 200",
        f"data {tmp_path / 'a'} -> {tmp_path / 'b'}",
        f"code {'a' * 12} -> {'b' * 12} (commit c1 -> c2)",
    ]
    # an older sweep's run (command.txt, no code version) is compared on its command
    assert run_records.record_differences({"command": recorded["command"], "code": None}, current)[
        -1
    ].startswith("data ")


def test_code_version_hashes_the_sources_of_both_packages(tmp_path):
    for package in run_records.SOURCE_PACKAGES:
        (tmp_path / package / "sub").mkdir(parents=True)
        (tmp_path / package / "sub" / "module.py").write_text("x = 1\n")
    first = run_records.code_version(tmp_path)
    assert first["git_commit"] is None  # not a git checkout
    (tmp_path / "atbptt" / "notes.txt").write_text("not code")
    (tmp_path / "atbptt_fairseq" / "experiments").mkdir()  # starts runs, trains nothing
    (tmp_path / "atbptt_fairseq" / "experiments" / "plots.py").write_text("x = 1\n")
    assert run_records.code_version(tmp_path) == first
    (tmp_path / "atbptt_fairseq" / "sub" / "module.py").write_text("x = 2\n")
    assert run_records.code_version(tmp_path)["source_sha256"] != first["source_sha256"]
    assert run_records.code_version()["git_commit"]  # this checkout


def test_a_run_locked_by_another_sweep_process_is_left_to_it(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dict.txt").write_text("a 1\n")
    out = tmp_path / "out"
    run_dir = out / "runs" / "fixed_k6_s1"
    argv = ["--data", str(tmp_path / "data"), "--out", str(out), "--fixed", "6", "--deltas",
            "none", "--budget-updates", "10"]  # fmt: skip
    with run_records.run_lock(run_dir) as locked:  # as the other process holds it
        assert locked
        assert sweep.main(argv) == 0
    output = capsys.readouterr().out
    assert "fixed_k6_s1: another sweep process is running it (its lock is held), skipped" in output
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock"]  # nothing trained or recorded
    with pytest.raises(SystemExit, match="--jobs must be at least 1"):
        sweep.main([*argv, "--jobs", "0"])


@pytest.mark.e2e
def test_mini_sweep_with_jobs_then_refuses_or_reruns_another_configuration(
    tiny_corpus, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # capfd: --jobs 2 runs in worker processes
    out = tmp_path / "sweep"
    argv = [
        "--data", str(tiny_corpus), "--out", str(out), "--fixed", "6", "--deltas", "0.5",
        "--budget-updates", "8", "--valid-interval", "4", "--jobs", "2", "--threads", "1",
        "--", *MINI_SWEEP_TRAIN, "--estimate-interval", "4",
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    output = capfd.readouterr().out
    for name in ("fixed_k6_s1", "delta0.5_s1"):
        assert f"{name}: start" in output and f"{name}: done in" in output
        assert f"[{name}] valid @ 8/8" in output  # every progress line names its run
    assert [r["run"] for r in results.read_csv(out / "results.csv")] == [
        "fixed_k6_s1",
        "delta0.5_s1",
    ]
    record = json.loads((out / "runs" / "fixed_k6_s1" / "run.json").read_text())
    assert record["command"][1] == str(tiny_corpus.resolve())
    assert record["code"] == run_records.code_version()

    logs = {p: p.read_bytes() for p in out.glob("runs/*/train.log")}
    with pytest.raises(SystemExit) as refused:
        sweep.main([*argv, "--lr", "0.5"])
    message = str(refused.value)
    assert message.startswith("error: run fixed_k6_s1 in") and "\n" not in message
    assert "(and 1 more runs): --lr 1.0 -> 0.5;" in message and "--rerun-changed" in message
    assert logs == {p: p.read_bytes() for p in out.glob("runs/*/train.log")}  # nothing ran

    argv = [*argv[: argv.index("--deltas")], "--deltas", "none", *argv[argv.index("0.5") + 1 :]]
    assert sweep.main(["--rerun-changed", *argv, "--lr", "0.5"]) == 0
    output = capfd.readouterr().out
    assert "[fixed_k6_s1] trained with another configuration: moved to" in output
    (replaced,) = (out / "replaced").iterdir()
    assert replaced.name.startswith("fixed_k6_s1-") and (replaced / "result.json").is_file()
    rerun = json.loads((out / "runs" / "fixed_k6_s1" / "run.json").read_text())
    assert runs.option_value(rerun["command"], "--lr") == "0.5"
    assert (
        runs.option_value(json.loads((replaced / "run.json").read_text())["command"], "--lr")
        == "1.0"
    )


@pytest.mark.e2e
def test_mini_sweep_of_gradient_estimators_at_equal_compute(
    tiny_corpus, tmp_path, monkeypatch, capfd
):
    """A fixed K, ARTBP, UORO and fixed-K TBPTT on another architecture each run the same
    processed tokens; a rerun skips them; a bad spec is refused before anything runs; plot.py
    draws and tabulates them."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # capfd: --jobs 2 runs in worker processes
    out, budget = tmp_path / "sweep", 640
    argv = [
        "--data", str(tiny_corpus), "--out", str(out), "--fixed", "6", "--deltas", "none",
        "--estimators", "artbp,uoro,tbptt@tbptt_lstm_copy",
        "--budget-processed-tokens", str(budget), "--valid-tokens", "320", "--log-interval", "5",
        "--jobs", "2", "--threads", "1", "--", *MINI_SWEEP_TRAIN,
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    output = capfd.readouterr().out
    # K of the estimators: K0 of the adaptive runs (MINI_SWEEP_TRAIN's --truncation-length 8)
    assert "4 runs (1 fixed K, 0 deltas, 3 estimators at K 8, seeds 1)" in output
    table = results.read_csv(out / "results.csv")
    assert [(r["run"], r["mode"], r["method"], r["arch"], r["k"]) for r in table] == [
        ("fixed_k6_s1", "fixed", "tbptt", "tbptt_lstm_lm_tiny", 6),
        ("artbp_k8_s1", "estimator", "artbp", "tbptt_lstm_lm_tiny", 8),
        ("tbptt_on_tbptt_lstm_copy_k8_s1", "estimator", "tbptt", "tbptt_lstm_copy", 8),
        ("uoro_k8_s1", "estimator", "uoro", "tbptt_lstm_lm_tiny", 8),
    ]
    for row in table:
        log = (out / "runs" / row["run"] / "train.log").read_text()
        processed = int(row["processed_tokens"])
        # each stops at the first update that reaches the budget: the same compute
        assert f"processed tokens: {processed:,} >= max_processed_tokens: {budget:,}" in log
        if row["method"] != "artbp":  # ARTBP's segments have random lengths
            assert budget <= processed < budget + 4 * (2 * row["k"] - 1)  # one update at most
        assert 1 < row["test_ppl"] < 60 and row["updates"] > 1
        assert len(results.read_csv(out / "runs" / row["run"] / "validation.csv")) >= 2
    record = json.loads((out / "runs" / "uoro_k8_s1" / "run.json").read_text())
    assert (record["method"], record["arch"]) == ("uoro", "tbptt_lstm_lm_tiny")
    assert runs.option_value(record["command"], "--gradient-estimator") == "uoro"

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.*")}
    assert sweep.main(argv) == 0
    again = capfd.readouterr().out
    assert again.count("finished earlier, skipped") == 4 and "start" not in again
    spec_at = argv.index("--estimators") + 1
    bad_specs = {"uoro@": "'uoro@' has '@' but no", "uoro,,artbp": "empty spec",
                 "kalman": "unknown gradient estimator 'kalman'",
                 "uoro,uoro@tbptt_lstm_lm_tiny": "train the same runs"}  # fmt: skip
    for bad, words in bad_specs.items():
        with pytest.raises(SystemExit) as refused:
            sweep.main([*argv[:spec_at], bad, *argv[spec_at + 1 :]])
        message = str(refused.value)
        assert message.startswith("error: ") and "\n" not in message and words in message
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.*")}

    figures = tmp_path / "figures"
    assert plots.main([str(out), "--out", str(figures)]) == 0
    printed = capfd.readouterr().out
    for name in plots.FIGURES:
        assert (figures / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    summary = (figures / "summary.md").read_text()
    for label in ("artbp K=8 on tbptt_lstm_lm_tiny", "uoro K=8 on tbptt_lstm_lm_tiny",
                  "tbptt K=8 on tbptt_lstm_copy", "fixed K=6"):  # fmt: skip
        assert f"| {label} | " in summary.split("## Test perplexity")[1]
        assert f"| {label} | " in printed


def test_the_demo_summary_says_when_k_sits_at_k_max_above_the_target(tmp_path):
    import json

    def adaptive_run(name: str, k: int, bias: float) -> plots.RunData:
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        command = ["fairseq-train", "data", "--max-truncation-length", "100"]
        (run_dir / "run.json").write_text(json.dumps({"command": command}))
        decision = {"update": 500, "truncation_length": k, "relative_bias": bias,
                    "decay_rate": 0.99, "seconds": 1.0, "changed": True, "fallback": "",
                    "raw_choice": k, "reason": ""}  # fmt: skip
        (run_dir / "train.log").write_text(
            "2026-12-05 06:02:02 | INFO | atbptt_fairseq.tasks.adaptive_tbptt_lm | "
            f"k_decision {json.dumps(decision)}\n"
        )
        return plots.RunData({"run": name, "mode": "adaptive", "delta": "0.1"}, [], [])

    runs = [adaptive_run("met", 68, 0.0999), adaptive_run("missed", 100, 1.96)]
    assert demo.fallback_lines(runs, tmp_path) == []
    assert demo.k_max_lines(runs, tmp_path) == [
        "  missed, update 500: K sits at K_max = 100 with delta_hat 1.96 above the target 0.1"
    ]


def test_the_k_figure_draws_steps_from_the_start_to_the_end_of_each_run(tmp_path, monkeypatch):
    """K logged at updates 50 (10) and 100 (68, an estimate at 50) of a run of 130 updates: the
    line starts at update 0, jumps at update 50 (not a ramp from 50 to 100) and reaches 130."""
    rows = [{"num_updates": 50, "trunc_k": 10.0, "processed_tokens": 500.0},
            {"num_updates": 100, "trunc_k": 68.0, "processed_tokens": 7000.0}]  # fmt: skip
    run = plots.RunData(
        {"run": "delta0.1_s1", "config": "delta0.1", "mode": "adaptive", "delta": 0.1,
         "updates": 130, "processed_tokens": 11000.0}, rows, [],
    )  # fmt: skip
    xs, ys = plots.truncation_steps([run], "num_updates")
    assert list(xs) == [0, 50, 100, 130] and list(ys) == [10, 10, 68, 68]
    assert list(plots.truncation_steps([run], "processed_tokens")[0]) == [0, 500, 7000, 11000]
    drawn = []
    monkeypatch.setattr(plots.plt.Axes, "plot", lambda ax, *a, **k: drawn.append(k["drawstyle"]))
    plots.plot_truncation([run], tmp_path / "k.png")
    assert drawn == ["steps-pre"]


# ------------------------------------------- faults: orphaned trainers, data rebuilt in place


def processes_naming(text: str) -> list[int]:
    """The ids of the live processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_run_subprocess_holds_the_run_lock_and_dies_with_its_starter(tmp_path):
    import fcntl
    import subprocess
    import threading
    import time

    children = launch.ChildProcesses()
    marker = f"atbptt-lock-holder-{tmp_path.name}"
    sleeper = ["python3", "-c", "import time; time.sleep(60)", marker]
    with run_records.run_lock(tmp_path / "run") as lock_fd:
        holder = children.start(sleeper, keep_fds=(lock_fd,))
    with run_records.run_lock(tmp_path / "run") as lock_fd:  # the sweep let go; its trainer did not
        assert lock_fd is None
    with (tmp_path / "run" / "lock").open() as handle, pytest.raises(BlockingIOError):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.killpg(holder.pid, 9)  # its own process group
    holder.wait()
    with run_records.run_lock(tmp_path / "run") as lock_fd:
        assert lock_fd is not None

    started: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: started.append(children.start(sleeper)))
    thread.start()
    thread.join()  # the starting thread ends: the kernel kills its child
    deadline = time.monotonic() + 10
    while started[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started[0].returncode == -9


def test_the_train_log_holds_each_line_as_soon_as_the_sweep_reads_it(tmp_path):
    """A sweep killed from outside (kill -9, a session's end) loses no line it has read."""
    log = tmp_path / "train.log"
    trainer = (  # the line is built, so that the command in the log's header does not hold it
        "import pathlib, time\n"
        "line = 'line ' + str(6 * 7)\n"
        "print(line, flush=True)\n"
        "time.sleep(1)\n"  # the sweep has read the line by now
        f"print('kept' if line in pathlib.Path({str(log)!r}).read_text() else 'lost')\n"
    )
    launch.run_train([sys.executable, "-c", trainer], log, "run", "1", progress_seconds=60)
    assert log.read_text().splitlines()[-1] == "kept"


@pytest.mark.e2e
def test_kill_9_of_the_sweep_leaves_no_trainer_running(tiny_corpus, tmp_path):
    import subprocess
    import time

    out = tmp_path / "sweep"
    command = [
        sys.executable, str(REPO / "scripts" / "sweep.py"), "--data", str(tiny_corpus),
        "--out", str(out), "--fixed", "6", "--deltas", "none", "--budget-updates", "100000",
        "--threads", "1", "--", *MINI_SWEEP_TRAIN,
    ]  # fmt: skip
    sweep_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "runs" / "fixed_k6_s1" / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "train_inner" not in (
        log.read_text() if log.is_file() else ""
    ):
        time.sleep(0.5)
    trainers = [pid for pid in processes_naming(str(out)) if pid != sweep_process.pid]
    assert trainers, "fairseq-train did not start"
    sweep_process.kill()
    sweep_process.wait()

    def lock_free() -> bool:
        with run_records.run_lock(out / "runs" / "fixed_k6_s1") as lock_fd:
            return lock_fd is not None

    deadline = time.monotonic() + 10  # a killed process closes its files as it ends
    while (processes_naming(str(out)) or not lock_free()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_naming(str(out)) == []
    assert lock_free()  # for a rerun, which resumes the run


def test_a_data_bin_rebuilt_in_place_is_not_taken_for_the_old_one(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "targets").mkdir(parents=True)
    for path in (data / "dict.txt", data / "targets" / "dict.txt", data / "train.idx"):
        path.write_text("a 1\n")
    first = run_records.data_identity(data)
    (data / "train.bin").write_text("tokens")  # not part of the identity
    assert run_records.data_identity(data) == first
    for changed in (data / "targets" / "dict.txt", data / "train.idx"):
        changed.write_text("b 1\n")
        assert run_records.data_identity(data) != first
        changed.write_text("a 1\n")

    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--fixed", "6", "--deltas", "none",
            "--budget-updates", "10"]  # fmt: skip
    settings = sweep.settings_from_args(sweep.build_parser().parse_args(argv), [])
    spec = runs.RunSpec("fixed", 6, 1)
    run_dir = out / "runs" / spec.name
    run_dir.mkdir(parents=True)
    record = {"command": runs.train_command(spec, settings, run_dir),
              "code": run_records.code_version(), "data": first}  # fmt: skip
    console.write_json(run_dir / "run.json", record)
    console.write_json(run_dir / "result.json", fake_result(spec, 3.0, 6))
    assert sweep.main(argv) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out
    (data / "dict.txt").write_text("a 1\nb 1\n")  # rebuilt in place: the same path
    with pytest.raises(SystemExit) as refused:
        sweep.main(argv)
    message = str(refused.value)
    assert message.startswith("error: run fixed_k6_s1 in") and "\n" not in message
    assert f"data content {first['sha256'][:12]} -> " in message and "--rerun-changed" in message


@pytest.mark.e2e
def test_mini_sweep_on_submitit_local_executor(tiny_corpus, tmp_path, monkeypatch, capsys):
    """The grid through hydra's submitit launcher (its local executor: a process per run, as a
    SLURM job would be), then skipped by a rerun on joblib: the same runs, the same records."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    argv = [
        "--data", str(tiny_corpus), "--out", str(out), "--fixed", "6", "--deltas", "none",
        "--budget-updates", "8", "--valid-interval", "4", "--threads", "1",
        "--", *MINI_SWEEP_TRAIN,
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="--launcher-option takes KEY=VALUE"):
        sweep.main([*argv[: -len(MINI_SWEEP_TRAIN) - 1], "--launcher-option", "partition", "--"])
    assert sweep.main(["--launcher", "submitit-local", *argv]) == 0
    output = capsys.readouterr().out
    assert "launching 1 runs on submitit-local" in output
    assert "run 1/1 fixed_k6_s1: done" in output
    (row,) = results.read_csv(out / "results.csv")
    assert (row["run"], row["updates"]) == ("fixed_k6_s1", 8) and 1 < row["test_ppl"] < 60
    job_logs = "".join(p.read_text() for p in (out / "launcher").rglob("*_log.out"))
    assert "fixed_k6_s1: done in" in job_logs and "[fixed_k6_s1] valid @ 8/8" in job_logs
    assert sweep.main(argv) == 0
    assert "fixed_k6_s1: finished earlier, skipped" in capsys.readouterr().out


def test_presets_are_hydra_compositions_and_numbers_compare_by_value(tmp_path):
    """A preset's options are what hydra composes from configs/ (``1e-05`` where the YAML says
    ``1e-5``), and a run recorded with the YAML's spelling is the same run."""
    copy = presets.get_preset("copy")
    assert runs.option_value(copy.fixed_args, "--weight-decay") == "1e-05"
    assert runs.option_value(copy.adaptive_args, "--truncation-length") == "15"
    assert runs.option_value(copy.fixed_args, "--truncation-length") is None  # the grid's
    settings = runs.SweepSettings(
        data=tmp_path, out=tmp_path, budget_updates=10, valid_interval=5, log_interval=1,
        preset=copy,
    )  # fmt: skip
    command = runs.train_command(runs.RunSpec("fixed", 5, 1), settings, tmp_path / "r")
    as_yaml = [arg.replace("1e-05", "1e-5") for arg in command]
    assert as_yaml != command
    assert (
        run_records.record_differences({"command": as_yaml}, {"command": command, "code": {}}) == []
    )
    assert run_records.record_differences(
        {"command": [*command, "--lr", "1"]}, {"command": [*command, "--lr", "1.5"], "code": {}}
    ) == ["--lr 1 -> 1.5"]


def test_the_launchers_overrides_name_the_runs_and_pass_the_options(tmp_path):
    joblib = launchers.hydra_overrides("joblib", 2, [], tmp_path, ["fixed_k5_s1", "delta0.1_s1"])
    assert "run=fixed_k5_s1,delta0.1_s1" in joblib and "hydra.launcher.n_jobs=2" in joblib
    assert "hydra/launcher=joblib" in joblib and "hydra.job.chdir=false" in joblib
    slurm = launchers.hydra_overrides("submitit-slurm", 1, ["partition=gpu"], tmp_path, ["a"])
    assert slurm[0] == "hydra/launcher=submitit_slurm"
    assert slurm[-2:] == ["hydra.launcher.timeout_min=1440", "hydra.launcher.partition=gpu"]
    with pytest.raises(ValueError, match="unknown launcher"):
        launchers.hydra_overrides("ray", 1, [], tmp_path, ["a"])
