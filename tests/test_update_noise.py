"""The bias relative to the update (atbptt.update_noise): debiased norms from independent repeats,
the update's expected norm at K, and the controller's choice of K from them."""

import math

import pytest
import torch
from conftest import TINY_TRAIN, run_cli

from atbptt import (
    BiasEstimate,
    GradientProfile,
    InWindowMeasurement,
    TruncationController,
    UpdateNoiseAccumulator,
    raw_truncation_length,
)
from atbptt.records import METRICS_FILE, read_records

EDGES = [1, 2, 3, 4, 6, 8]
WINDOW = EDGES[-1]
PARAMETERS = 4000


def fake_measurement(
    signal_buckets: torch.Tensor, noise: float, sequences: int, generator: torch.Generator
) -> InWindowMeasurement:
    """Buckets of mean contributions over ``sequences`` windows, each window's noise of std
    ``noise`` per coordinate, so the mean's noise has variance noise^2 / sequences."""
    scale = noise / math.sqrt(sequences)
    buckets = signal_buckets + scale * torch.randn(signal_buckets.shape, generator=generator)
    readout = torch.zeros(PARAMETERS)
    # a geometric norm profile, so the tail beyond the window is small and bounded
    norms = 0.5 ** torch.arange(WINDOW, dtype=torch.float32)
    profile = GradientProfile(norms, torch.zeros(WINDOW, 3), sequences)
    return InWindowMeasurement(profile, list(EDGES), readout, buckets)


def signal(generator: torch.Generator) -> torch.Tensor:
    """Bucket contributions whose norms halve from one bucket to the next."""
    directions = torch.randn(len(EDGES), PARAMETERS, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    return directions * (0.5 ** torch.arange(len(EDGES), dtype=torch.float32))[:, None]


def test_the_repeats_give_the_signal_bias_and_token_variance_without_their_noise():
    generator = torch.Generator().manual_seed(0)
    buckets = signal(generator)
    accumulator = UpdateNoiseAccumulator()
    sequences, noise = 16, 0.05
    for _ in range(40):
        accumulator.add(fake_measurement(buckets, noise, sequences, generator), sequences)
    result = accumulator.result()
    full = buckets.sum(0).double()
    assert result.signal_square == pytest.approx(float(full.square().sum()), rel=0.05)
    # sigma^2 = trace of one window's covariance = noise^2 per coordinate x P buckets' worth:
    # the full gradient sums the len(EDGES) independent bucket noises
    expected_variance = noise**2 * PARAMETERS * len(EDGES)
    assert result.token_variance == pytest.approx(expected_variance, rel=0.05)
    above = buckets.double().flip(0).cumsum(0).flip(0)
    expected_bias = [float(row.square().sum()) for row in above[1:]] + [0.0]
    assert torch.allclose(
        result.bias_square, torch.tensor(expected_bias, dtype=torch.float64), rtol=0.1, atol=1e-3
    )
    # the naive norm of one repeat's mean is inflated by its noise; the debiased one is not
    naive = float(
        fake_measurement(buckets, noise, sequences, generator).bucket_gradients.sum(0).norm()
    )
    assert naive**2 > 1.5 * result.signal_square


def test_relative_to_update_falls_with_the_update_noise():
    generator = torch.Generator().manual_seed(1)
    buckets = signal(generator)
    accumulator = UpdateNoiseAccumulator()
    for _ in range(2):  # noise-free repeats: the debiased norms are the norms
        accumulator.add(fake_measurement(buckets, 0.0, 8, generator), 8)
    quiet = accumulator.result()
    assert quiet.token_variance == pytest.approx(0.0, abs=1e-9)
    estimate = quiet.relative_to_update(WINDOW, 4, beyond_window=0.0, decay_rate=0.5)
    full_norm = float(buckets.sum(0).double().norm())
    above = buckets.double().flip(0).cumsum(0).flip(0)
    # without noise the update's gradient is the full gradient: the paper's relative bias
    for length, row in ((1, 1), (2, 2), (4, 4), (5, 4), (6, 5)):
        assert float(estimate.relative_bias[length - 1]) == pytest.approx(
            float(above[row].norm()) / full_norm, rel=1e-4
        )
    assert float(estimate.relative_bias[WINDOW - 1]) == 0.0
    noisy = type(quiet)(quiet.signal_square, 1e6, quiet.edges, quiet.bias_square)
    louder = noisy.relative_to_update(WINDOW, 4, beyond_window=0.0, decay_rate=0.5)
    assert bool((louder.relative_bias[:-1] < estimate.relative_bias[:-1]).all())
    # more columns per update, less noise per update: the relative bias rises towards the paper's
    wider = noisy.relative_to_update(WINDOW, 400, beyond_window=0.0, decay_rate=0.5)
    assert bool((wider.relative_bias[:-1] > louder.relative_bias[:-1]).all())
    assert noisy.signal_share(10) < noisy.signal_share(1000) < 1.0


def controller(target: float, repeats: int = 3, reference: str = "update") -> TruncationController:
    return TruncationController(
        initial_length=4, min_length=1, max_length=WINDOW, target_bias=target, window=WINDOW,
        burnin=0, num_sequences=16, num_estimates=repeats, interval=1,
        estimate_method="in-window", bias_relative_to=reference,
    )  # fmt: skip


@pytest.mark.parametrize("noise, expected", [(0.0, "paper"), (50.0, 1)])
def test_the_controller_chooses_k_against_the_update(noise, expected):
    generator = torch.Generator().manual_seed(2)
    buckets = signal(generator)

    def measure():
        return fake_measurement(buckets, noise, 16, generator)

    decision = controller(0.1).estimate(measure, num_updates=1, update_columns=4)
    if expected == "paper":  # no noise: the same K as the paper's delta on the same buckets
        paper = controller(0.1, reference="gradient").estimate(measure, num_updates=1)
        assert decision.truncation_length == paper.truncation_length > 1
        assert decision.signal_share == pytest.approx(1.0)
    else:  # noise far above the signal: no bias is worth a longer window
        assert decision.truncation_length == expected
        assert decision.signal_share < 0.01
    assert decision.update_bias < 0.1 and "bias_hat/update < 0.1" in decision.reason
    assert "signal share of the update at K" in decision.reason
    assert math.isfinite(decision.relative_bias)


def test_the_update_reference_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="in-window"):
        TruncationController(
            4, 1, 8, 0.1, 8, 0, 4, 3, 1, estimate_method="norms", bias_relative_to="update"
        )
    with pytest.raises(ValueError, match="at least 2"):
        controller(0.1, repeats=1)
    with pytest.raises(ValueError, match="bias_relative_to must be one of"):
        controller(0.1, reference="bogus")
    with pytest.raises(ValueError, match="columns of an update"):
        controller(0.1).estimate(lambda: None, num_updates=1)


