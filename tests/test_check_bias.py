"""Ground truth of the bias estimate (atbptt/ground_truth.py) and scripts/check_bias.py.

Closed forms on a diagonal linear RNN, the bucketed one-backward path against one backward per K
on a tiny LSTM, and the script end to end on a checkpoint trained by fairseq-train.
"""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_TRAIN, PickledCommand, flip_bit_in_member, run_cli
from torch import nn

from atbptt import (
    delta_hat_on_grid,
    first_lags,
    measure_true_bias,
    sample_windows,
)


class DiagonalLinearRnn(nn.Module):
    """h_t = a * h_{t-1} + b * x_t (elementwise), logits = W h_t + c; x_t a fixed embedding."""

    def __init__(self, decay: list[float], gain: list[float], vocabulary: int = 3) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        size = len(decay)
        self.decay = nn.Parameter(torch.tensor(decay, dtype=torch.float64))
        self.gain = nn.Parameter(torch.tensor(gain, dtype=torch.float64))
        self.register_buffer(
            "embedding", torch.randn(vocabulary, size, generator=generator).double()
        )
        self.output_weight = nn.Parameter(
            torch.randn(vocabulary, size, generator=generator).double()
        )
        self.output_bias = nn.Parameter(torch.randn(vocabulary, generator=generator).double())

    def zero_state(self, batch_size: int):
        return (torch.zeros(batch_size, self.decay.numel(), dtype=torch.float64),)

    def advance(self, tokens, state):
        return (self.decay * state[0] + self.gain * self.embedding[tokens],)

    def readout(self, state):
        return F.linear(state[0], self.output_weight, self.output_bias)


def constant_stream(length: int = 3000):
    """Input token 0 and target token 1 everywhere: the state is stationary after the burn-in."""
    return torch.zeros(length, dtype=torch.long), torch.ones(length, dtype=torch.long)


def linear_closed_form(model: DiagonalLinearRnn, window: int):
    """Stationary state h*, dL/dh_s = v and the output-error e of the constant stream."""
    a, b = model.decay.detach(), model.gain.detach()
    x = model.embedding[0]
    stationary = b * x / (1 - a)
    probabilities = torch.softmax(
        model.output_weight.detach() @ stationary + model.output_bias.detach(), 0
    )
    error = probabilities - F.one_hot(torch.tensor(1), 3).double()
    v = model.output_weight.detach().t() @ error
    return a, x, stationary, error, v


GRID = [1, 2, 4, 8, 16]
WINDOW = 40
BURNIN = 400  # 0.9^400: the state is at its stationary value to double precision


def test_true_bias_of_linear_rnn_matches_closed_form():
    model = DiagonalLinearRnn([0.9, 0.6], [0.5, -1.0])
    inputs, targets = constant_stream()
    truth = measure_true_bias(
        model, inputs, targets, GRID, WINDOW, BURNIN, num_sequences=4,
        generator=torch.Generator().manual_seed(1), num_groups=2,
    )  # fmt: skip
    a, x, h, error, v = linear_closed_form(model, WINDOW)
    L = WINDOW
    full_recurrent = torch.cat([v * h * (1 - a**L) / (1 - a), v * x * (1 - a**L) / (1 - a)])
    readout = torch.cat([torch.outer(error, h).reshape(-1), error])
    full_norm = torch.cat([full_recurrent, readout]).norm()
    for index, K in enumerate(GRID):
        # final-step loss: the steps beyond lag K carry v a^j times h* (for a) or x (for b)
        bias = torch.cat([v * h * (a**K - a**L) / (1 - a), v * x * (a**K - a**L) / (1 - a)])
        expected = float(bias.norm() / full_norm)
        assert truth.final_step.relative_bias[index] == pytest.approx(expected, rel=1e-5)
        # overlap loss: position at lag j keeps 2K-1-j steps when truncated, L-j when not
        lags = torch.arange(K, dtype=torch.float64)[:, None]
        kept_full = ((1 - a ** (L - lags)) / (1 - a)).mean(0)
        lost = ((a ** (2 * K - 1 - lags) - a ** (L - lags)) / (1 - a)).mean(0)
        window_full = torch.cat([v * h * kept_full, v * x * kept_full, readout])
        window_bias = torch.cat([v * h * lost, v * x * lost])
        expected = float(window_bias.norm() / window_full.norm())
        assert truth.training_window.relative_bias[index] == pytest.approx(expected, rel=1e-5)
    # identical windows: no noise, so the debiased ratio is the plain one and the spread is zero
    torch.testing.assert_close(truth.final_step.debiased, truth.final_step.relative_bias)
    assert float(truth.final_step.bootstrap_std.max()) < 1e-9
    assert float(truth.final_step.noise_floor.max()) < 1e-6


