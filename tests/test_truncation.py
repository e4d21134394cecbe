"""Unit tests of the truncation layer: gradient profile, bias estimate, choice of K, controller."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from atbptt import (
    GradientProfile,
    TruncationController,
    choose_truncation_length,
    estimate_bias,
    fit_decay_rate,
    measure_gradient_profile,
    measure_gradient_profile_naive,
    sample_windows,
)

# ---------------------------------------------------------------------------------------------
# Helpers


def geometric_profile(
    beta: float, window: int, scale: float = 2.5, dim: int = 3
) -> GradientProfile:
    """phi_k = scale * beta^k exactly; every mean gradient points the same way, so the exact
    cumulative norm equals the approximate one."""
    norms = scale * beta ** torch.arange(window, dtype=torch.float64)  # W
    direction = torch.ones(dim, dtype=torch.float64) / math.sqrt(dim)  # D, unit vector
    return GradientProfile(norms=norms, mean_gradients=norms[:, None] * direction, num_sequences=1)


def make_controller(**overrides) -> TruncationController:
    options = {
        "initial_length": 10,
        "min_length": 2,
        "max_length": 50,
        "target_bias": 0.1,
        "window": 100,
        "burnin": 10,
        "num_sequences": 4,
        "num_estimates": 3,
        "interval": 5,
        "estimate_method": "norms",  # the paper's controller, fed the profiles above
        "first_estimate": "scheduled",
    }
    options.update(overrides)
    return TruncationController(**options)


class TinyLSTMLM(nn.Module):
    """Embedding -> 2-layer LSTM -> linear readout, stepped one token at a time."""

    def __init__(self, vocab: int = 11, embed: int = 6, hidden: int = 8, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers)
        self.readout = nn.Linear(hidden, vocab)
        self.layers, self.hidden = layers, hidden

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.layers, batch, self.hidden)  # layers x B x H
        return torch.zeros(shape), torch.zeros(shape)

    def step(self, tokens, state):
        _, (h, c) = self.lstm(self.embed(tokens)[None], state)  # 1 x B x E in
        return self.readout(h[-1]), (h, c)  # logits from the returned state


def lstm_setup(num_sequences: int = 4, burnin: int = 3, window: int = 7):
    torch.manual_seed(0)
    model = TinyLSTMLM()
    inputs = torch.randint(0, 11, (num_sequences, burnin + window))  # S x (burnin + W)
    targets = torch.randint(0, 11, (num_sequences,))  # S
    return model, model.zero_state(num_sequences), inputs, targets, burnin


# ---------------------------------------------------------------------------------------------
# Decay rate, bias and choice of K: closed forms


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.95])
def test_fit_decay_rate_recovers_exact_geometric_rate(beta):
    assert fit_decay_rate(geometric_profile(beta, 2000).norms) == pytest.approx(beta, abs=1e-6)


def test_fit_decay_rate_drops_underflow_and_needs_two_points():
    norms = 0.8 ** torch.arange(10, dtype=torch.float64)
    norms[7:] = 0.0  # log = -inf: dropped
    norms[5] = math.exp(-60)  # log < -50: dropped
    assert fit_decay_rate(norms) == pytest.approx(0.8, abs=1e-9)
    assert math.isnan(fit_decay_rate(torch.tensor([1.0, 0.0, float("nan")])))


@pytest.mark.parametrize("cumulative", ["approx", "exact"])
@pytest.mark.parametrize(
    "beta, window, expected",
    [
        (0.9, 2000, {0.9: 2, 0.5: 7, 0.1: 22}),
        (0.95, 2000, {0.9: 3, 0.5: 14, 0.1: 45}),
        (0.95, 100, {0.1: 46}),  # the finite window lowers G_low
    ],
)
def test_choose_truncation_length_closed_form(cumulative, beta, window, expected):
    estimate = estimate_bias(geometric_profile(beta, window), cumulative=cumulative)
    assert estimate.decay_rate == pytest.approx(beta, abs=1e-6)
    for target, length in expected.items():
        # 0.9^1 == 0.9 is a tie; strictly below means K = 2 there.
        assert choose_truncation_length(estimate, target, 1, window) == length


def test_bias_estimate_geometric_closed_form():
    beta, window = 0.9, 2000
    estimate = estimate_bias(geometric_profile(beta, window, scale=1.0))
    lengths = torch.arange(1, window + 1, dtype=torch.float64)
    # E(K) = beta^K / (1 - beta) on both sides of the tail anchor tau (no double count at tau).
    assert estimate.tail_anchor == window - window // 10 - 1
    torch.testing.assert_close(estimate.absolute_bias, beta**lengths / (1 - beta))
    torch.testing.assert_close(estimate.cumulative_norm, (1 - beta**lengths) / (1 - beta))
    assert estimate.gradient_lower_bound == pytest.approx(1 / (1 - beta))
    torch.testing.assert_close(estimate.relative_bias, beta**lengths)


def test_exact_and_approx_cumulative_differ_when_gradients_cancel():
    norms = torch.ones(10, dtype=torch.float64)
    alternating = torch.tensor([[1.0], [-1.0]] * 5, dtype=torch.float64)  # W x 1
    profile = GradientProfile(norms=norms, mean_gradients=alternating, num_sequences=1)
    assert estimate_bias(profile, "approx").cumulative_norm[-1] == pytest.approx(10.0)
    assert estimate_bias(profile, "exact").cumulative_norm[-1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="cumulative"):
        estimate_bias(profile, "bogus")


def test_choose_truncation_length_clips_to_bounds():
    estimate = estimate_bias(geometric_profile(0.9, 2000))
    assert choose_truncation_length(estimate, 0.1, 30, 100) == 30
    assert choose_truncation_length(estimate, 0.1, 1, 10) == 10
    # nothing below the target: W, then clipped
    assert choose_truncation_length(estimate, 1e-300, 1, 5000) == 2000


def test_non_decaying_norms_give_max_length_and_warn(caplog):
    growing = GradientProfile(
        norms=1.05 ** torch.arange(50, dtype=torch.float64),
        mean_gradients=torch.zeros(50, 2, dtype=torch.float64),
        num_sequences=1,
    )
    estimate = estimate_bias(growing)
    assert estimate.decay_rate > 1
    with caplog.at_level(logging.WARNING):
        assert choose_truncation_length(estimate, 0.1, 2, 40) == 40
    assert "do not decay" in caplog.text


def test_unbounded_relative_bias_gives_max_length_and_warns(caplog):
    # decaying norms, but the exact cumulative norm is zero: no positive lower bound on the gradient
    profile = geometric_profile(0.9, 50)
    profile.mean_gradients = torch.zeros_like(profile.mean_gradients)
    estimate = estimate_bias(profile, "exact")
    assert estimate.gradient_lower_bound == 0.0
    with caplog.at_level(logging.WARNING):
        assert choose_truncation_length(estimate, 0.1, 2, 40) == 40
    assert "not finite" in caplog.text


# ---------------------------------------------------------------------------------------------
# Gradient profile


def test_linear_rnn_profile_decays_at_the_spectral_radius():
    torch.manual_seed(0)
    rho, hidden, vocab, num_sequences, burnin, window = 0.8, 6, 5, 8, 4, 25
    orthogonal, _ = torch.linalg.qr(torch.randn(hidden, hidden))
    recurrence = rho * orthogonal  # H x H, spectral radius rho
    embedding = torch.randn(vocab, hidden)  # V x H, the input map U applied to one-hot tokens
    readout = torch.randn(vocab, hidden)  # V x H

    def step(tokens, state):
        (h,) = state  # B x H
        next_h = h @ recurrence.T + embedding[tokens]
        return next_h @ readout.T, (next_h,)

    inputs = torch.randint(0, vocab, (num_sequences, burnin + window))
    targets = torch.randint(0, vocab, (num_sequences,))
    initial_state = (torch.zeros(num_sequences, hidden),)
    profile = measure_gradient_profile(step, initial_state, inputs, targets, burnin)
    assert profile.norms.shape == (window,)
    assert profile.mean_gradients.shape == (window, hidden)
    assert profile.num_sequences == num_sequences
    assert fit_decay_rate(profile.norms) == pytest.approx(rho, abs=1e-3)


def test_single_backward_matches_one_backward_per_lag():
    model, state, inputs, targets, burnin = lstm_setup()
    fast = measure_gradient_profile(model.step, state, inputs, targets, burnin, batch_dim=1)
    naive = measure_gradient_profile_naive(model.step, state, inputs, targets, burnin, batch_dim=1)
    window = inputs.shape[1] - burnin
    assert fast.mean_gradients.shape == (window, 2 * model.layers * model.hidden)
    torch.testing.assert_close(fast.norms, naive.norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.mean_gradients, naive.mean_gradients, atol=1e-5, rtol=1e-5)
    assert bool((fast.norms > 0).all())  # lag 0 included: the readout reaches the last state


def test_measurement_leaves_parameter_grads_and_initial_state_alone():
    model, state, inputs, targets, burnin = lstm_setup()
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    model.readout.bias.grad = None  # a None .grad must stay None
    grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state_before = tuple(tensor.clone() for tensor in state)
    measure_gradient_profile(model.step, state, inputs, targets, burnin, batch_dim=1)
    for parameter, before in zip(model.parameters(), grads_before):
        if before is None:
            assert parameter.grad is None
        else:
            assert torch.equal(parameter.grad, before)
    for tensor, before in zip(state, state_before):
        assert torch.equal(tensor, before)
        assert not tensor.requires_grad


def test_measurement_ignores_callers_no_grad_and_autocast():
    model, state, inputs, targets, burnin = lstm_setup()
    reference = measure_gradient_profile(model.step, state, inputs, targets, burnin, batch_dim=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inside = measure_gradient_profile(model.step, state, inputs, targets, burnin, batch_dim=1)
    assert inside.norms.dtype == torch.float32
    torch.testing.assert_close(inside.norms, reference.norms)


def test_sample_windows_shapes_range_and_determinism():
    stream = torch.arange(100)
    inputs, targets = stream, stream + 1  # target = next token
    windows, final_targets = sample_windows(
        inputs, targets, 16, 30, torch.Generator().manual_seed(3)
    )
    assert windows.shape == (16, 30) and final_targets.shape == (16,)
    offsets = windows[:, 0]
    assert bool(((offsets >= 0) & (offsets <= 70)).all())
    assert torch.equal(windows, offsets[:, None] + torch.arange(30))  # contiguous windows
    assert torch.equal(final_targets, windows[:, -1] + 1)
    again, again_targets = sample_windows(inputs, targets, 16, 30, torch.Generator().manual_seed(3))
    assert torch.equal(windows, again) and torch.equal(final_targets, again_targets)
    full, _ = sample_windows(inputs, targets, 4, 100, torch.Generator().manual_seed(0))
    assert torch.equal(full, stream.expand(4, 100))
    with pytest.raises(ValueError, match="does not fit"):
        sample_windows(inputs, targets, 4, 101, torch.Generator())


# ---------------------------------------------------------------------------------------------
# Controller


def measuring(*betas: float, window: int = 100):
    """A measure() callable returning geometric profiles with the given rates in turn."""
    profiles = iter([geometric_profile(beta, window) for beta in betas])
    return lambda: next(profiles)


def test_controller_schedule():
    controller = make_controller(interval=5)
    assert [n for n in range(16) if controller.is_due(n)] == [5, 10, 15]
    controller.estimate(measuring(0.9, 0.9, 0.9), num_updates=10)
    assert not controller.is_due(10)  # already estimated at this update
    assert controller.is_due(15)


def test_controller_estimates_before_the_first_update_only_when_asked():
    assert not make_controller(interval=5).is_due(0)  # the paper's schedule: train at K0 first
    controller = make_controller(interval=5, first_estimate="start")
    assert controller.is_due(0)
    decision = controller.estimate(measuring(0.9, 0.9, 0.9), num_updates=0)
    assert decision.truncation_length == 22  # beta 0.9, delta 0.1 (DESIGN.md section 3)
    assert not controller.is_due(0)  # a retried first update does not estimate again
    assert [n for n in range(1, 11) if controller.is_due(n)] == [5, 10]
    resumed = make_controller(interval=5, first_estimate="start")
    resumed.load_state_dict(controller.state_dict())
    assert not resumed.is_due(0)


def test_controller_budget_schedule_counts_training_tokens():
    # one decision: R 3 x S 4 x (burn-in 10 + W 100) = 1320 tokens; budget 0.1: every 13200
    controller = make_controller(interval=0, budget=0.1)
    assert controller.estimate_tokens == 1320
    assert controller.tokens_between_estimates == 13_200
    update = 0
    due = []
    for tokens_per_update in [1000] * 20 + [3000] * 10:  # K grows: updates cost more tokens
        update += 1
        if controller.is_due(update):
            due.append(update)
            controller.estimate(measuring(0.9, 0.9, 0.9), num_updates=update)
        assert not controller.is_due(update)  # once per update
        controller.record_tokens(tokens_per_update)
    # due once >= 13.2k tokens: 14 x 1000 (at 15); 6 x 1000 + 3 x 3000 (at 24); 5 x 3000 (at 29)
    assert due == [15, 24, 29]
    assert controller.state_dict()["tokens_since_estimate"] == 2 * 3000


def test_controller_budget_schedule_resumes_mid_interval():
    controller = make_controller(interval=0, budget=0.5)  # every 2640 tokens
    controller.record_tokens(2000)
    restored = make_controller(interval=0, budget=0.5)
    restored.load_state_dict(controller.state_dict())
    assert not restored.is_due(7)
    restored.record_tokens(640)
    assert restored.is_due(8)
    legacy = dict(controller.state_dict())
    del legacy["tokens_since_estimate"]  # a checkpoint of an earlier version
    make_controller(interval=0, budget=0.5).load_state_dict(legacy)


def test_controller_adapts_to_mean_of_choices():
    controller = make_controller(target_bias=0.1, num_estimates=3)
    # choices: 0.9 -> 22, 0.95 -> 46, 0.9 -> 22 (W = 100); int(mean) = 30
    decision = controller.estimate(measuring(0.9, 0.95, 0.9), num_updates=5)
    assert decision.truncation_length == controller.truncation_length == 30
    assert decision.changed
    assert decision.decay_rate == pytest.approx((0.9 + 0.95 + 0.9) / 3, abs=1e-6)
    # delta_hat(K) = beta^K / (1 - 2 beta^W): the lower bound G_low is reached at K = W
    expected_bias = [beta**30 / (1 - 2 * beta**100) for beta in (0.9, 0.95, 0.9)]
    assert decision.relative_bias == pytest.approx(sum(expected_bias) / 3, rel=1e-6)
    assert decision.seconds >= 0
    assert controller.last_decision == decision
    same = controller.estimate(measuring(0.9, 0.95, 0.9), num_updates=10)
    assert same.truncation_length == 30 and not same.changed


def test_controller_clips_to_bounds():
    controller = make_controller(min_length=2, max_length=20, num_estimates=1)
    assert controller.estimate(measuring(0.95), 5).truncation_length == 20
    assert controller.estimate(measuring(0.3), 10).truncation_length == 2


def test_controller_monitor_mode_keeps_length_and_reports_bias():
    controller = make_controller(target_bias=None, initial_length=10, num_estimates=2)
    assert not controller.adaptive
    decision = controller.estimate(measuring(0.9, 0.9), 5)
    assert decision.truncation_length == 10 and not decision.changed
    assert decision.relative_bias == pytest.approx(0.9**10, rel=1e-3)


def test_controller_keeps_length_on_non_finite_profile(caplog):
    controller = make_controller(initial_length=10, num_estimates=2)
    broken = geometric_profile(0.9, 100)
    broken.norms[3] = float("nan")
    profiles = iter([geometric_profile(0.9, 100), broken])
    with caplog.at_level(logging.WARNING):
        decision = controller.estimate(lambda: next(profiles), 5)
    assert controller.truncation_length == 10
    assert decision.truncation_length == 10 and not decision.changed
    assert math.isnan(decision.relative_bias) and math.isnan(decision.decay_rate)
    assert "not finite" in caplog.text
    assert not controller.is_due(5)


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"target_bias": 0.0}, "target_bias"),
        ({"target_bias": 1.0}, "target_bias"),
        ({"min_length": 0}, "min_length"),
        ({"initial_length": 1}, "initial_length"),
        ({"initial_length": 60}, "initial_length"),
        ({"window": 40}, "window"),
        ({"interval": -1}, "interval"),
        ({"interval": 0, "budget": 0.0}, "budget"),
        ({"interval": 0, "budget": 1.5}, "budget"),
        ({"num_estimates": 0}, "num_estimates"),
        ({"num_sequences": 0}, "num_sequences"),
        ({"burnin": -1}, "burnin"),
        ({"cumulative": "bogus"}, "cumulative"),
        ({"max_change": 1.0}, "max_change"),
        ({"max_change": math.inf}, "max_change"),
        ({"max_change": math.nan}, "max_change"),
    ],
)
def test_controller_rejects_invalid_options(overrides, option):
    with pytest.raises(ValueError, match=option):
        make_controller(**overrides)


def test_controller_state_dict_round_trip(tmp_path):
    controller = make_controller(num_estimates=1)
    controller.estimate(measuring(0.9), num_updates=5)
    state = controller.state_dict()
    path = tmp_path / "controller.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded == state

    restored = make_controller(num_estimates=1)
    restored.load_state_dict(loaded)
    assert restored.truncation_length == controller.truncation_length == 22
    assert restored.last_decision == controller.last_decision
    assert not restored.is_due(5) and restored.is_due(10)

    monitor = make_controller(target_bias=None, initial_length=12)
    monitor.load_state_dict(loaded)
    assert monitor.truncation_length == 12  # monitor mode: the configured K wins

    fresh = make_controller()
    fresh.load_state_dict(fresh.state_dict())  # before any estimate: no decision yet
    assert fresh.last_decision is None and fresh.truncation_length == 10


def test_readout_of_the_final_state_gives_the_same_profile():
    """A step without an output layer plus a final readout equals reading out every step."""
    torch.manual_seed(3)
    embedding, lstm, output = torch.nn.Embedding(7, 5), torch.nn.LSTM(5, 6), torch.nn.Linear(6, 7)

    def advance(tokens, state):
        _, next_state = lstm(embedding(tokens)[None], state)
        return next_state

    def readout(state):
        return output(state[0][-1])

    def step(tokens, state):
        next_state = advance(tokens, state)
        return readout(next_state), next_state

    inputs, targets = torch.randint(0, 7, (4, 12)), torch.randint(0, 7, (4,))
    state = (torch.zeros(1, 4, 6), torch.zeros(1, 4, 6))
    full = measure_gradient_profile(step, state, inputs, targets, burnin=2, batch_dim=1)
    lean = measure_gradient_profile(
        lambda t, s: (None, advance(t, s)), state, inputs, targets, 2, batch_dim=1, readout=readout
    )
    torch.testing.assert_close(full.norms, lean.norms)
    torch.testing.assert_close(full.mean_gradients, lean.mean_gradients)


def test_controller_clips_once_after_averaging_raw_choices():
    """The authors' rule: K = clip(int(mean of the R raw choices)), not the mean of clipped ones."""
    beta_7 = 0.1 ** (1 / 6.5)  # raw choice 7 at delta 0.1
    beta_40 = 0.1 ** (1 / 39.5)  # raw choice 40
    controller = make_controller(min_length=10, max_length=60, num_estimates=5, initial_length=20)
    decision = controller.estimate(measuring(beta_7, beta_7, beta_7, beta_7, beta_40), 5)
    assert decision.truncation_length == 13  # int((4 x 7 + 40) / 5); clipped first it was 16
    assert decision.fallback == ""


