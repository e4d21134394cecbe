"""The lr in force at every update is the scheduler's unscaled lr times factor(K), and clipping
follows K: with fairseq's own schedulers, across K changes and across a resume."""

import copy
import math

import pytest
import torch
from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRSchedule, CosineLRScheduleConfig
from fairseq.optim.lr_scheduler.fixed_schedule import FixedLRSchedule, FixedLRScheduleConfig
from fairseq.optim.lr_scheduler.inverse_square_root_schedule import (
    InverseSquareRootLRScheduleConfig,
    InverseSquareRootSchedule,
)
from fairseq.optim.lr_scheduler.polynomial_decay_schedule import (
    PolynomialDecayLRSchedule,
    PolynomialDecayLRScheduleConfig,
)
from fairseq.optim.lr_scheduler.reduce_lr_on_plateau import (
    ReduceLROnPlateauLRSchedule,
    ReduceLROnPlateauLRScheduleConfig,
)
from test_model_task import make_decoder, make_task

from atbptt import learning_rate_factor, scaled_learning_rate
from atbptt_fairseq.criterions.tbptt_cross_entropy import TbpttCrossEntropyCriterion
from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLanguageModel
from atbptt_fairseq.optim.tbptt_sgd import TbpttSgd, TbpttSgdConfig

LR = 2.0
UPDATES = 12
# K in force at each update (set between updates, as an estimate would)
K_SCHEDULE = {1: 8, 4: 2, 7: 16, 10: 4}
SCHEDULERS = {
    "fixed": (FixedLRSchedule, FixedLRScheduleConfig, {}),
    "reduce_lr_on_plateau": (
        ReduceLROnPlateauLRSchedule,
        ReduceLROnPlateauLRScheduleConfig,
        dict(lr_shrink=0.25, maximize_best_checkpoint_metric=False),
    ),
    "inverse_sqrt": (
        InverseSquareRootSchedule,
        InverseSquareRootLRScheduleConfig,
        dict(warmup_updates=3, warmup_init_lr=0.1),
    ),
    "cosine": (
        CosineLRSchedule,
        CosineLRScheduleConfig,
        dict(warmup_updates=2, max_update=UPDATES, min_lr=0.05),
    ),
    "polynomial_decay": (
        PolynomialDecayLRSchedule,
        PolynomialDecayLRScheduleConfig,
        dict(warmup_updates=2, total_num_update=UPDATES, end_learning_rate=0.1),
    ),
}


def build_scheduler(name: str, optimizer):
    scheduler_class, config_class, options = SCHEDULERS[name]
    return scheduler_class(config_class(lr=[LR], **options), optimizer)


class Run:
    """One training run as fairseq-train drives it: task, model, optimizer and scheduler."""

    def __init__(self, corpus, scheduler: str, **task_options) -> None:
        torch.manual_seed(0)
        # K follows K_SCHEDULE from the first update: no estimate before it
        self.task = make_task(
            corpus, truncation_length=8, target_bias=0.5, min_truncation_length=2,
            max_truncation_length=16, estimate_window=16, lr_scaling="sqrt",
            first_estimate="scheduled", **task_options,
        )  # fmt: skip
        self.slots = list(
            self.task.get_batch_iterator(
                self.task.dataset("train"), max_sentences=2
            ).next_epoch_itr(shuffle=False)
        )
        self.model = TbpttLstmLanguageModel(make_decoder(len(self.task.dictionary), layers=1))
        self.criterion = TbpttCrossEntropyCriterion(self.task, sentence_avg=False)
        self.optimizer = TbpttSgd(TbpttSgdConfig(lr=[LR]), list(self.model.parameters()))
        self.scheduler = build_scheduler(scheduler, self.optimizer)
        self.scheduler.step_update(0)
        self.applied: list[float] = []  # lr of each optimizer step
        self.scheduled: list[float] = []  # the scheduler's lr at that update
        self.clip_norms: list[float] = []  # gradient norm at each optimizer step
        self._record_steps()

    def _record_steps(self) -> None:
        torch_optimizer = self.optimizer.optimizer
        original = torch_optimizer.step

        def step(*args, **kwargs):
            self.applied.append(torch_optimizer.param_groups[0]["lr"])
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.clip_norms.append(float(torch.norm(torch.stack([g.norm() for g in grads]))))
            return original(*args, **kwargs)

        torch_optimizer.step = step

    def train(self, first: int, last: int) -> None:
        for update in range(first, last + 1):
            if update in K_SCHEDULE:
                state = self.task.controller.state_dict()
                self.task.controller.load_state_dict(
                    {**state, "truncation_length": K_SCHEDULE[update]}
                )
            self.scheduled.append(self.optimizer.get_lr())
            self.optimizer.zero_grad()
            self.task.train_step(
                self.slots[update % len(self.slots)], self.model, self.criterion, self.optimizer,
                update - 1,
            )  # fmt: skip
            self.task.optimizer_step(self.optimizer, self.model, update - 1)
            if update % 3 == 0:  # an epoch ends: validation got worse, reduce-on-plateau shrinks
                self.scheduler.step(update // 3, val_loss=float(update))
            self.scheduler.step_update(update)

    def checkpoint(self) -> dict:
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "task": self.task.get_checkpoint_dict()[type(self.task).__name__],
            }
        )

    def restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.task.set_checkpoint_dict(checkpoint["task"])