def test_recurrent_parameter_alone_and_delta_hat_of_scalar_rnn():
    """Scalar RNN, only a trained: true bias (a^K - a^L) / (1 - a^L); the profile phi_k = |v| a^k
    is geometric, so delta_hat(K) = a^K / (1 - 2 a^W) under both lag conventions."""
    a = 0.9
    model = DiagonalLinearRnn([a], [0.5])
    for name in ("gain", "output_weight", "output_bias"):
        getattr(model, name).requires_grad_(False)
    inputs, targets = constant_stream()
    truth = measure_true_bias(
        model, inputs, targets, GRID, WINDOW, BURNIN, num_sequences=2,
        generator=torch.Generator().manual_seed(2), num_groups=1,
    )  # fmt: skip
    expected = torch.tensor([(a**K - a**WINDOW) / (1 - a**WINDOW) for K in GRID])
    torch.testing.assert_close(truth.final_step.relative_bias, expected.double(), rtol=1e-5, atol=0)
    assert truth.profile.norms.numel() == WINDOW + 1
    estimate_window = 30
    grid = [*GRID, 35]  # 35 > W: the geometric tail is continued
    final, _ = delta_hat_on_grid(first_lags(truth.profile, estimate_window), grid)
    previous, _ = delta_hat_on_grid(
        first_lags(truth.profile.without_readout_lag(), estimate_window), grid
    )
    closed = torch.tensor([a**K / (1 - 2 * a**estimate_window) for K in grid], dtype=torch.float64)
    torch.testing.assert_close(final, closed, rtol=1e-5, atol=0)
    torch.testing.assert_close(previous, closed, rtol=1e-5, atol=0)


class TinyLstm(nn.Module):
    """A tied one-layer LSTM LM with the stateful protocol (state batch-first)."""

    def __init__(self, vocabulary: int = 7, size: int = 6) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embedding = nn.Embedding(vocabulary, size)
        self.cell = nn.LSTMCell(size, size)
        self.output_weight = self.embedding.weight  # tied, as the fairseq model's
        self.output_bias = nn.Parameter(torch.randn(vocabulary) * 0.1)
        with torch.no_grad():
            self.cell.weight_hh.mul_(3.0)  # a longer memory, so biases stay visible at K = 8

    def zero_state(self, batch_size: int):
        zeros = torch.zeros(batch_size, self.cell.hidden_size)
        return zeros, zeros.clone()

    def advance(self, tokens, state):
        return self.cell(self.embedding(tokens), state)

    def readout(self, state):
        return F.linear(state[0], self.output_weight, self.output_bias)


def naive_gradient(model, windows, targets, burnin, cut_lag, scored):
    """Mean loss gradient with the state detached ``cut_lag`` steps before the end (None: not)."""
    window = windows.shape[1] - burnin
    state = model.zero_state(windows.shape[0])
    with torch.no_grad():
        for position in range(burnin):
            state = model.advance(windows[:, position], state)
    states = []
    for position in range(window):
        if cut_lag is not None and position == window - cut_lag:
            state = tuple(tensor.detach() for tensor in state)
        state = model.advance(windows[:, burnin + position], state)
        states.append(state)
    losses = [
        F.cross_entropy(model.readout(state), targets[:, burnin + window - scored + i])
        for i, state in enumerate(states[-scored:])
    ]
    parameters = list(model.parameters())
    gradients = torch.autograd.grad(torch.stack(losses).mean(), parameters)
    return torch.cat([gradient.reshape(-1) for gradient in gradients]).double()