def test_controller_bounds_each_move_of_k_and_says_why():
    """max_change f keeps one decision within [ceil(K / f), floor(K x f)] of the K in force, then
    clips to [K_min, K_max]; every decision records its raw choice and the reason for K."""
    controller = make_controller(
        initial_length=40, min_length=2, max_length=50, num_estimates=1, max_change=2.0
    )
    down = controller.estimate(measuring(0.3), 5)  # raw choice 2 at delta 0.1
    assert (down.truncation_length, down.raw_choice) == (20, 2)
    assert "was 2: moved at most x2 from K" in down.reason
    assert controller.estimate(measuring(0.3), 10).truncation_length == 10
    up = controller.estimate(measuring(0.99), 15)  # raw choice far above K_max
    assert up.truncation_length == 20 and "moved at most x2" in up.reason
    kept = controller.estimate(measuring(0.9), 20)  # raw choice 22 lies within [10, 40]
    assert (kept.truncation_length, kept.raw_choice) == (22, 22)
    assert kept.reason == "mean of 1 smallest K with bias_hat < 0.1"
    free = make_controller(initial_length=30, min_length=30, num_estimates=1).estimate(
        measuring(0.3), 5
    )
    assert free.truncation_length == 30 and "was 2: raised to K_min" in free.reason
    monitored = make_controller(target_bias=None, num_estimates=1).estimate(measuring(0.3), 5)
    assert monitored.raw_choice == 0 and monitored.reason == "fixed K: bias monitored only"