@pytest.mark.e2e
def test_fairseq_train_chooses_k_against_the_update(tiny_corpus, tmp_path):
    common = [
        "fairseq-train", str(tiny_corpus), *TINY_TRAIN, "--cpu", "--batch-size", "4",
        "--truncation-length", "6", "--target-bias", "0.5", "--min-truncation-length", "2",
        "--max-truncation-length", "12", "--estimate-window", "12", "--estimate-interval", "3",
        "--estimate-sequences", "4", "--estimate-repeats", "2", "--estimate-method", "in-window",
        "--bias-relative-to", "update", "--first-estimate", "start", "--max-update", "4", "--no-save",
        "--save-dir", str(tmp_path),
    ]  # fmt: skip
    run_cli(*common)
    decisions = read_records(tmp_path / METRICS_FILE, "k_decision")
    assert [d["update"] for d in decisions] == [0, 3]  # before the first update, then on schedule
    for decision in decisions:
        assert 2 <= decision["truncation_length"] <= 12
        assert 0.0 <= decision["signal_share"] <= 1.0 and decision["update_bias"] >= 0.0
        assert "bias_hat/update < 0.5" in decision["reason"]
    norms = ["norms" if arg == "in-window" else arg for arg in common]
    output = run_cli(*norms, check=False)  # refused before training: no records
    assert output.strip().splitlines()[-1].startswith("atbptt_fairseq: error: "), output[-2000:]
    assert "in-window" in output.strip().splitlines()[-1]


def test_against_the_update_k_is_searched_from_k_min():
    """A noisy short update hides the bias (relative bias small at K = 1, 2), so the smallest K
    overall may not hold at K_min: the choice starts at K_min."""
    relative = torch.tensor([0.05, 0.08, 0.3, 0.2, 0.09, 0.05], dtype=torch.float64)
    estimate = BiasEstimate(0.5, 5, relative, relative, 1.0, relative)
    assert raw_truncation_length(estimate, 0.1) == 1
    assert raw_truncation_length(estimate, 0.1, first_length=3) == 5
    assert raw_truncation_length(estimate, 0.01, first_length=3) == 6  # none: W