def test_bucketed_path_equals_one_backward_per_length_on_tiny_lstm():
    model = TinyLstm()
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 7, (500,), generator=generator)
    targets = torch.roll(inputs, -3)  # predict the token 3 steps ahead: needs memory
    grid, window, burnin, sequences = [1, 2, 3, 5, 8], 20, 4, 6
    truth = measure_true_bias(
        model, inputs, targets, grid, window, burnin, sequences,
        generator=torch.Generator().manual_seed(7), num_groups=3,
    )  # fmt: skip
    positions, _ = sample_windows(
        torch.arange(500), torch.arange(500), sequences, burnin + window,
        torch.Generator().manual_seed(7),
    )  # fmt: skip
    windows, window_targets = inputs[positions], targets[positions]
    full = naive_gradient(model, windows, window_targets, burnin, None, 1)
    for index, K in enumerate(grid):
        truncated = naive_gradient(model, windows, window_targets, burnin, K, 1)
        expected = float((full - truncated).norm() / full.norm())
        assert truth.final_step.relative_bias[index] == pytest.approx(expected, rel=1e-5)
        window_full = naive_gradient(model, windows, window_targets, burnin, None, K)
        window_cut = naive_gradient(model, windows, window_targets, burnin, 2 * K - 1, K)
        expected = float((window_full - window_cut).norm() / window_full.norm())
        assert truth.training_window.relative_bias[index] == pytest.approx(expected, rel=1e-5)
    assert bool((truth.final_step.bootstrap_std > 0).all())
    assert not any(p.grad is not None for p in model.parameters())  # .grad untouched


def test_noise_statistics_from_per_window_gradients():
    """With one window per group, the debiased ratio and the noise floor follow from the S
    per-window gradients: cross terms only, and the standard error of the mean."""
    model = TinyLstm()
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 7, (300,), generator=generator)
    targets = torch.where(inputs < 5, 3, torch.roll(inputs, -2))  # a clear mean gradient
    K, window, burnin, sequences = 2, 6, 2, 5
    truth = measure_true_bias(
        model, inputs, targets, [K], window, burnin, sequences,
        generator=torch.Generator().manual_seed(9), num_groups=sequences,
    )  # fmt: skip
    positions, _ = sample_windows(
        torch.arange(300), torch.arange(300), sequences, burnin + window,
        torch.Generator().manual_seed(9),
    )  # fmt: skip
    windows, window_targets = inputs[positions], targets[positions]
    full, bias = [], []
    for i in range(sequences):
        row = slice(i, i + 1)
        g = naive_gradient(model, windows[row], window_targets[row], burnin, None, 1)
        full.append(g)
        bias.append(g - naive_gradient(model, windows[row], window_targets[row], burnin, K, 1))
    full, bias = torch.stack(full), torch.stack(bias)  # S x P

    def cross_terms(x):
        return (x.sum(0).square().sum() - x.square().sum()) / (sequences * (sequences - 1))

    assert float(cross_terms(bias)) > 0 and float(cross_terms(full)) > 0
    debiased = math.sqrt(float(cross_terms(bias)) / float(cross_terms(full)))
    floor = math.sqrt(
        float((bias - bias.mean(0)).square().sum()) / (sequences * (sequences - 1))
    ) / float(full.mean(0).norm())
    assert float(truth.final_step.debiased[0]) == pytest.approx(debiased, rel=1e-4)
    assert float(truth.final_step.noise_floor[0]) == pytest.approx(floor, rel=1e-4)


def test_bad_arguments():
    model = TinyLstm()
    inputs = torch.zeros(200, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="2 K_max - 1"):
        measure_true_bias(model, inputs, inputs, [8], 10, 2, 2, generator, num_groups=1)
    with pytest.raises(ValueError, match="multiple of num_groups"):
        measure_true_bias(model, inputs, inputs, [2], 10, 2, 3, generator, num_groups=2)
    with pytest.raises(ValueError, match="burnin"):
        measure_true_bias(model, inputs, inputs, [2], 10, 0, 2, generator, num_groups=1)


def run_check_bias(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra_env)
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_bias.py"), *args],
        check=False, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("check_bias")
    run_cli(
        "fairseq-train", str(tiny_corpus), *TINY_TRAIN, "--truncation-length", "4",
        "--batch-size", "4", "--cpu", "--max-update", "30", "--save-dir", str(save_dir),
        "--no-epoch-checkpoints", "--no-progress-bar",
    )  # fmt: skip
    return tiny_corpus, save_dir / "checkpoint_last.pt"


