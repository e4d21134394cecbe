"""Mixed precision: the estimator runs in fp32 whatever the model's precision, and an update that
fairseq retries (``--amp`` overflow) does not advance the carried state twice.

fp16 and amp need a CUDA GPU (fairseq's autocast is ``torch.cuda.amp``); their end-to-end tests
are skipped without one. bfloat16 runs on CPU through fairseq-hydra-train (``common.bf16=true``);
fairseq-train's ``--bf16`` means a TPU.
"""

import copy
import math

import pytest
import torch
from conftest import REPO, TINY_TRAIN, USER_DIR, StubOptimizer, json_records, run_cli

import atbptt.loop as estimator_module  # the task estimates through atbptt's
from atbptt import TbpttLoop
from atbptt_fairseq.criterions.tbptt_cross_entropy import TbpttCrossEntropyCriterion
from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLanguageModel, TbpttLstmLmConfig
from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmConfig, AdaptiveTbpttLmTask

ADAPTIVE = dict(
    target_bias=0.3, min_truncation_length=2, max_truncation_length=12, estimate_window=12,
    estimate_interval=2, estimate_sequences=2, estimate_repeats=1,
)  # fmt: skip


def setup(data, dtype=torch.float32, **overrides):
    config = AdaptiveTbpttLmConfig(
        data=str(data), seed=1, train_subset="train", truncation_length=6, **overrides
    )
    task = AdaptiveTbpttLmTask.setup_task(config)
    task.load_dataset("train")
    slots = list(task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr())
    torch.manual_seed(0)
    model_config = TbpttLstmLmConfig(embed_dim=8, hidden_size=8, num_layers=1, dropout=0.0)
    model = TbpttLstmLanguageModel.build_model(model_config, task).to(dtype)
    criterion = TbpttCrossEntropyCriterion(task, sentence_avg=False)
    return task, slots, model, criterion, StubOptimizer(model)


def state_of(task):
    return copy.deepcopy(task.loop.cursor), [t.clone() for t in task.loop.carried_state]


def test_a_retried_update_advances_the_carried_state_once(tiny_corpus, monkeypatch):
    task, slots, model, criterion, optimizer = setup(tiny_corpus, **ADAPTIVE)
    reference = setup(tiny_corpus, **ADAPTIVE)
    estimates, batches = [], []
    estimate = TbpttLoop.estimate
    monkeypatch.setattr(
        TbpttLoop, "estimate", lambda self, *a: (estimates.append(a[1]), estimate(self, *a))[1]
    )
    next_segment = TbpttLoop.next_segment

    def recording_segment(self, *args):
        segment = next_segment(self, *args)
        batches.append((segment.inputs, segment.state))
        return segment

    monkeypatch.setattr(TbpttLoop, "next_segment", recording_segment)
    for update in range(2):
        task.train_step(slots[update], model, criterion, optimizer, update)
    after_first = state_of(task)
    task.train_step(slots[2], model, criterion, optimizer, 2)  # an estimate is due at update 2
    after_once = state_of(task)
    assert after_once[0] != after_first[0]
    for _ in range(2):  # fairseq's --amp retries (amp_batch_retries = 2)
        task.train_step(slots[2], model, criterion, optimizer, 2)
        assert state_of(task)[0] == after_once[0]
        assert all(torch.equal(a, b) for a, b in zip(state_of(task)[1], after_once[1]))
    assert estimates == [0, 2]  # before the first update, then once, not on the retries
    first_try, *retries = batches[2:]
    for tokens, state in retries:  # every retry trains the same segment from the same state
        assert torch.equal(tokens, first_try[0])
        assert all(torch.equal(a, b) for a, b in zip(state, first_try[1]))
    # and training goes on exactly as without the retries
    ref_task, ref_slots, ref_model, ref_criterion, ref_optimizer = reference
    for update in range(4):
        ref_task.train_step(ref_slots[update], ref_model, ref_criterion, ref_optimizer, update)
    task.train_step(slots[3], model, criterion, optimizer, 3)
    assert task.loop.cursor == ref_task.loop.cursor
    assert all(
        torch.equal(a, b) for a, b in zip(task.loop.carried_state, ref_task.loop.carried_state)
    )


def test_a_failed_forward_rewinds_the_stream(tiny_corpus):
    task, slots, model, criterion, optimizer = setup(tiny_corpus)
    task.train_step(slots[0], model, criterion, optimizer, 0)
    before = state_of(task)

    class OutOfMemory(TbpttCrossEntropyCriterion):
        def forward_carrying_state(self, model, sample, reduce=True):
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="out of memory"):
        task.train_step(slots[1], model, OutOfMemory(task, False), optimizer, 1)
    assert task.loop.cursor == before[0]
    assert all(torch.equal(a, b) for a, b in zip(task.loop.carried_state, before[1]))


def spy_on_the_estimator(monkeypatch):
    """Record the dtypes the bias estimator computes in."""
    seen = []
    measure = estimator_module.measure_gradient_profile

    def spying_measure(step, state, inputs, final_targets, burnin, batch_dim=0, **kwargs):
        readout = kwargs.get("readout")
        owner = getattr(readout, "__self__", None) or getattr(step, "__self__", None)
        seen.append(("parameters", next(owner.parameters()).dtype))
        seen.append(("initial state", state[0].dtype))

        def spying_step(tokens, state):
            logits, next_state = step(tokens, state)
            if logits is not None:
                seen.append(("logits", logits.dtype))
            seen.append(("state", next_state[0].dtype))
            return logits, next_state

        if readout is not None:

            def spying_readout(state):
                logits = readout(state)
                seen.append(("readout", logits.dtype))
                return logits

            kwargs["readout"] = spying_readout
        return measure(spying_step, state, inputs, final_targets, burnin, batch_dim, **kwargs)

    in_window = estimator_module.measure_in_window

    def spying_in_window(model, state, inputs, final_targets, **kwargs):
        seen.append(("parameters", next(model.parameters()).dtype))
        seen.append(("initial state", state[0].dtype))
        return in_window(model, state, inputs, final_targets, **kwargs)  # sums kept in fp64

    monkeypatch.setattr(estimator_module, "measure_gradient_profile", spying_measure)
    monkeypatch.setattr(estimator_module, "measure_in_window", spying_in_window)
    return seen


