"""The alternatives to truncation are what they claim (docs/alternatives.md).

Exact RTRL equals full BPTT. ARTBP, UORO and KF-RTRL are unbiased: over G independent groups of
sequences (each group a batch, its own data and its own seed), the error of the estimate against
the group's full-BPTT gradient, d_g, averages to zero within a bound set by its own standard
error: ||mean d|| <= C * sqrt(sum ||d_g - mean d||^2 / (G (G - 1))). Truncated BPTT with K = 1
or 2 fails that bound on the same data (a delayed copy it cannot see across), so the test would
catch a biased estimator. Seeds are fixed: the outcome is deterministic.
"""

import io

import pytest
import torch
from conftest import load_example

from atbptt import TruncationController
from atbptt.estimators import (
    AdaptiveTruncation,
    Artbp,
    Carry,
    ElementwiseLstm,
    ExactRtrl,
    KfRtrl,
    TanhRnn,
    Truncated,
    Uoro,
    full_gradient,
    run_segments,
    sequence_gradient,
)
from atbptt.estimators.base import flatten, trainable

copy_task = load_example("copy_task")


def copy_lstm(vocabulary: int, hidden: int) -> torch.nn.Module:
    """The copy-task example's nn.LSTM model, one layer: UORO steps it generically."""
    return copy_task.CopyLstm(symbols=vocabulary, hidden=hidden, layers=1)


VOCABULARY, HIDDEN, DELAY = 4, 4, 3
GROUPS, SEQUENCES, LENGTH, SEGMENT = 16, 32, 10, 3
BOUND = 4.0  # a standard-normal error beyond 4 standard errors: probability 6e-5


def delayed_copy(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random symbols 1..V-1; the target at t is the input at t - DELAY (0 before that)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, VOCABULARY, (batch, length), generator=generator)
    targets = torch.zeros_like(inputs)
    targets[:, DELAY:] = inputs[:, :-DELAY]
    return inputs, targets


