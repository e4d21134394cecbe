"""The one-hot recurrent fairseq models (tanh_rnn_lm, elementwise_lstm_lm) and --gradient-estimator
kf-rtrl / exact-rtrl through fairseq-train and fairseq-eval-lm.

In process: the wrappers compute what the core models compute, with 1 x B x H states, and the
task's exact-RTRL gradient equals full BPTT of the core model. Through the CLIs: KF-RTRL and exact
RTRL train, resume to bitwise-equal parameters with their sensitivities in the checkpoint, and
their checkpoints are scored by fairseq-eval-lm as one stateful pass; fixed-K TBPTT (with the
bias estimate) trains the new models; a model a method does not support is refused in one line.
"""

import math
import re
import shutil
from argparse import Namespace
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN, USER_DIR, json_records, run_cli, train_losses
from fairseq import checkpoint_utils
from fairseq.data import Dictionary, data_utils
from fairseq.models import build_model
from omegaconf import OmegaConf

from atbptt.estimators import ElementwiseLstm, TanhRnn, full_gradient
from atbptt_fairseq.errors import UserInputError
from atbptt_fairseq.models.onehot_recurrent_lm import (
    ElementwiseLstmLanguageModel,
    OneHotRecurrentLmConfig,
    TanhRnnLanguageModel,
)
from atbptt_fairseq.tasks.adaptive_tbptt_lm import (
    AdaptiveTbpttLmConfig,
    AdaptiveTbpttLmTask,
    check_estimator_model,
)
from atbptt_fairseq.tasks.checkpoint_state import checkpoint_layout

TINY_ARCH = {"kf-rtrl": "tanh_rnn_lm_tiny", "exact-rtrl": "elementwise_lstm_lm_tiny"}
TOTAL_UPDATES = 6


def tiny_model(arch: str, vocabulary: int = 20):
    dictionary = Dictionary()
    for i in range(vocabulary):
        dictionary.add_symbol(f"w{i}")
    torch.manual_seed(0)
    config = OmegaConf.create({"_name": arch})
    return build_model(config, Namespace(target_dictionary=dictionary)).eval()


@pytest.mark.parametrize(
    "arch, core_class",
    [("tanh_rnn_lm_tiny", TanhRnn), ("elementwise_lstm_lm_tiny", ElementwiseLstm)],
)
def test_the_wrapper_is_the_core_model_with_a_layer_dim(arch, core_class):
    model = tiny_model(arch)
    core = model.gradient_estimation_model()
    assert type(core) is core_class and core.hidden == 8 and core.vocabulary == 24  # 20 + 4
    assert {id(p) for p in model.parameters()} == {id(p) for p in core.parameters()}
    tokens = torch.randint(4, 24, (3, 12))
    core_logits, core_final = core.run_window(tokens, core.zero_state(3), 0, 12)
    logits, extra = model(tokens)
    torch.testing.assert_close(logits, core_logits, rtol=0, atol=0)
    assert all(
        a.shape == (1, 3, 8) and torch.equal(a[0], b) for a, b in zip(extra["state"], core_final)
    )
    # the overlap window: scores from output_start, carries the state after carry_offset steps
    windowed, window_extra = model(tokens, carry_offset=5, output_start=4)
    _, head = model(tokens[:, :5])
    torch.testing.assert_close(windowed, core_logits[:, 4:])
    assert all(torch.equal(a, b) for a, b in zip(window_extra["carried_state"], head["state"]))
    # stepping (the bias estimate's path) equals the window
    state = model.zero_state(3)
    for position in range(12):
        state = model.advance(tokens[:, position], state)
        torch.testing.assert_close(model.readout(state), core_logits[:, position])
    # evaluation streams carry their own state
    first, _ = model(tokens[:1, :7], stream="valid", start_of_stream=True)
    second, _ = model(tokens[:1, 7:], stream="valid")
    torch.testing.assert_close(torch.cat([first, second], 1), core_logits[:1])


