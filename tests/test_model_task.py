"""The model's state protocol and the task's segment building, in process on a tiny corpus."""

import pytest
import torch
from conftest import USER_DIR
from fairseq.data import Dictionary

from atbptt_fairseq.criterions.tbptt_cross_entropy import segment_sample
from atbptt_fairseq.models.tbptt_lstm_lm import (
    TbpttLstmDecoder,
    TbpttLstmLanguageModel,
    TbpttLstmLmConfig,
)
from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmConfig, AdaptiveTbpttLmTask


def make_decoder(vocabulary: int = 30, layers: int = 2) -> TbpttLstmDecoder:
    dictionary = Dictionary()
    for i in range(vocabulary):
        dictionary.add_symbol(f"w{i}")
    config = TbpttLstmLmConfig(embed_dim=8, hidden_size=8, num_layers=layers, dropout=0.0)
    torch.manual_seed(0)
    return TbpttLstmDecoder(config, dictionary).eval()


def test_carry_offset_returns_the_state_after_that_many_steps():
    decoder = make_decoder()
    tokens = torch.randint(4, 30, (3, 12))
    logits, extra = decoder(tokens, carry_offset=5, output_start=4)
    _, head = decoder(tokens[:, :5])
    full_logits, full = decoder(tokens)
    assert logits.shape == (3, 8, len(decoder.dictionary))
    torch.testing.assert_close(logits, full_logits[:, 4:])
    torch.testing.assert_close(extra["carried_state"], head["state"])
    torch.testing.assert_close(extra["state"], full["state"])
    assert not extra["carried_state"][0].requires_grad


def test_step_matches_the_fused_forward():
    decoder = make_decoder()
    tokens = torch.randint(4, 30, (2, 6))
    full_logits, _ = decoder(tokens)
    state = decoder.zero_state(2)
    for t in range(6):
        logits, state = decoder.step(tokens[:, t], state)
        torch.testing.assert_close(logits, full_logits[:, t])


def test_evaluation_streams_carry_their_own_state():
    decoder = make_decoder()
    tokens = torch.randint(4, 30, (1, 20))
    full_logits, _ = decoder(tokens)
    first, _ = decoder(tokens[:, :7], stream="valid", start_of_stream=True)
    decoder(tokens[:, :3], stream="other", start_of_stream=True)
    second, _ = decoder(tokens[:, 7:], stream="valid")
    torch.testing.assert_close(torch.cat([first, second], 1), full_logits)
    restarted, _ = decoder(tokens[:, :7], stream="valid", start_of_stream=True)
    torch.testing.assert_close(restarted, first)


def make_task(data, **overrides) -> AdaptiveTbpttLmTask:
    config = AdaptiveTbpttLmConfig(data=str(data), seed=1, train_subset="train", **overrides)
    task = AdaptiveTbpttLmTask.setup_task(config)
    task.load_dataset("train")
    return task


def test_training_segments_carry_the_state_exactly(tiny_corpus):
    """Segment by segment, with the carried state, scores equal one forward over each column."""
    for style in ("overlap", "disjoint"):
        task = make_task(tiny_corpus, truncation_length=7, tbptt_style=style)
        iterator = task.get_batch_iterator(task.dataset("train"), max_sentences=3)
        slots = list(iterator.next_epoch_itr(shuffle=False))
        model = TbpttLstmLanguageModel(make_decoder(len(task.dictionary), layers=1))
        inputs, targets = task.loop.columns
        reference, _ = model(inputs)
        scored_logits, scored_targets = [], []
        with torch.no_grad():
            for _ in slots + slots[:2]:  # into the next pass
                batch = segment_sample(task.loop.next_segment(model))
                logits, extra = model(**batch["net_input"])
                task.loop.carry(extra["carried_state"])
                scored_logits.append(logits)
                scored_targets.append(batch["target"])
        length = inputs.size(1)
        first_pass = torch.cat(scored_logits[: len(slots)], 1)
        torch.testing.assert_close(first_pass, reference, atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.cat(scored_targets[: len(slots)], 1), targets)
        second_pass = torch.cat(scored_logits[len(slots) :], 1)
        torch.testing.assert_close(
            second_pass, reference[:, : second_pass.size(1)], atol=1e-5, rtol=1e-5
        )
        assert first_pass.size(1) == length and task.loop.cursor.passes == 1


def test_training_carries_the_state_through_return_values(tiny_corpus):
    """The criterion returns the carried state; nothing is written into the sample. A criterion
    without that return is refused in one line rather than silently training from zero states."""
    from conftest import StubOptimizer
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    from atbptt_fairseq.criterions.tbptt_cross_entropy import TbpttCrossEntropyCriterion
    from atbptt_fairseq.errors import UserInputError

    task = make_task(tiny_corpus, truncation_length=7)
    slots = list(task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr())
    model = TbpttLstmLanguageModel(make_decoder(len(task.dictionary), layers=1))
    criterion = TbpttCrossEntropyCriterion(task, sentence_avg=False)
    batch = segment_sample(task.loop.next_segment(model))
    keys = set(batch)
    loss, _, _, carried = criterion.forward_carrying_state(model, batch)
    assert set(batch) == keys
    _, expected = model.run_window(
        batch["net_input"]["src_tokens"], model.zero_state(3), 6, batch["net_input"]["carry_offset"]
    )
    assert all(torch.equal(a, b) for a, b in zip(carried, expected))
    task = make_task(tiny_corpus, truncation_length=7)  # the same first segment, in train_step
    slots = list(task.get_batch_iterator(task.dataset("train"), max_sentences=3).next_epoch_itr())
    task.train_step(slots[0], model, criterion, StubOptimizer(model), 0)
    assert all(torch.equal(a, b) for a, b in zip(task.loop.carried_state, expected))
    with pytest.raises(UserInputError, match="--criterion tbptt_cross_entropy"):
        task.train_step(
            slots[1], model, CrossEntropyCriterion(task, False), StubOptimizer(model), 1
        )