@pytest.mark.e2e
def test_check_bias_script_end_to_end(tiny_checkpoint, tmp_path):
    data, checkpoint = tiny_checkpoint
    out = tmp_path / "out"
    result = run_check_bias(
        str(checkpoint), "--data", str(data), "--out", str(out), "--k-grid", "1,2,4",
        "--window", "12", "--burnin", "3", "--windows", "4", "--groups", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "L = 12" in result.stdout and "W = 12" in result.stdout  # W clipped to L
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 3 + 2 + 3  # two header rows each, 3 K, 3 deltas
    with (out / "bias_check.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["K"]) for row in rows] == [1, 2, 4]
    for row in rows:
        for key in ("true_bias_final", "true_bias_window", "delta_hat_final", "delta_hat_previous"):
            assert math.isfinite(float(row[key])) and float(row[key]) >= 0, (key, row)
    truth = [float(row["true_bias_final"]) for row in rows]
    assert truth == sorted(truth, reverse=True)  # keeping more steps loses less
    assert (out / "bias_check.png").stat().st_size > 1000
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # no temporaries
    # progress while it measures, and no library's debug logging
    assert "[check_bias] group 1/2 of windows measured" in result.stderr, result.stderr[-3000:]
    assert "[check_bias] group 2/2 of windows measured" in result.stderr
    assert "DEBUG" not in result.stderr, result.stderr[-3000:]


@pytest.mark.e2e
def test_check_bias_script_bad_input(tiny_checkpoint, tmp_path):
    data, checkpoint = tiny_checkpoint
    out = tmp_path / "out"
    cases = [
        ((str(tmp_path / "missing.pt"), "--data", str(data)), "does not exist"),
        ((str(checkpoint), "--data", str(tmp_path)), "holds no dict.txt"),
        ((str(checkpoint), "--data", str(data), "--k-grid", "1,8", "--window", "12"), "2K - 1"),
        ((str(checkpoint), "--data", str(data), "--windows", "5"), "multiple of --groups"),
    ]
    flipped = tmp_path / "flipped.pt"
    member = flip_bit_in_member(checkpoint, flipped, "data/1")
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({**torch.load(checkpoint, weights_only=True), "x": PickledCommand(marker)}, evil)
    cases += [
        ((str(flipped), "--data", str(data)), f"{flipped} is corrupt: {member} fails its CRC-32"),
        ((str(evil), "--data", str(data)), f"refusing to load checkpoint {evil}"),
    ]
    for args, message in cases:
        result = run_check_bias(*args, "--out", str(out), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and lines[-1].startswith("error: "), result.stderr[-2000:]
        assert message in lines[-1]
    assert not out.exists() and not marker.exists()


@pytest.mark.e2e
def test_check_bias_refuses_an_out_file_and_numbers_out_of_range(tiny_checkpoint, tmp_path):
    data, checkpoint = tiny_checkpoint
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    common = (str(checkpoint), "--data", str(data))
    # --out: checked before the model is loaded (it failed with FileExistsError after the work)
    for out, message in [
        (a_file, f"--out {a_file} is a file"),
        (a_file / "sub", f"--out {a_file / 'sub'} lies below the file {a_file}"),
    ]:
        result = run_check_bias(*common, "--out", str(out))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and lines[-1].startswith("error: "), result.stderr[-2000:]
        assert message in lines[-1]
    assert a_file.read_text() == "mine"
    # numbers out of range: argparse's one line, exit status 2 (--bootstrap -3 ran to nan columns)
    out = tmp_path / "out"
    for option, value, message in [
        ("--bootstrap", "-3", "must be 0 (none) or at least 2 (got -3)"),
        ("--bootstrap", "1", "must be 0 (none) or at least 2 (got 1)"),
        ("--windows", "0", "must be at least 1 (got 0)"),
        ("--groups", "-2", "must be at least 1 (got -2)"),
        ("--window", "-5", "must be at least 0 (got -5)"),
        ("--burnin", "-1", "must be at least 0 (got -1)"),
        ("--estimate-window", "-4", "must be at least 0 (got -4)"),
        ("--tail-anchor", "-3", "must be at least -2 (got -3)"),
        ("--tail-fit-from", "-2", "must be at least -1 (got -2)"),
        ("--threads", "-1", "must be at least 0 (got -1)"),
    ]:
        result = run_check_bias(*common, "--out", str(out), option, value)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and f"argument {option}: {message}" in last, result.stderr
    assert not out.exists()