def test_exact_rtrl_through_the_task_is_full_bptt(tiny_corpus):
    """The task's exact-RTRL gradient (sensitivities carried from the first segment into the
    second) equals full BPTT of the core model over the same tokens, to 1e-5."""
    config = AdaptiveTbpttLmConfig(
        data=str(tiny_corpus), seed=1, train_subset="train", truncation_length=5,
        gradient_estimator="exact-rtrl",
    )  # fmt: skip
    task = AdaptiveTbpttLmTask.setup_task(config)
    task.load_dataset("train")
    slots = list(task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr())
    torch.manual_seed(0)
    model = task.build_model(OmegaConf.create({"_name": "elementwise_lstm_lm_tiny"}))
    core = model.gradient_estimation_model()
    parameters = list(core.parameters())
    inputs, targets = task.loop.columns
    for segments in (1, 2):
        task.train_step(slots[segments - 1], model, None, None, segments - 1)
        length = 5 * segments
        expected = full_gradient(core, inputs[:, :length], targets[:, :length], normaliser=1.0)
        got = torch.cat([p.grad.reshape(-1) for p in parameters])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert checkpoint_layout(task.loop)[0].shape == (1, 3, 8)  # the checkpoints' layout


def test_a_model_the_method_does_not_support_is_refused():
    tanh_rnn, lstm = tiny_model("tanh_rnn_lm_tiny"), tiny_model("tbptt_lstm_lm_tiny")
    exact = AdaptiveTbpttLmConfig(gradient_estimator="exact-rtrl")
    with pytest.raises(UserInputError, match="elementwise_lstm_copy, elementwise_lstm_lm, "):
        check_estimator_model(exact, tanh_rnn)
    check_estimator_model(exact, tiny_model("elementwise_lstm_lm_tiny"))
    check_estimator_model(AdaptiveTbpttLmConfig(gradient_estimator="kf-rtrl"), tanh_rnn)
    for method in ("tbptt", "artbp", "uoro"):  # any stateful model
        check_estimator_model(AdaptiveTbpttLmConfig(gradient_estimator=method), lstm)
    assert isinstance(tanh_rnn, TanhRnnLanguageModel)
    assert not isinstance(tanh_rnn, ElementwiseLstmLanguageModel)


# ----------------------------------------------------------------------- through the CLIs


def train_args(data: Path, arch: str, save_dir: Path, max_update: int, *extra: str) -> List[str]:
    return [
        str(data), *TINY_TRAIN, "--arch", arch, *extra,
        "--batch-size", "4",
        "--truncation-length", "6",
        "--updates-per-epoch", "4",  # the stop at 3 falls mid-epoch, the resume crosses epochs
        "--max-update", str(max_update),
        "--seed", "5",
        "--cpu",
        "--log-format", "json",
        "--log-interval", "1",
        "--no-progress-bar",
        "--save-interval-updates", "3",
        "--save-dir", str(save_dir),
    ]  # fmt: skip


