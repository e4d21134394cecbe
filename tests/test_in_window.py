"""The in-window bias estimate (atbptt/in_window.py) against the ground truth."""

import math

import pytest
import torch
from conftest import TINY_TRAIN, run_cli
from test_check_bias import BURNIN, DiagonalLinearRnn, TinyLstm, constant_stream

from atbptt import (
    TruncationController,
    estimate_bias,
    measure_gradient_profile,
    measure_true_bias,
    sample_windows,
)
from atbptt.in_window import bucket_edges, estimate_bias_in_window, measure_in_window
from atbptt.records import METRICS_FILE, read_records


def burned_in_windows(model, inputs, targets, sequences, burnin, window, seed):
    """The windows measure_true_bias draws with this seed, and their state after the burn-in."""
    positions, _ = sample_windows(
        torch.arange(inputs.numel()), torch.arange(inputs.numel()), sequences, burnin + window,
        torch.Generator().manual_seed(seed),
    )  # fmt: skip
    windows, final_targets = inputs[positions], targets[positions[:, -1]]
    state = model.zero_state(sequences)
    with torch.no_grad():
        for position in range(burnin):
            state = model.advance(windows[:, position], state)
    return state, windows, final_targets


@pytest.mark.parametrize("kind", ["linear", "lstm"])
def test_in_window_bias_is_the_true_bias_within_the_window_plus_the_norm_tail(kind):
    if kind == "linear":
        model, (inputs, targets), burnin = (
            DiagonalLinearRnn([0.9, 0.6], [0.5, -1.0]),
            constant_stream(),
            BURNIN,
        )
    else:
        model = TinyLstm()
        generator = torch.Generator().manual_seed(5)
        inputs = torch.randint(0, 7, (500,), generator=generator)
        targets, burnin = torch.roll(inputs, -3), 4
    window, sequences, grid = 24, 6, [1, 2, 3, 5, 8, 12]
    truth = measure_true_bias(
        model, inputs, targets, grid, window, burnin, sequences,
        generator=torch.Generator().manual_seed(11), num_groups=1, training_window=False,
    )  # fmt: skip
    state, windows, final_targets = burned_in_windows(
        model, inputs, targets, sequences, burnin, window, seed=11
    )
    edges = [1, 2, 3, 5, 8, 12, 18, 24]
    measurement = measure_in_window(model, state, windows[:, burnin:], final_targets, edges=edges)
    estimate = estimate_bias_in_window(measurement)
    beyond = float(estimate_bias(measurement.profile).relative_bias[-1])
    for index, K in enumerate(grid):
        in_window = float(estimate.relative_bias[K - 1]) - beyond
        assert in_window == pytest.approx(float(truth.final_step.relative_bias[index]), rel=1e-5)
    # between edges the bias of the edge below is kept (conservative)
    assert float(estimate.relative_bias[3]) == float(estimate.relative_bias[2])  # K 4 -> edge 3
    # the profile from the same backward pass is the estimator's own
    reference = measure_gradient_profile(
        lambda tokens, state: (None, model.advance(tokens, state)), state,
        windows[:, burnin:], final_targets, burnin=0, readout=model.readout,
    )  # fmt: skip
    # float32 sums in another order: an absolute tolerance on the scale of the largest entry
    for ours, theirs in [
        (measurement.profile.norms, reference.norms),
        (measurement.profile.mean_gradients, reference.mean_gradients),
    ]:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    assert not any(p.grad is not None for p in model.parameters())


def test_bucket_edges():
    assert bucket_edges(5) == [1, 2, 3, 4, 5]
    edges = bucket_edges(200)
    assert edges[:8] == list(range(1, 9)) and edges[-1] == 200
    assert edges == sorted(set(edges)) and len(edges) < 30


def test_controller_chooses_from_the_in_window_estimate():
    model = TinyLstm()
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 7, (500,), generator=generator)
    targets = torch.roll(inputs, -3)
    window, burnin = 20, 4
    controller = TruncationController(
        initial_length=5, min_length=1, max_length=20, target_bias=0.1, window=window,
        burnin=burnin, num_sequences=4, num_estimates=1, interval=1,
        estimate_method="in-window",
    )  # fmt: skip

    def measure():
        state, windows, final_targets = burned_in_windows(
            model, inputs, targets, 4, burnin, window, seed=3
        )
        return measure_in_window(model, state, windows[:, burnin:], final_targets)

    decision = controller.estimate(measure, num_updates=1)
    state, windows, final_targets = burned_in_windows(model, inputs, targets, 4, burnin, window, 3)
    estimate = estimate_bias_in_window(
        measure_in_window(model, state, windows[:, burnin:], final_targets)
    )
    expected = int(torch.nonzero(estimate.relative_bias < 0.1 * (1 - 1e-6))[0]) + 1
    assert decision.truncation_length == expected
    with pytest.raises(ValueError, match="estimate_method"):
        TruncationController(5, 1, 20, 0.1, 20, 4, 4, 1, 1, estimate_method="bogus")
    with pytest.raises(ValueError, match="previous"):
        TruncationController(
            5, 1, 20, 0.1, 20, 4, 4, 1, 1, estimate_method="in-window", lag_origin="previous"
        )


@pytest.mark.e2e
def test_fairseq_train_with_the_in_window_estimate(tiny_corpus, tmp_path):
    common = [
        "fairseq-train", str(tiny_corpus), *TINY_TRAIN, "--cpu", "--batch-size", "4",
        "--truncation-length", "6", "--target-bias", "0.5", "--min-truncation-length", "2",
        "--max-truncation-length", "12", "--estimate-window", "12", "--estimate-interval", "3",
        "--estimate-sequences", "4", "--estimate-repeats", "1", "--max-update", "7", "--no-save",
        "--save-dir", str(tmp_path),
    ]  # fmt: skip
    run_cli(*common)  # the default estimate: in-window, before the first update and on schedule
    decisions = read_records(tmp_path / METRICS_FILE, "k_decision")
    assert [d["update"] for d in decisions] == [0, 3, 6]
    assert all(
        2 <= d["truncation_length"] <= 12 and math.isfinite(d["relative_bias"]) for d in decisions
    )
    output = run_cli(*common, "--estimate-lag-origin", "previous", check=False)
    assert output.strip().splitlines()[-1].startswith("atbptt_fairseq: error: --estimate-method")