@pytest.mark.parametrize("method", ["in-window", "norms"])
def test_bf16_model_trains_and_the_estimate_runs_in_fp32(tiny_corpus, monkeypatch, method):
    task, slots, model, criterion, optimizer = setup(
        tiny_corpus, torch.bfloat16, **ADAPTIVE, estimate_method=method
    )
    seen = spy_on_the_estimator(monkeypatch)
    for update in range(3):  # an estimate at update 2
        loss, _, _ = task.train_step(slots[update], model, criterion, optimizer, update)
        assert math.isfinite(float(loss.detach()))
    assert all(t.dtype == torch.bfloat16 for t in task.loop.carried_state)
    assert seen and all(dtype == torch.float32 for _, dtype in seen)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the model stays bf16
    decision = task.controller.last_decision
    assert math.isfinite(decision.relative_bias) and 2 <= decision.truncation_length <= 12


@pytest.mark.parametrize("method", ["in-window", "norms"])
def test_the_estimate_ignores_an_enclosing_autocast(tiny_corpus, monkeypatch, method):
    task, _, model, _, _ = setup(tiny_corpus, **ADAPTIVE, estimate_method=method)
    seen = spy_on_the_estimator(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task.loop.estimate(model, update=2)
    assert seen and all(dtype == torch.float32 for _, dtype in seen)
    assert math.isfinite(task.controller.last_decision.relative_bias)


def test_a_restored_fp32_state_is_cast_to_a_bf16_model(tiny_corpus):
    task, slots, model, criterion, optimizer = setup(tiny_corpus, torch.bfloat16)
    task.train_step(slots[0], model, criterion, optimizer, 0)
    saved = task.get_checkpoint_dict()["AdaptiveTbpttLmTask"]
    saved["carried_state"] = [t.float() for t in saved["carried_state"]]  # e.g. from an fp32 run
    task.set_checkpoint_dict(saved)
    loss, _, _ = task.train_step(slots[1], model, criterion, optimizer, 1)
    assert math.isfinite(float(loss.detach()))
    assert all(t.dtype == torch.bfloat16 for t in task.loop.carried_state)


HYDRA_BF16 = [
    "--config-dir", str(REPO / "configs"), "--config-name", "tiny",
    "common.bf16=true", "common.log_interval=1", "optimization.max_update=6",
    "+task.target_bias=0.3", "+task.min_truncation_length=2", "+task.max_truncation_length=12",
    "+task.estimate_window=12", "+task.estimate_interval=3", "+task.estimate_sequences=2",
    "+task.estimate_repeats=1",
]  # fmt: skip


@pytest.mark.e2e
def test_bf16_on_cpu_through_hydra_train(tiny_corpus, tmp_path):
    output = run_cli(
        "fairseq-hydra-train", *HYDRA_BF16, f"task.data={tiny_corpus}",
        f"checkpoint.save_dir={tmp_path}", "checkpoint.no_epoch_checkpoints=true",
        f"common.user_dir={USER_DIR}",
    )  # fmt: skip
    records = json_records(output, "train_inner")
    assert len(records) == 6 and "bias_hat" in records[-1]
    assert math.isfinite(float(records[-1]["bias_hat"]))
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["common"]["bf16"] is True  # (fairseq stores the weights in fp32)


TRAIN = [
    *TINY_TRAIN,
    "--batch-size", "4", "--truncation-length", "8", "--log-format", "json", "--log-interval", "1",
    "--no-progress-bar", "--no-save",
]  # fmt: skip


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize(
    "flag, message",
    [("--fp16", "--fp16 needs a CUDA GPU"), ("--bf16", "runs on a TPU")],
)
def test_half_precision_flags_without_a_gpu_say_what_to_do(tiny_corpus, flag, message):
    output = run_cli("fairseq-train", str(tiny_corpus), *TRAIN, "--cpu", flag, check=False)
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("atbptt_fairseq: error: ") and message in lines[-1]


@pytest.mark.e2e
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 and amp need a CUDA GPU")
@pytest.mark.parametrize("flags", [["--fp16"], ["--amp", "--amp-init-scale", "1073741824"]])
def test_fp16_and_amp_on_a_gpu(tiny_corpus, flags):
    """An absurd initial amp loss scale makes fairseq retry the first updates (same samples)."""
    output = run_cli(
        "fairseq-train", str(tiny_corpus), *TRAIN, *flags, "--max-update", "12",
        "--target-bias", "0.3", "--min-truncation-length", "2", "--max-truncation-length", "12",
        "--estimate-window", "12", "--estimate-interval", "4", "--estimate-sequences", "4",
        "--estimate-repeats", "1",
    )  # fmt: skip
    records = json_records(output, "train_inner")
    assert records and all(math.isfinite(float(r["loss"])) for r in records)
    assert math.isfinite(float(records[-1]["bias_hat"]))