def single_pass_loss(data: Path, checkpoint: Path, split: str) -> float:
    """One forward over the whole split from a zero state, outside the task (base 2)."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data)}
    )
    dataset = data_utils.load_indexed_dataset(str(data / split), task.dictionary)
    tokens = torch.cat([dataset[i].long() for i in range(len(dataset))])
    with torch.no_grad():
        logits, _ = models[0].eval().decoder(tokens[None, :-1])
    return float(F.cross_entropy(logits[0].double(), tokens[1:])) / math.log(2)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "method, carried", [("kf-rtrl", {"u", "A"}), ("exact-rtrl", {"cell_sensitivity"})]
)
def test_rtrl_trains_resumes_exactly_and_evaluates(tiny_corpus, tmp_path, method, carried):
    """The interrupted run resumes from the checkpoint the uninterrupted one wrote at update 3
    (a run stopped there would have written the same file: saving changes no state)."""
    arch = TINY_ARCH[method]
    options = ("--gradient-estimator", method, "--disable-validation")
    reference = train_losses(
        run_cli("fairseq-train", *train_args(tiny_corpus, arch, tmp_path / "a", 6, *options))
    )
    assert sorted(reference) == list(range(1, TOTAL_UPDATES + 1))
    assert all(math.isfinite(float(loss)) and k == "6" for loss, k in reference.values())
    (tmp_path / "b").mkdir()
    shutil.copyfile(tmp_path / "a" / "checkpoint_1_3.pt", tmp_path / "b" / "checkpoint_last.pt")
    saved = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)
    assert saved["optimizer_history"][-1]["num_updates"] == 3
    estimator = saved["extra_state"]["AdaptiveTbpttLmTask"]["gradient_estimator"]
    assert estimator["name"] == method and set(estimator["carry"]["extras"]) == carried
    resumed = run_cli("fairseq-train", *train_args(tiny_corpus, arch, tmp_path / "b", 6, *options))
    assert "Loaded checkpoint" in resumed
    second = train_losses(resumed)
    assert sorted(second) == [4, 5, 6]
    assert second == {update: reference[update] for update in (4, 5, 6)}
    uninterrupted = torch.load(tmp_path / "a" / "checkpoint_last.pt", weights_only=True)["model"]
    interrupted = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)["model"]
    assert uninterrupted.keys() == interrupted.keys()
    assert all(torch.equal(uninterrupted[k], interrupted[k]) for k in uninterrupted)
    # fairseq-eval-lm scores the trained model in one stateful pass over the split
    checkpoint = tmp_path / "a" / "checkpoint_last.pt"
    output = run_cli(
        "fairseq-eval-lm", str(tiny_corpus), "--user-dir", USER_DIR, "--task", "adaptive_tbptt_lm",
        "--path", str(checkpoint), "--gen-subset", "valid", "--cpu",
    )  # fmt: skip
    evaluated = float(re.search(r"Loss \(base 2\): ([0-9.]+)", output).group(1))
    assert evaluated == pytest.approx(single_pass_loss(tiny_corpus, checkpoint, "valid"), abs=5e-5)


@pytest.mark.e2e
# one CLI run: the two models share the wrapper, which the in-process test checks for both
@pytest.mark.parametrize("arch", ["elementwise_lstm_lm_tiny"])
def test_fixed_truncation_trains_the_new_models(tiny_corpus, tmp_path, arch):
    output = run_cli(
        "fairseq-train",
        *train_args(tiny_corpus, arch, tmp_path, 4, "--monitor-bias", "--estimate-window", "12",
                    "--estimate-interval", "2", "--estimate-sequences", "2",
                    "--estimate-repeats", "1"),
    )  # fmt: skip
    records = json_records(output, "train_inner")
    assert [int(r["num_updates"]) for r in records] == [1, 2, 3, 4]
    assert all(r["trunc_k"] == "6" and math.isfinite(float(r["loss"])) for r in records)
    estimated = [float(r["bias_hat"]) for r in records if "bias_hat" in r]
    assert estimated and all(0 < bias < 1 for bias in estimated)  # the estimate ran on the model
    assert math.isfinite(float(json_records(output, "valid")[-1]["valid_loss"]))


@pytest.mark.e2e
def test_the_wrong_model_is_refused_in_one_line(tiny_corpus, tmp_path):
    args = train_args(
        tiny_corpus, "tbptt_lstm_lm_tiny", tmp_path, 2, "--gradient-estimator", "kf-rtrl"
    )
    output = run_cli("fairseq-train", *args, check=False)
    errors = [line for line in output.splitlines() if line.startswith("atbptt_fairseq: error:")]
    assert len(errors) == 1, output[-2000:]
    assert "kf-rtrl" in errors[0] and "tanh_rnn_copy, tanh_rnn_lm, tanh_rnn_lm_tiny" in errors[0]
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "arch, hidden",
    [
        ("tanh_rnn_lm", OneHotRecurrentLmConfig.hidden_size),
        ("tanh_rnn_copy", 64),
        ("elementwise_lstm_copy", 64),
    ],
)
def test_architectures_give_their_sizes_on_the_command_line_and_in_hydra_configs(arch, hidden):
    from fairseq import options
    from fairseq.dataclass.initialize import add_defaults
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    task = Namespace(target_dictionary=Dictionary())

    def size(model_cfg) -> int:
        return build_model(model_cfg, task).gradient_estimation_model().hidden

    hydra_cfg = OmegaConf.create({"model": {"_name": arch}})
    add_defaults(hydra_cfg)
    assert size(hydra_cfg.model) == hidden
    command = ["data", "--user-dir", USER_DIR, "--task", "adaptive_tbptt_lm", "--arch", arch]
    parser = options.get_training_parser()
    assert (
        size(convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, command)).model)
        == hidden
    )
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [*command, "--hidden-size", "5"])
    assert size(convert_namespace_to_omegaconf(args).model) == 5
