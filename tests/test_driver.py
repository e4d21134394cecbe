"""The plain-PyTorch front end: the model protocol, the driver and the copy-task example."""

import dataclasses
import io
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, PickledCommand, flip_bit_in_member, load_example
from fairseq.data import Dictionary

from atbptt import RecurrentModel, TbpttConfig, TbpttDriver, evaluate_stream
from atbptt.records import METRICS_FILE, MetricsFile, read_records
from atbptt_fairseq.models.tbptt_lstm_lm import (
    TbpttLstmDecoder,
    TbpttLstmLanguageModel,
    TbpttLstmLmConfig,
)
from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmConfig, AdaptiveTbpttLmTask

copy_task = load_example("copy_task")

# Adaptive K on a tiny budget: an estimate every 3 updates, K in [2, 12]
TINY_ADAPTIVE = {
    "truncation_length": 5, "target_bias": 0.1, "min_truncation_length": 2,
    "max_truncation_length": 12, "estimate_window": 12, "estimate_burnin": 3,
    "estimate_sequences": 6, "estimate_repeats": 2, "estimate_interval": 3,
}  # fmt: skip


def fairseq_model(vocabulary: int = 30) -> TbpttLstmLanguageModel:
    dictionary = Dictionary()
    for i in range(vocabulary):
        dictionary.add_symbol(f"w{i}")
    config = TbpttLstmLmConfig(embed_dim=8, hidden_size=8, num_layers=2, dropout=0.0)
    torch.manual_seed(0)
    return TbpttLstmLanguageModel(TbpttLstmDecoder(config, dictionary)).eval()


def copy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return copy_task.CopyLstm(hidden=8)


def test_models_satisfy_the_protocol():
    assert isinstance(fairseq_model(), RecurrentModel)
    assert isinstance(copy_model(), RecurrentModel)
    assert not isinstance(torch.nn.LSTM(4, 4), RecurrentModel)


@pytest.mark.parametrize("make_model", [fairseq_model, copy_model], ids=["fairseq", "example"])
def test_run_window_agrees_with_stepping(make_model):
    """Logits from output_start on and the state after carry_offset steps, as advance/readout."""
    model = make_model()
    tokens = torch.randint(0, 6, (3, 9))
    state = tuple(t.normal_() for t in model.zero_state(3))
    states, logits = [], []
    stepped = state
    for t in range(9):
        stepped = model.advance(tokens[:, t], stepped)
        states.append(stepped)
        logits.append(model.readout(stepped))
    with torch.no_grad():
        for output_start, carry_offset in ((0, 9), (4, 5), (8, 0), (9, 9)):
            window_logits, carried = model.run_window(tokens, state, output_start, carry_offset)
            expected = torch.stack(logits[output_start:], 1) if output_start < 9 else None
            if expected is None:
                assert window_logits.shape[:2] == (3, 0)
            else:
                torch.testing.assert_close(window_logits, expected, atol=1e-5, rtol=1e-5)
            carried_expected = state if carry_offset == 0 else states[carry_offset - 1]
            torch.testing.assert_close(carried, carried_expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["overlap", "disjoint"])