def k_at(update: int) -> int:
    return K_SCHEDULE[max(u for u in K_SCHEDULE if u <= update)]


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_lr_in_force_is_the_schedulers_lr_times_the_factor_of_k(tiny_corpus, scheduler):
    run = Run(tiny_corpus, scheduler)
    run.train(1, UPDATES)
    expected = [
        lr * learning_rate_factor(k_at(update), 8, "sqrt")
        for update, lr in zip(range(1, UPDATES + 1), run.scheduled)
    ]
    assert run.applied == pytest.approx(expected, rel=1e-12)
    # the scheduler alone, on an optimizer nobody scales, sets the same unscaled lrs
    twin_model = torch.nn.Linear(1, 1)
    twin = TbpttSgd(TbpttSgdConfig(lr=[LR]), list(twin_model.parameters()))
    twin_scheduler = build_scheduler(scheduler, twin)
    twin_scheduler.step_update(0)
    alone = []
    for update in range(1, UPDATES + 1):
        alone.append(twin.get_lr())
        if update % 3 == 0:
            twin_scheduler.step(update // 3, val_loss=float(update))
        twin_scheduler.step_update(update)
    assert run.scheduled == pytest.approx(alone, rel=1e-12)
    if scheduler == "reduce_lr_on_plateau":  # the example: shrinks were applied
        assert min(alone) == pytest.approx(LR * 0.25**2)


@pytest.mark.parametrize("scheduler", ["reduce_lr_on_plateau", "inverse_sqrt"])
def test_lr_scaling_survives_a_resume(tiny_corpus, scheduler):
    whole = Run(tiny_corpus, scheduler)
    whole.train(1, UPDATES)
    first = Run(tiny_corpus, scheduler)
    first.train(1, 5)
    checkpoint = first.checkpoint()
    resumed = Run(tiny_corpus, scheduler)
    resumed.restore(checkpoint)
    resumed.train(6, UPDATES)
    assert first.applied + resumed.applied == pytest.approx(whole.applied, rel=1e-12)


def test_clipping_follows_k(tiny_corpus):
    run = Run(tiny_corpus, "fixed", truncation_clip_norm=0.5)
    run.train(1, UPDATES)
    for update, norm in zip(range(1, UPDATES + 1), run.clip_norms):
        assert norm <= 0.5 / k_at(update) * (1 + 1e-5)


def test_scaled_learning_rate_restores_every_group():
    groups = [{"lr": 0.5}, {"lr": 2.0}]
    with scaled_learning_rate(groups, 4.0):
        assert [g["lr"] for g in groups] == [2.0, 8.0]
    assert [g["lr"] for g in groups] == [0.5, 2.0]
    with pytest.raises(RuntimeError):
        with scaled_learning_rate(groups, 3.0):
            raise RuntimeError("a failed step")
    assert [g["lr"] for g in groups] == [0.5, 2.0]
    assert learning_rate_factor(25, 100, "sqrt") == pytest.approx(0.5)
    assert learning_rate_factor(25, 100, "linear") == pytest.approx(0.25)
    assert math.isclose(learning_rate_factor(25, 100, "none"), 1.0)
