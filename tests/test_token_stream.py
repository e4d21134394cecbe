"""Stream layout, target alignment, per-rank sharding and the TBPTT segment plan."""

import pytest
import torch

from atbptt.token_stream import (
    StreamCursor,
    StreamTooShortError,
    lay_out_columns,
    plan_segment,
    segments_per_pass,
)


def test_language_model_columns_predict_the_next_token():
    tokens = torch.arange(23)
    inputs, targets = lay_out_columns(tokens, total_columns=4)
    assert inputs.shape == targets.shape == (4, 4)  # 23 // 4 = 5 tokens per column
    assert torch.equal(inputs[1], torch.tensor([5, 6, 7, 8]))
    assert torch.equal(targets, inputs + 1)


def test_every_token_after_the_first_of_a_column_is_predicted_once():
    tokens = torch.randperm(1000)
    columns = 7
    inputs, targets = lay_out_columns(tokens, total_columns=columns)
    length = 1000 // columns
    expected = tokens[: columns * length].view(columns, length)[:, 1:]
    assert torch.equal(targets, expected)
    assert targets.unique().numel() == targets.numel()


def test_aligned_targets_keep_positions():
    tokens, targets = torch.arange(12), torch.arange(100, 112)
    inputs, aligned = lay_out_columns(tokens, 3, targets=targets)
    assert torch.equal(aligned - inputs, torch.full((3, 4), 100))


def test_shards_own_disjoint_rows_of_the_same_layout():
    tokens = torch.arange(64)
    full_inputs, _ = lay_out_columns(tokens, 4)
    rank0, _ = lay_out_columns(tokens, 4, shard_id=0, num_shards=2)
    rank1, _ = lay_out_columns(tokens, 4, shard_id=1, num_shards=2)
    assert torch.equal(torch.cat([rank0, rank1]), full_inputs)


def test_errors_name_the_problem():
    with pytest.raises(StreamTooShortError, match="smaller batch size"):
        lay_out_columns(torch.arange(5), total_columns=4)
    with pytest.raises(ValueError, match="token-aligned"):
        lay_out_columns(torch.arange(8), 2, targets=torch.arange(7))


def scored_positions(style, truncation_lengths, stream_length):
    cursor = StreamCursor()
    segments, scored = [], []
    for k in truncation_lengths:
        segment = plan_segment(cursor, k, style, stream_length)
        segments.append(segment)
        start = segment.window_start + segment.output_start
        scored.extend(range(start, segment.window_end))
        if cursor.position >= stream_length:
            break
    return segments, scored


@pytest.mark.parametrize("style", ["overlap", "disjoint"])
def test_a_pass_scores_every_position_exactly_once(style):
    segments, scored = scored_positions(style, [5] * 100, 47)
    assert scored == list(range(47))
    assert segments[0].new_pass and not any(s.new_pass for s in segments[1:])


def test_a_pass_scores_every_position_once_while_k_changes():
    _, scored = scored_positions("overlap", [5, 9, 2, 2, 14, 3, 7] * 20, 101)
    assert scored == list(range(101))


def test_overlap_windows_reach_k_minus_one_steps_back():
    segments, _ = scored_positions("overlap", [6] * 100, 60)
    for segment in segments[1:-1]:
        assert segment.output_start == 5  # K - 1 context steps before the K scored ones
        assert segment.window_end - segment.window_start == 11  # 2K - 1
        assert segment.carry_offset == 6  # the state after the first K steps is carried on


def test_disjoint_windows_score_everything():
    segments, _ = scored_positions("disjoint", [6] * 100, 60)
    for segment in segments:
        assert segment.output_start == 0
        assert segment.carry_offset == segment.window_end - segment.window_start


def test_the_next_pass_starts_from_a_reset_state():
    cursor = StreamCursor()
    for _ in range(4):
        plan_segment(cursor, 5, "overlap", 20)
    segment = plan_segment(cursor, 5, "overlap", 20)
    assert segment.new_pass and segment.window_start == 0 and cursor.passes == 1


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError, match="overlap"):
        plan_segment(StreamCursor(), 5, "sliding", 20)


@pytest.mark.parametrize("style", ["overlap", "disjoint"])
@pytest.mark.parametrize("stream_length", [41, 42, 43, 44, 45, 47, 49])
def test_a_short_remainder_joins_the_last_segment(style, stream_length):
    segments, scored = scored_positions(style, [10] * 100, stream_length)
    assert scored == list(range(stream_length))
    assert all(5 <= segment.scored < 15 for segment in segments)
    assert len(segments) == segments_per_pass(10, style, stream_length)


def test_a_stream_shorter_than_one_segment_is_one_segment():
    assert segments_per_pass(10, "overlap", 3) == 1
    _, scored = scored_positions("overlap", [10], 3)
    assert scored == [0, 1, 2]