@pytest.mark.parametrize("aligned_targets", [False, True], ids=["next-token", "copy"])
def test_segments_score_every_position_of_a_pass_once_with_the_exact_state(style, aligned_targets):
    """Segment by segment from the carried state, the scores equal one forward over each column,
    and the next pass starts again from a zero state."""
    tokens, targets = copy_task.copy_stream(4 * 53, 2, 4, seed=3)
    driver = TbpttDriver(
        tokens, 4, TbpttConfig(truncation_length=6, tbptt_style=style),
        targets=targets if aligned_targets else None,
    )  # fmt: skip
    model = copy_model()
    inputs, expected_targets = driver._columns
    with torch.no_grad():
        reference, _ = model.run_window(inputs, model.zero_state(4), 0, inputs.size(1))
        scored_logits, scored_targets, new_passes = [], [], []
        for epoch in range(2):
            for segment in driver.segments(model):
                logits, carried = model.run_window(
                    segment.inputs, segment.state, segment.output_start, segment.carry_offset
                )
                segment.carry(carried)
                scored_logits.append(logits)
                scored_targets.append(segment.targets)
                new_passes.append(segment.new_pass)
    per_epoch = driver.segments_per_epoch
    assert len(scored_logits) == 2 * per_epoch and driver.epoch == 2
    assert new_passes == ([True] + [False] * (per_epoch - 1)) * 2
    for start in (0, per_epoch):
        one_pass = torch.cat(scored_logits[start : start + per_epoch], 1)
        torch.testing.assert_close(one_pass, reference, atol=1e-5, rtol=1e-5)
        assert torch.equal(
            torch.cat(scored_targets[start : start + per_epoch], 1), expected_targets
        )