def make_model(kind, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return kind(VOCABULARY, HIDDEN).to(dtype)


def standard_errors_of_bias(make_estimator, model) -> float:
    """||mean d|| in units of its standard error, over GROUPS groups (see the module doc)."""
    errors = []
    for group in range(GROUPS):
        inputs, targets = delayed_copy(SEQUENCES, LENGTH, seed=1000 + group)
        normaliser = inputs.numel()
        exact = full_gradient(model, inputs, targets, normaliser)
        estimate = sequence_gradient(
            make_estimator(group), model, inputs, targets, SEGMENT, normaliser
        )
        errors.append(estimate - exact)
    errors = torch.stack(errors)  # G x P
    mean = errors.mean(0)
    standard_error = ((errors - mean).pow(2).sum() / (GROUPS * (GROUPS - 1))).sqrt()
    return float(mean.norm() / standard_error)


UNBIASED = [
    ("artbp", TanhRnn, lambda seed: Artbp(seed=seed)),
    ("artbp", ElementwiseLstm, lambda seed: Artbp(seed=seed)),
    ("uoro", TanhRnn, lambda seed: Uoro(seed=seed)),
    ("uoro", ElementwiseLstm, lambda seed: Uoro(seed=seed)),
    ("kf-rtrl", TanhRnn, lambda seed: KfRtrl(seed=seed)),
    ("uoro", copy_lstm, lambda seed: Uoro(seed=seed)),
]


@pytest.mark.parametrize(
    "make_estimator,kind",
    [(m, k) for _, k, m in UNBIASED],
    ids=[f"{n}-{k.__name__}" for n, k, _ in UNBIASED],
)
def test_unbiased_estimators_average_to_the_full_gradient(make_estimator, kind):
    assert standard_errors_of_bias(make_estimator, make_model(kind)) < BOUND


@pytest.mark.parametrize("kind", [TanhRnn, ElementwiseLstm], ids=lambda k: k.__name__)
@pytest.mark.parametrize("truncation_length", [1, 2])
def test_the_bound_catches_truncated_bptt(kind, truncation_length):
    ratio = standard_errors_of_bias(
        lambda seed: Truncated(truncation_length, "disjoint"), make_model(kind)
    )
    assert ratio > BOUND


@pytest.mark.parametrize("segment", [1, 3, 4, 10])
def test_exact_rtrl_equals_full_bptt(segment):
    model = make_model(ElementwiseLstm, dtype=torch.float32)
    inputs, targets = delayed_copy(5, 10, seed=7)
    exact = full_gradient(model, inputs, targets, inputs.numel())
    estimate = sequence_gradient(ExactRtrl(), model, inputs, targets, segment, inputs.numel())
    assert exact.norm() > 1e-3
    assert torch.allclose(estimate, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", [TanhRnn, ElementwiseLstm], ids=lambda k: k.__name__)
@pytest.mark.parametrize("style", ["overlap", "disjoint"])
def test_truncation_longer_than_the_sequence_is_full_bptt(kind, style):
    model = make_model(kind)
    inputs, targets = delayed_copy(3, 9, seed=3)
    exact = full_gradient(model, inputs, targets, inputs.numel())
    estimate = sequence_gradient(Truncated(9, style), model, inputs, targets, 9, inputs.numel())
    assert torch.allclose(estimate, exact, atol=1e-12, rtol=0)


def test_overlap_segments_backpropagate_through_k_steps():
    """Overlap TBPTT re-reads K - 1 inputs before each segment: closer to full BPTT than
    disjoint TBPTT at the same K."""
    model = make_model(TanhRnn)
    inputs, targets = delayed_copy(3, 12, seed=4)
    n = inputs.numel()
    overlap = sequence_gradient(Truncated(3, "overlap"), model, inputs, targets, 3, n)
    disjoint = sequence_gradient(Truncated(3, "disjoint"), model, inputs, targets, 3, n)
    exact = full_gradient(model, inputs, targets, n)
    assert (overlap - exact).norm() < (disjoint - exact).norm()


def test_adaptive_truncation_trains_at_the_controllers_k():
    controller = TruncationController(
        initial_length=4, min_length=2, max_length=8, target_bias=0.1, window=8, burnin=0,
        num_sequences=2, num_estimates=1, interval=1,
    )  # fmt: skip
    estimator = AdaptiveTruncation(controller)
    assert estimator.segment_length(99) == 4
    model = make_model(TanhRnn)
    inputs, targets = delayed_copy(2, 8, seed=5)
    fixed = sequence_gradient(Truncated(4), model, inputs, targets, 4, inputs.numel())
    adaptive = sequence_gradient(estimator, model, inputs, targets, 4, inputs.numel())
    assert torch.equal(fixed, adaptive)


@pytest.mark.parametrize(
    "make_estimator,kind",
    [
        (lambda: Uoro(seed=3), TanhRnn),
        (lambda: Uoro(seed=3), ElementwiseLstm),
        (lambda: KfRtrl(seed=3), TanhRnn),
        (lambda: ExactRtrl(), ElementwiseLstm),
        (lambda: Artbp(mean_length=3, seed=3), TanhRnn),
        (lambda: Truncated(3, "overlap"), TanhRnn),
    ],
    ids=["uoro-rnn", "uoro-elstm", "kf-rtrl", "exact-rtrl", "artbp", "tbptt-overlap"],
)
def test_resume_from_saved_carry_and_estimator_state_is_exact(make_estimator, kind):
    """Sensitivities and the generator travel through a weights-only checkpoint: a run stopped
    after two segments and resumed from the saved carry computes the same gradients."""
    model = make_model(kind)
    inputs, targets = delayed_copy(3, 12, seed=6)
    parameters = [p for _, p in trainable(model)]

    def segments(estimator, carry, start, stop):
        gradients = []
        for position in range(start, stop, 3):
            for parameter in parameters:
                parameter.grad = None
            length = estimator.segment_length(3)
            window = slice(position, position + length)
            _, carry = estimator.accumulate(model, inputs[:, window], targets[:, window], carry)
            gradients.append(flatten([p.grad for p in parameters], parameters))
        return gradients, carry

    reference = make_estimator()
    expected, _ = segments(reference, reference.start(model, 3), 0, 12)
    first = make_estimator()
    _, carry = segments(first, first.start(model, 3), 0, 6)
    buffer = io.BytesIO()
    torch.save({"estimator": first.state_dict(), "carry": carry.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_estimator()
    resumed.load_state_dict(saved["estimator"])
    continued, _ = segments(resumed, Carry.from_state_dict(saved["carry"]), 6, 12)
    for want, got in zip(expected[2:], continued):
        assert torch.equal(want, got)


def test_estimators_refuse_models_they_do_not_cover():
    with pytest.raises(TypeError, match="KF-RTRL"):
        KfRtrl().start(make_model(ElementwiseLstm), 2)
    with pytest.raises(TypeError, match="exact RTRL"):
        ExactRtrl().start(make_model(TanhRnn), 2)


def test_artbp_segment_lengths_are_geometric_with_the_mean_asked():
    estimator = Artbp(mean_length=5, seed=0)
    lengths = torch.tensor([estimator.segment_length(0) for _ in range(4000)], dtype=torch.float)
    assert lengths.min() >= 1
    assert abs(lengths.mean() - 5) < 0.25  # standard error ~0.07


def test_losses_are_the_segment_means():
    model = make_model(TanhRnn)
    inputs, targets = delayed_copy(2, 6, seed=8)
    losses = list(run_segments(Uoro(), model, inputs, targets, 3))
    logits, _ = model.run_window(inputs, model.zero_state(2), 0, 6)
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCABULARY), targets.reshape(-1), reduction="none"
    ).view(2, 6)
    assert losses == pytest.approx([float(expected[:, :3].mean()), float(expected[:, 3:].mean())])


@pytest.mark.parametrize(
    "make_estimator,kind",
    [
        (lambda: Uoro(seed=2), TanhRnn),
        (lambda: KfRtrl(seed=2), TanhRnn),
        (lambda: ExactRtrl(), ElementwiseLstm),
        (lambda: Artbp(seed=2), ElementwiseLstm),
    ],
    ids=["uoro", "kf-rtrl", "exact-rtrl", "artbp"],
)
def test_driver_trains_with_an_estimator_and_resumes_exactly(make_estimator, kind):
    """The plain-PyTorch driver serves segments to an estimator (segment.accumulate), carries
    its sensitivities across segments, restarts them with each pass, and saves them: a run
    interrupted after 5 updates and resumed from torch.save'd state ends with the same weights."""
    from atbptt import TbpttConfig, TbpttDriver

    inputs, targets = delayed_copy(1, 120, seed=9)
    config = TbpttConfig(truncation_length=4, updates_per_epoch=0)

    def train(model, driver, optimizer, updates):
        losses = []
        while driver.num_updates < updates:
            for segment in driver.segments(model, max_updates=updates):
                optimizer.zero_grad()
                losses.append(segment.accumulate(model))
                optimizer.step()
        return losses

    def fresh():
        model = make_model(kind)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        driver = TbpttDriver(inputs[0], 3, config, targets=targets[0], estimator=make_estimator())
        return model, driver, optimizer

    model, driver, optimizer = fresh()
    losses = train(model, driver, optimizer, 14)  # 10 segments a pass: crosses a pass start
    assert all(0 < loss < 10 for loss in losses)
    with pytest.raises(RuntimeError, match="accumulate"):
        driver.next_segment(model).loss(model)

    first, first_driver, first_optimizer = fresh()
    train(first, first_driver, first_optimizer, 5)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first.state_dict(),
            "optimizer": first_optimizer.state_dict(),
            "driver": first_driver.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_driver, resumed_optimizer = fresh()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_driver.load_state_dict(saved["driver"])
    train(resumed, resumed_driver, resumed_optimizer, 14)
    reference, reference_driver, reference_optimizer = fresh()
    train(reference, reference_driver, reference_optimizer, 14)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


@pytest.mark.parametrize("style", ["overlap", "disjoint"])
def test_truncated_bptt_is_an_estimator_of_the_loop(style):
    """The loop without an estimator trains by truncated BPTT through the estimator interface:
    segment.accumulate gives the gradient that segment.loss's backward gives, and the
    checkpoint keeps the bare carried state (no estimator part)."""
    from atbptt import TbpttConfig, TbpttDriver
    from atbptt.estimators import Truncation

    inputs, targets = delayed_copy(1, 60, seed=10)
    config = TbpttConfig(truncation_length=4, tbptt_style=style)
    drivers = [TbpttDriver(inputs[0], 3, config, targets=targets[0]) for _ in range(2)]
    models = [make_model(TanhRnn), make_model(TanhRnn)]
    assert isinstance(drivers[0].loop.estimator, Truncation)
    assert drivers[0].loop.estimator.style == style
    for _ in range(7):  # across a pass start (5 segments a pass)
        by_loss, by_accumulate = (d.next_segment(m) for d, m in zip(drivers, models))
        for model in models:
            model.zero_grad()
        by_loss.loss(models[0]).backward()
        by_accumulate.accumulate(models[1])
        gradients = [
            flatten([p.grad for p in m.parameters()], list(m.parameters())) for m in models
        ]
        assert gradients[0].norm() > 0
        assert torch.allclose(gradients[0], gradients[1], atol=1e-12, rtol=1e-10)
    saved = drivers[1].state_dict()
    assert saved["estimator"] is None and saved["estimator_carry"] is None
    assert torch.equal(saved["carried_state"][0], drivers[0].state_dict()["carried_state"][0])


def test_run_segments_keeps_a_short_remainder_a_segment_of_its_own():
    """The loop joins a remainder shorter than K/2 to the last segment; run_segments (the
    unbiasedness tests) keeps the estimator's own cuts."""
    model = make_model(TanhRnn)
    inputs, targets = delayed_copy(2, 10, seed=11)
    scored = []
    list(run_segments(Uoro(), model, inputs, targets, 3, on_segment=lambda *s: scored.append(s)))
    assert scored == [(0, 3), (3, 6), (6, 9), (9, 10)]