def test_each_rank_gets_its_own_columns_and_the_same_slot_count(tiny_corpus):
    task = make_task(tiny_corpus, truncation_length=5)
    counts, columns = [], []
    for rank in range(2):
        iterator = task.get_batch_iterator(
            task.dataset("train"), max_sentences=2, num_shards=2, shard_id=rank
        )
        counts.append(len(iterator))
        columns.append(task.loop.columns[0])
    single = make_task(tiny_corpus, truncation_length=5)
    single.get_batch_iterator(single.dataset("train"), max_sentences=4)
    assert counts[0] == counts[1]
    assert torch.equal(torch.cat(columns), single.loop.columns[0])


def test_estimation_leaves_training_state_untouched(tiny_corpus):
    task = make_task(
        tiny_corpus, truncation_length=6, target_bias=0.5, min_truncation_length=2,
        max_truncation_length=20, estimate_window=20, estimate_sequences=4, estimate_repeats=2,
    )  # fmt: skip
    task.get_batch_iterator(task.dataset("train"), max_sentences=3)
    model = TbpttLstmLanguageModel(make_decoder(len(task.dictionary), layers=1)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    task.loop.carry(model.zero_state(3))
    task.loop.carried[0].normal_()
    before = (
        [p.grad.clone() for p in model.parameters()],
        {k: v["momentum_buffer"].clone() for k, v in optimizer.state.items()},
        [t.clone() for t in task.loop.carried],
        task.loop.cursor.state_dict(),
    )
    rng_state = torch.get_rng_state()
    task.loop.estimate(model, update=10)
    assert model.training
    assert all(torch.equal(a, p.grad) for a, p in zip(before[0], model.parameters()))
    assert all(torch.equal(before[1][k], v["momentum_buffer"]) for k, v in optimizer.state.items())
    assert all(torch.equal(a, b) for a, b in zip(before[2], task.loop.carried))
    assert task.loop.cursor.state_dict() == before[3]
    assert torch.equal(rng_state, torch.get_rng_state())  # dropout masks of training unaffected
    decision = task.controller.last_decision
    assert 2 <= decision.truncation_length <= 20 and decision.seconds > 0


ARCHITECTURE_SIZES = {
    "tbptt_lstm_lm_ptb": dict(
        embed_dim=900, hidden_size=900, num_layers=1, dropout=0.2, tie_embeddings=True
    ),
    "tbptt_lstm_lm_wiki2": dict(
        embed_dim=512, hidden_size=512, num_layers=1, dropout=0.2, tie_embeddings=True
    ),
    "tbptt_lstm_copy": dict(
        embed_dim=50, hidden_size=50, num_layers=2, dropout=0.0, tie_embeddings=False
    ),
    "tbptt_lstm_lm_tiny": dict(
        embed_dim=16, hidden_size=16, num_layers=1, dropout=0.0, tie_embeddings=True
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURE_SIZES))
def test_architectures_give_their_sizes_on_the_command_line_and_in_hydra_configs(arch):
    """``--arch NAME`` and ``model._name: NAME`` in a config both build the named sizes, and an
    explicit value wins in both (fairseq's hydra path once filled in the generic sizes)."""
    from argparse import Namespace

    from fairseq import options
    from fairseq.dataclass.initialize import add_defaults
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models import build_model
    from omegaconf import OmegaConf

    task = Namespace(target_dictionary=make_decoder().dictionary)

    def sizes(model_cfg) -> dict:
        decoder = build_model(model_cfg, task).decoder
        lstm = decoder.lstm
        return dict(
            embed_dim=decoder.embed_tokens.embedding_dim,
            hidden_size=lstm.hidden_size,
            num_layers=lstm.num_layers,
            dropout=decoder.dropout.p,
            tie_embeddings=decoder.output_weight is decoder.embed_tokens.weight,
        )

    hydra_cfg = OmegaConf.create({"model": {"_name": arch}})
    add_defaults(hydra_cfg)
    assert sizes(hydra_cfg.model) == ARCHITECTURE_SIZES[arch]
    hydra_cfg = OmegaConf.create({"model": {"_name": arch, "num_layers": 3}})
    add_defaults(hydra_cfg)
    assert sizes(hydra_cfg.model) == {**ARCHITECTURE_SIZES[arch], "num_layers": 3}

    def command_line(*extra: str) -> dict:
        command = ["data", "--user-dir", USER_DIR, "--task", "adaptive_tbptt_lm", "--arch", arch]
        args = options.parse_args_and_arch(options.get_training_parser(), command + list(extra))
        return sizes(convert_namespace_to_omegaconf(args).model)

    assert command_line() == ARCHITECTURE_SIZES[arch]
    assert command_line("--num-layers", "3") == {**ARCHITECTURE_SIZES[arch], "num_layers": 3}