def test_misuse_is_refused():
    tokens, targets = copy_task.copy_stream(200, 2, 4, seed=1)
    model = copy_model()
    driver = TbpttDriver(tokens, 4, TbpttConfig(truncation_length=5), targets=targets)
    segment = driver.next_segment(model)
    with pytest.raises(RuntimeError, match="previous segment was not run"):
        driver.next_segment(model)
    with pytest.raises(RuntimeError, match="being trained"):
        driver.state_dict()
    segment.loss(model)
    with pytest.raises(RuntimeError, match="already carried"):
        segment.loss(model)
    with pytest.raises(ValueError, match="same data and batch size"):
        TbpttDriver(tokens, 5, TbpttConfig(truncation_length=5)).load_state_dict(
            driver.state_dict()
        )
    scaled = TbpttDriver(tokens, 4, TbpttConfig(truncation_length=5, lr_scaling="sqrt"))
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        scaled.next_segment(model)
    with pytest.raises(ValueError, match="tbptt_style"):
        TbpttDriver(tokens, 4, TbpttConfig(tbptt_style="sliding"))
    with pytest.raises(ValueError, match="window"):
        TbpttDriver(tokens, 4, TbpttConfig(target_bias=0.1))  # W 400 > 200 tokens
    for name in ("truncation_clip_norm", "estimate_budget", "max_truncation_change"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            TbpttDriver(tokens, 4, TbpttConfig(**{name: math.nan}))  # trained to NaN before


def test_load_state_dict_refuses_another_stream_or_style_and_logs_other_changes(caplog):
    """A driver's state belongs to one stream and style: another stream of the same shape, or
    another TBPTT style, is refused; other changed options are named in one warning."""
    tokens, targets = copy_task.copy_stream(4 * 60, 2, 4, seed=1)
    config = TbpttConfig(truncation_length=5, tbptt_style="disjoint")
    state = TbpttDriver(tokens, 4, config, targets=targets).state_dict()
    other_tokens, other_targets = copy_task.copy_stream(4 * 60, 2, 4, seed=2)
    with pytest.raises(ValueError, match="another token stream of the same shape"):
        TbpttDriver(other_tokens, 4, config, targets=other_targets).load_state_dict(state)
    overlap = dataclasses.replace(config, tbptt_style="overlap")
    with pytest.raises(ValueError, match="cannot resume with tbptt_style 'disjoint' -> 'overlap'"):
        TbpttDriver(tokens, 4, overlap, targets=targets).load_state_dict(state)
    longer = dataclasses.replace(config, truncation_length=7)
    with caplog.at_level(logging.WARNING, logger="atbptt.driver"):
        TbpttDriver(tokens, 4, longer, targets=targets).load_state_dict(state)
    assert "resuming with changed options: truncation_length 5 -> 7" in caplog.text


def test_learning_rate_scales_with_k_inside_the_step_and_never_compounds():
    """lr in the step = the scheduler's lr x sqrt(K / 1); outside the step, the scheduler's."""
    tokens, targets = copy_task.copy_stream(4 * 120, 2, 4, seed=1)
    model = copy_model()
    config = TbpttConfig(**TINY_ADAPTIVE, lr_scaling="sqrt", lr_scaling_reference=1)
    driver = TbpttDriver(tokens, 4, config, targets=targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)  # chainable
    driver.attach_optimizer(optimizer)
    driver.attach_optimizer(optimizer)  # attaching twice scales once
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    lengths = []
    for update in range(12):
        segment = driver.next_segment(model)
        lengths.append(segment.truncation_length)
        loss = segment.loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * 0.5 ** (update // 3))
        scheduler.step()
    expected = [0.4 * 0.5 ** (u // 3) * math.sqrt(k) for u, k in enumerate(lengths)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert len(set(lengths)) > 1, f"K never changed ({lengths}); the check would be weaker"


@pytest.mark.parametrize(
    "method_options",
    [
        dict(
            estimate_method="norms",
            estimate_cumulative="exact",
            estimate_lag_origin="previous",
            estimate_tail_anchor=8,
        ),
        dict(estimate_method="in-window"),
    ],
)
def test_estimate_leaves_training_alone(tiny_corpus, method_options):
    """An estimate decides K and leaves grads, carried state and the global RNG untouched."""
    options = dict(TINY_ADAPTIVE, seed=3, **method_options)
    task_config = AdaptiveTbpttLmConfig(data=str(tiny_corpus), train_subset="train", **options)
    task = AdaptiveTbpttLmTask.setup_task(task_config)
    task.load_dataset("train")
    model = fairseq_model(len(task.dictionary)).train()
    driver = TbpttDriver(task.dataset("train").tokens, 3, TbpttConfig(**options))
    segment = driver.next_segment(model)
    segment.loss(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    carried = [t.clone() for t in driver._carried]
    rng = torch.get_rng_state()
    decision = driver.estimate(model)
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(carried, driver._carried))
    assert 2 <= decision.truncation_length <= 12 and math.isfinite(decision.relative_bias)
    assert driver.controller.last_decision is decision


def test_gradient_is_clipped_at_c_over_k_in_the_step():
    """With truncation_clip_norm C, the step applies lr x f(K) to the gradient clipped at C / K."""
    tokens, targets = copy_task.copy_stream(4 * 60, 2, 4, seed=1)
    config = TbpttConfig(
        truncation_length=4, truncation_clip_norm=0.01, lr_scaling="linear",
        lr_scaling_reference=2,
    )  # fmt: skip
    driver = TbpttDriver(tokens, 4, config, targets=targets)
    model = copy_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    driver.attach_optimizer(optimizer)
    segment = driver.next_segment(model)
    segment.loss(model).backward()
    gradient_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    change = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert driver.clip_threshold == 0.01 / 4 < gradient_norm
    assert float(change.norm()) == pytest.approx(0.1 * (4 / 2) * 0.01 / 4, rel=1e-4)
    assert optimizer.param_groups[0]["lr"] == 0.1


def train(driver, model, optimizer, until: int) -> list:
    """The example's loop: clip, step; returns the K decisions that ran."""
    decisions = []
    while driver.num_updates < until:
        for segment in driver.segments(model, max_updates=until):
            if segment.decision is not None:
                decisions.append(segment.decision.truncation_length)
            loss = segment.loss(model)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return decisions


def make_run(seed: int):
    tokens, targets = copy_task.copy_stream(4 * 90, 2, 4, seed=1)
    config = TbpttConfig(
        **TINY_ADAPTIVE, lr_scaling="sqrt", lr_scaling_reference=1, truncation_clip_norm=2.0,
        estimate_budget_counts="scored",
    )  # fmt: skip
    driver = TbpttDriver(tokens, 4, config, targets=targets)
    model = copy_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    driver.attach_optimizer(optimizer)
    return driver, model, optimizer


def test_resume_from_a_state_dict_continues_exactly():
    """Stop mid-epoch, save model, optimizer and driver, resume in fresh objects: the final
    parameters equal those of an uninterrupted run, bit for bit."""
    driver, model, optimizer = make_run(seed=0)
    decisions = train(driver, model, optimizer, until=31)
    assert driver.epoch >= 1 and 31 % driver.segments_per_epoch != 0
    assert len(decisions) >= 5 and driver._carried is not None

    first, first_model, first_optimizer = make_run(seed=0)
    train(first, first_model, first_optimizer, until=13)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first_model.state_dict(),
            "optimizer": first_optimizer.state_dict(),
            "driver": first.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, resumed_model, resumed_optimizer = make_run(seed=1)  # other weights until loaded
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["driver"])
    train(resumed, resumed_model, resumed_optimizer, until=31)
    for (name, expected), actual in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(expected, actual), name
    expected, actual = driver.state_dict(), resumed.state_dict()
    for state in (expected, actual):
        del state["controller"]["last_decision"]["seconds"]  # wall time
    assert actual["controller"] == expected["controller"]
    assert actual["cursor"] == expected["cursor"] and actual["num_updates"] == 31
    for count in ("scored_tokens", "processed_tokens", "segment_length"):
        assert actual[count] == expected[count], count
    assert all(
        torch.equal(a, b) for a, b in zip(actual["carried_state"], expected["carried_state"])
    )


def test_records_are_returned_and_written_once_per_update_across_a_resume(tmp_path):
    """Every segment hands out its records (the decision before it, then the update's); with a
    metrics dir they go to atbptt_metrics.jsonl, and a resume drops those after its update."""
    driver, model, optimizer = make_run(seed=0)
    driver.metrics = MetricsFile(tmp_path)
    train(driver, model, optimizer, until=13)
    saved = driver.state_dict()
    segment = driver.next_segment(model)
    kinds = [record["kind"] for record in segment.records]
    assert kinds == (["k_decision"] if segment.decision else []) + ["update"]
    update = segment.records[-1]
    assert update["update"] == 13 and update["trunc_k"] == segment.truncation_length
    assert update["lr_scale"] == pytest.approx(math.sqrt(segment.truncation_length))
    assert update["clip_at"] == pytest.approx(2.0 / segment.truncation_length)
    assert update["processed_tokens"] == driver.processed_tokens
    segment.loss(model)
    train(driver, model, optimizer, until=20)
    resumed, resumed_model, resumed_optimizer = make_run(seed=0)
    resumed.metrics = MetricsFile(tmp_path)
    resumed.load_state_dict(saved)
    assert [r["update"] for r in read_records(tmp_path / METRICS_FILE, "update")] == list(range(13))
    train(resumed, resumed_model, resumed_optimizer, until=20)
    updates = read_records(tmp_path / METRICS_FILE, "update")
    assert [r["update"] for r in updates] == list(range(20))
    decisions = read_records(tmp_path / METRICS_FILE, "k_decision")
    assert [d["update"] for d in decisions] == [0, *range(3, 20, 3)]  # one before the first
    assert all(d["reason"] and "raw_choice" in d for d in decisions)


def test_a_run_started_again_from_scratch_drops_the_records_of_the_dead_attempt(tmp_path):
    """An attempt killed before its first checkpoint left records; the run started again in the
    same folder (no checkpoint to resume) writes each update's records once, its own."""
    driver, model, optimizer = make_run(seed=0)
    driver.metrics = MetricsFile(tmp_path)
    train(driver, model, optimizer, until=7)
    again, again_model, again_optimizer = make_run(seed=0)
    again.metrics = MetricsFile(tmp_path)
    train(again, again_model, again_optimizer, until=5)
    assert [r["update"] for r in read_records(tmp_path / METRICS_FILE, "update")] == list(range(5))
    assert [d["update"] for d in read_records(tmp_path / METRICS_FILE, "k_decision")] == [0, 3]


def test_bad_batch_sizes_and_models_are_refused_in_one_line():
    tokens, targets = copy_task.copy_stream(200, 2, 4, seed=1)
    for batch_size in (0, -2):
        with pytest.raises(ValueError, match="batch_size must be a positive number of columns"):
            TbpttDriver(tokens, batch_size, TbpttConfig(truncation_length=5), targets=targets)

    class WindowOnly(torch.nn.Module):  # runs windows, cannot be stepped
        def __init__(self):
            super().__init__()
            self.inner = copy_model()
            self.state_batch_dim = self.inner.state_batch_dim

        def zero_state(self, batch_size):
            return self.inner.zero_state(batch_size)

        def run_window(self, *args):
            return self.inner.run_window(*args)

    fixed = TbpttDriver(tokens, 4, TbpttConfig(truncation_length=5), targets=targets)
    with pytest.raises(TypeError, match="LSTM is not an atbptt.RecurrentModel: it has no zero_s"):
        fixed.next_segment(torch.nn.LSTM(4, 4))
    fixed.next_segment(WindowOnly())  # enough for a fixed K
    adaptive = TbpttDriver(tokens, 4, TbpttConfig(**TINY_ADAPTIVE), targets=targets)
    with pytest.raises(TypeError, match="no advance, readout .K is estimated by stepping it."):
        adaptive.next_segment(WindowOnly())


def test_evaluate_stream_is_one_stateful_pass():
    tokens, targets = copy_task.copy_stream(150, 2, 4, seed=2)
    model = copy_model().train()
    with torch.no_grad():
        logits, _ = model.run_window(tokens[None], model.zero_state(1), 0, 150)
        expected = torch.nn.functional.cross_entropy(logits[0], targets).item()
    assert evaluate_stream(model, tokens, targets, chunk_length=7) == pytest.approx(expected)
    assert model.training


def test_config_defaults_match_the_fairseq_task():
    """One method, one set of defaults: every option the driver shares with the task defaults
    the same, and every method option of the task exists in the driver's config."""
    task_fields = {f.name: f for f in dataclasses.fields(AdaptiveTbpttLmConfig)}
    fairseq_only = {
        "_name", "data", "target_dir", "max_train_tokens", "max_processed_tokens",
        "validate_interval_processed_tokens", "eval_chunk_length", "eval_batch_size",
        "seed", "save_dir", "train_subset", "cpu", "fp16", "amp", "tpu", "distributed_world_size",
        "lr", "valid_subset", "disable_validation",  # fairseq's options, checked by the task
        "gradient_estimator",  # the driver takes an estimator object (TbpttDriver(estimator=...))
    }  # fmt: skip
    driver_fields = {f.name: f.default for f in dataclasses.fields(TbpttConfig)}
    missing = set(task_fields) - fairseq_only - set(driver_fields)
    assert not missing, f"add {sorted(missing)} to atbptt.driver.TbpttConfig"
    for name, default in driver_fields.items():
        if name in task_fields and name != "seed":
            assert task_fields[name].default == default, name


@pytest.mark.e2e
def test_copy_task_example_adapts_k_and_learns(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable, str(REPO / "examples" / "copy_task.py"), "--updates", "120",
            "--batch-size", "8", "--train-tokens", "8000", "--valid-tokens", "2000",
            "--hidden", "16", "--estimate-interval", "30", "--log-interval", "30",
            "--metrics-dir", str(tmp_path),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    decisions = read_records(tmp_path / METRICS_FILE, "k_decision")
    assert [d["update"] for d in decisions] == [0, 30, 60, 90], result.stdout
    assert len(read_records(tmp_path / METRICS_FILE, "update")) == 120
    losses = [float(x) for x in re.findall(r"train loss ([\d.]+)", result.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, result.stdout
    ppl = [float(x) for x in re.findall(r"valid ppl ([\d.]+)", result.stdout)]
    assert ppl and 1.0 < ppl[-1] < 6.0, result.stdout


def run_copy_task(*args: str, **env: str) -> subprocess.CompletedProcess:
    """examples/copy_task.py on 56 columns of 8 x 100 tokens: 7 updates per pass."""
    tiny = [
        "--batch-size", "8", "--train-tokens", "800", "--valid-tokens", "200", "--hidden", "8",
        "--estimate-interval", "5", "--log-interval", "5",
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "copy_task.py"), *tiny, *args], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.e2e
def test_copy_task_example_resumes_and_refuses_bad_checkpoints(tmp_path):
    """--save / --resume continue exactly; a bit-flipped or malicious file ends in one line
    ``error: ...`` and exit status 1, the payload never runs (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
    full = run_copy_task("--updates", "10")
    first = run_copy_task("--updates", "5", "--save", str(tmp_path / "at5.pt"))
    resumed = run_copy_task("--updates", "10", "--resume", str(tmp_path / "at5.pt"))
    for result in (full, first, resumed):
        assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed" in resumed.stdout and "at update 5" in resumed.stdout
    final = re.findall(r"^10 updates .*$", full.stdout, re.MULTILINE)
    assert final and re.findall(r"^10 updates .*$", resumed.stdout, re.MULTILINE) == final

    flipped = tmp_path / "flipped.pt"
    member = flip_bit_in_member(tmp_path / "at5.pt", flipped, "data/1")
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    state = torch.load(tmp_path / "at5.pt", weights_only=True)
    torch.save({**state, "payload": PickledCommand(marker)}, evil)
    for path, expected in [
        (flipped, f"error: checkpoint {flipped} is corrupt: {member} fails its CRC-32 check"),
        (evil, f"error: refusing to load checkpoint {evil}: it pickles posix.system"),
        (tmp_path / "none.pt", f"error: checkpoint {tmp_path / 'none.pt'} does not exist"),
    ]:
        result = run_copy_task(
            "--updates", "10", "--resume", str(path), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith(expected), result.stderr
        assert "updates" not in result.stdout  # nothing trained
    assert not marker.exists()


def test_core_helpers_the_fairseq_task_shares():
    """lr_factor, budget_tokens and estimate_truncation: what the task and the driver both use."""
    from atbptt import (
        aligned_stream,
        budget_tokens,
        build_controller,
        estimate_truncation,
        lr_factor,
    )

    config = TbpttConfig(truncation_length=4, lr_scaling="sqrt")
    assert lr_factor(config, 16) == pytest.approx(2.0)
    assert lr_factor(config, 16, initial_length=1) == pytest.approx(4.0)  # K0 as applied
    assert lr_factor(dataclasses.replace(config, lr_scaling_reference=16), 16) == 1.0
    assert budget_tokens(config, processed=70, scored=40) == 70
    assert budget_tokens(TbpttConfig(estimate_budget_counts="scored"), 70, 40) == 40

    config = TbpttConfig(**TINY_ADAPTIVE)
    stream = aligned_stream(
        torch.randint(0, 30, (400,), generator=torch.Generator().manual_seed(1))
    )
    model, averaged = fairseq_model(), []

    def average(tensors):  # stands in for an all-reduce over workers: norms come first
        averaged.append(tensors[0].clone())

    decisions = []
    for rank in (0, 0, 1):
        controller = build_controller(config)
        decisions.append(estimate_truncation(controller, model, stream, 7, 3, rank, average))
    assert len(averaged) == 3 * config.estimate_repeats  # every measured profile, once
    assert torch.equal(averaged[0], averaged[2])  # the same windows for the same rank
    assert not torch.equal(averaged[0], averaged[4])  # another rank draws other windows
    assert decisions[0].truncation_length == decisions[1].truncation_length
    assert not model.training
