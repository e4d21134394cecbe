"""The copy task trained with adaptive TBPTT in a plain PyTorch loop (``atbptt.TbpttDriver``).

    python examples/copy_task.py --updates 2000
    python examples/copy_task.py --updates 4000 --resume copy.pt --save copy.pt

The paper's copy-task model and settings (configs/copy_adaptive.yaml): a 2-layer LSTM of 50 units,
SGD at lr 1.0 x sqrt(K), weight decay 1e-5, gradient clipped at 1.0 / K, K0 = 15, W = 100, K in
[2, 100], delta 0.1. ``--save PATH`` writes model, optimizer and driver after every pass,
``--resume PATH`` continues from such a file exactly; it is verified before it is unpickled
(``atbptt.load_checkpoint``): a damaged or unsafe file ends in one line ``error: ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import random

import torch
from torch import Tensor, nn

from atbptt import CheckpointError, TbpttConfig, TbpttDriver, evaluate_stream, load_checkpoint

BLANK, START, DATA = 0, 1, (2, 3, 4, 5)  # the 6 symbols of scripts/prepare_copy_task.py


def copy_stream(length: int, min_m: int, max_m: int, seed: int) -> tuple[Tensor, Tensor]:
    """Blocks [#, m-1 symbols, m blanks] and their targets, the block shifted right by m."""
    rng = random.Random(seed)
    inputs: list[int] = []
    targets: list[int] = []
    while len(inputs) < length:
        m = rng.randint(min_m, max_m)
        data = [rng.choice(DATA) for _ in range(m - 1)]
        inputs += [START] + data + [BLANK] * m
        targets += [BLANK] * m + [START] + data
    return torch.tensor(inputs[:length]), torch.tensor(targets[:length])


class CopyLstm(nn.Module):
    """Embedding, stacked LSTM, linear output: an ``atbptt.RecurrentModel``."""

    state_batch_dim = 1  # (h, c) are layers x B x H

    def __init__(self, symbols: int = 6, hidden: int = 50, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(symbols, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.output = nn.Linear(hidden, symbols)

    def zero_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        shape = (self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        return self.output.weight.new_zeros(shape), self.output.weight.new_zeros(shape)

    def advance(self, tokens: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return self.lstm(self.embed(tokens)[:, None], state)[1]

    def readout(self, state: tuple[Tensor, Tensor]) -> Tensor:
        return self.output(state[0][-1])

    def run_window(self, tokens, state, output_start: int, carry_offset: int):
        x = self.embed(tokens)  # B x T x H
        head, carried = self.lstm(x[:, :carry_offset], state) if carry_offset else (x[:, :0], state)
        tail = self.lstm(x[:, carry_offset:], carried)[0] if carry_offset < x.size(1) else x[:, :0]
        return self.output(torch.cat([head, tail], 1)[:, output_start:]), carried


def save(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, driver: TbpttDriver
) -> None:
    """Model, optimizer and driver state, written to ``path.tmp`` and renamed over ``path``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state["driver"] = driver.state_dict()
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def resume(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, driver: TbpttDriver
) -> None:
    """Restore what :func:`save` wrote; a bad file raises :class:`atbptt.CheckpointError`."""
    state = load_checkpoint(
        path, map_location="cpu", advice="use another one, or leave out --resume"
    )
    if not isinstance(state, dict) or not {"model", "optimizer", "driver"} <= state.keys():
        raise CheckpointError(f"checkpoint {path} was not written by this script's --save")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        driver.load_state_dict(state["driver"])
    except (RuntimeError, ValueError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = " ".join(lines[:2])  # torch's first line only says "Error(s) in loading ..."
        raise CheckpointError(f"checkpoint {path} does not fit this run: {reason}") from None


def main(argv: list[str] | None = None) -> float:
    """Train, printing K decisions and losses; return the final validation perplexity."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=2000, help="SGD updates (segments)")
    parser.add_argument("--batch-size", type=int, default=64, help="columns trained side by side")
    parser.add_argument("--train-tokens", type=int, default=4000 * 64)
    parser.add_argument("--valid-tokens", type=int, default=1000 * 64)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--target-bias", type=float, default=0.1)
    parser.add_argument("--estimate-interval", type=int, default=0, help="0: token budget")
    parser.add_argument("--log-interval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save", default=None, help="checkpoint written after every pass")
    parser.add_argument("--resume", default=None, help="a --save checkpoint to continue from")
    parser.add_argument(
        "--metrics-dir", default=None, help="write the records to atbptt_metrics.jsonl there"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train = copy_stream(args.train_tokens, 5, 10, seed=args.seed)
    valid = copy_stream(args.valid_tokens, 5, 10, seed=args.seed + 1000)
    config = TbpttConfig(
        truncation_length=15, target_bias=args.target_bias, min_truncation_length=2,
        max_truncation_length=100, estimate_window=100, estimate_burnin=20,
        estimate_sequences=64, estimate_repeats=1, estimate_cumulative="exact",
        estimate_tail_anchor=80, estimate_interval=args.estimate_interval,
        estimate_budget=0.024, estimate_budget_counts="scored", lr_scaling="sqrt",
        lr_scaling_reference=1, truncation_clip_norm=1.0, seed=args.seed,
    )  # fmt: skip
    model = CopyLstm(hidden=args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=1e-5)
    try:
        driver = TbpttDriver(
            train[0], args.batch_size, config, targets=train[1], metrics_dir=args.metrics_dir
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    driver.attach_optimizer(optimizer)  # every step: clip at 1.0 / K, lr 1.0 x sqrt(K)
    if args.resume is not None:
        try:
            resume(args.resume, model, optimizer, driver)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        print(f"resumed {args.resume} at update {driver.num_updates}")
    losses: list[float] = []
    ppl = math.nan
    while driver.num_updates < args.updates:
        for segment in driver.segments(model, max_updates=args.updates):
            if segment.decision is not None:
                d = segment.decision
                print(f"update {driver.num_updates - 1}: K = {d.truncation_length} "
                      f"(bias_hat {d.relative_bias:.3g}, beta_hat {d.decay_rate:.3g})")  # fmt: skip
            loss = segment.loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if driver.num_updates % args.log_interval == 0:
                recent = sum(losses[-args.log_interval :]) / len(losses[-args.log_interval :])
                print(f"update {driver.num_updates}: K {segment.truncation_length}, "
                      f"train loss {recent:.4f}")  # fmt: skip
        ppl = math.exp(evaluate_stream(model, valid[0], valid[1], args.batch_size))
        epochs = driver.num_updates / driver.segments_per_epoch
        print(f"{driver.num_updates} updates ({epochs:.2f} epochs): valid ppl {ppl:.4f}")
        if args.save is not None:
            save(args.save, model, optimizer, driver)
    return ppl


if __name__ == "__main__":
    main()