def test_controller_counts_an_unbounded_repeat_as_max_length_and_says_so(caplog):
    flat = GradientProfile(
        norms=torch.ones(100, dtype=torch.float64),
        mean_gradients=torch.ones(100, 2, dtype=torch.float64),
        num_sequences=1,
    )
    profiles = iter([geometric_profile(0.9, 100), flat])
    controller = make_controller(min_length=2, max_length=50, num_estimates=2)
    with caplog.at_level(logging.WARNING):
        decision = controller.estimate(lambda: next(profiles), 5)
    assert decision.truncation_length == int((22 + 50) / 2)
    assert "1 of 2 estimates" in decision.fallback and "do not decay" in decision.fallback
    assert "K_max 50" in decision.fallback and "K_max 50" in caplog.text


def readout_dominated_profile(window: int, beta: float = 0.9) -> GradientProfile:
    """phi_0 (the readout's gradient) far above a geometric tail from lag 1 on."""
    profile = geometric_profile(beta, window)
    profile.norms[0] = 50.0
    profile.mean_gradients[0] *= 50.0 / float(profile.mean_gradients[0].norm())
    return profile


def test_lag_origin_previous_drops_the_readout_gradient():
    final = make_controller(num_estimates=1, max_length=100, lag_origin="final")
    previous = make_controller(num_estimates=1, max_length=100, lag_origin="previous")
    assert final.measured_steps == 100 and previous.measured_steps == 101
    assert previous.estimate_tokens == final.estimate_tokens + previous.num_sequences
    k_final = final.estimate(lambda: readout_dominated_profile(100), 5).truncation_length
    k_previous = previous.estimate(lambda: readout_dominated_profile(101), 5).truncation_length
    # from lag 1 on the profile is 2.5 * 0.9^k: the authors' origin sees phi_k = 2.25 * 0.9^k,
    # so K = 22 as for a pure geometric profile; phi_0 = 50 in the denominator gives a smaller K
    assert k_previous == 22
    assert k_final < k_previous
    with pytest.raises(ValueError, match="101 steps"):
        previous.estimate(lambda: readout_dominated_profile(100), 10)


