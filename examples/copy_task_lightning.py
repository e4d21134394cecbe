"""The copy task trained with adaptive TBPTT by a Lightning Trainer (``atbptt_lightning``).

    python examples/copy_task_lightning.py --max-steps 2000

The model, data and settings of ``copy_task.py``; Lightning runs the loop, logs ``trunc_k``,
``bias_hat`` and ``beta_hat`` (CSV under --log-dir) and checkpoints the driver with the model, so
``--resume PATH`` continues a run exactly. The checkpoint is verified before anything is written
and again when Lightning loads it (``SafeCheckpointIO``): a damaged or unsafe file ends in one
line ``error: ...``, exit status 1.
"""

from __future__ import annotations

import argparse

import lightning
import torch
from copy_task import CopyLstm, copy_stream  # this directory
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from atbptt import CheckpointError, TbpttConfig, TbpttDriver
from atbptt.checkpoint import check_checkpoint_file
from atbptt_lightning import SafeCheckpointIO, TbpttModule


class CopyTask(TbpttModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0, weight_decay=1e-5)  # x sqrt(K)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-tokens", type=int, default=4000 * 64)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--estimate-interval", type=int, default=0, help="0: token budget")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (one device)")
    parser.add_argument("--log-dir", default="lightning_logs", help="CSV logs and checkpoints")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    parser.add_argument("--resume", default=None, help="a checkpoint of this script to resume")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tokens, targets = copy_stream(args.train_tokens, 5, 10, seed=args.seed)
    config = TbpttConfig(
        truncation_length=15, target_bias=0.1, min_truncation_length=2,
        max_truncation_length=100, estimate_window=100, estimate_burnin=20,
        estimate_sequences=64, estimate_repeats=1, estimate_cumulative="exact",
        estimate_tail_anchor=80, estimate_interval=args.estimate_interval,
        estimate_budget=0.024, estimate_budget_counts="scored", lr_scaling="sqrt",
        lr_scaling_reference=1, truncation_clip_norm=1.0, seed=args.seed,
    )  # fmt: skip
    advice = "resume from another checkpoint, or leave out --resume"
    try:
        driver = TbpttDriver(tokens, args.batch_size, config, targets=targets)
        if args.resume is not None:  # before the Trainer creates its log directory
            check_checkpoint_file(args.resume, advice)
    except ValueError as error:  # a CheckpointError too
        raise SystemExit(f"error: {error}") from None
    module = CopyTask(CopyLstm(hidden=args.hidden), driver)
    trainer = lightning.Trainer(
        max_steps=args.max_steps, accelerator=args.accelerator, devices=1, enable_progress_bar=False,
        logger=CSVLogger(args.log_dir, name="copy_task"), log_every_n_steps=10,
        callbacks=[ModelCheckpoint(every_n_train_steps=args.save_every, save_top_k=-1)],
        plugins=[SafeCheckpointIO(advice)],
    )  # fmt: skip
    try:
        trainer.fit(module, ckpt_path=args.resume)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    decision = driver.controller.last_decision
    estimate = (
        "no estimate yet"
        if decision is None
        else (f"bias_hat {decision.relative_bias:.3g}, beta_hat {decision.decay_rate:.3g}")
    )
    print(f"{driver.num_updates} updates: K = {driver.truncation_length} ({estimate})")


if __name__ == "__main__":
    main()