def test_controller_passes_its_tail_anchor_to_the_estimate():
    profile = geometric_profile(0.9, 100)
    profile.norms[60:] *= 3.0  # a bump the anchor position decides about
    anchored = make_controller(num_estimates=1, target_bias=None, initial_length=30, tail_anchor=79)
    decision = anchored.estimate(lambda: profile, 5)
    expected = estimate_bias(profile, "approx", tail_anchor=79).relative_bias[29]
    default = estimate_bias(profile, "approx").relative_bias[29]
    assert decision.relative_bias == pytest.approx(float(expected))
    assert float(expected) != pytest.approx(float(default))
    with pytest.raises(ValueError, match="tail_anchor"):
        make_controller(tail_anchor=100)


def test_the_controller_and_the_options_share_one_check():
    """The controller's arguments are checked by the options' one check (atbptt.config), in
    the controller's names; the options' messages name the options (a front end's flags)."""
    from atbptt.config import TbpttConfig, check_config

    with pytest.raises(ValueError, match=r"tail_anchor must lie in \[0, window\) = \[0, 100\)"):
        make_controller(tail_anchor=100)
    with pytest.raises(ValueError, match="num_estimates must be at least 2"):
        make_controller(bias_relative_to="update", estimate_method="in-window", num_estimates=1)
    flag = "--{}".format
    with pytest.raises(ValueError, match=r"--estimate_tail_anchor must lie in \[0, --estimate_w"):
        check_config(TbpttConfig(estimate_tail_anchor=400), flag)
    with pytest.raises(ValueError, match="--bias_relative_to update needs .* --estimate_method"):
        check_config(TbpttConfig(bias_relative_to="update", estimate_method="norms"), flag)
    with pytest.raises(ValueError, match="--estimate_repeats must be at least 2"):
        check_config(
            TbpttConfig(bias_relative_to="update", estimate_method="in-window", estimate_repeats=1),
            flag,
        )
