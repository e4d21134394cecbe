"""Token streams laid out as columns, and the segment plan of truncated BPTT over them.

Plain PyTorch: the fairseq task and the plain-PyTorch driver build these; tests drive them directly.
"""

from dataclasses import dataclass

from torch import Tensor


class StreamTooShortError(ValueError):
    """A split cannot give every column at least one prediction."""


def lay_out_columns(
    tokens: Tensor,
    total_columns: int,
    targets: Tensor | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
) -> tuple[Tensor, Tensor]:
    """Cut a 1-D token stream into ``total_columns`` contiguous columns and keep this shard's rows.

    Without ``targets`` (language modelling) each column predicts its own next token, so column
    inputs are ``col[:-1]`` and targets ``col[1:]``: every token after the first of each column is
    predicted exactly once. With token-aligned ``targets`` (e.g. the copy task), input t predicts
    target t. The remainder that does not fill a column is dropped. Returns inputs, targets: C x n
    with C = total_columns // num_shards.
    """
    if total_columns % num_shards != 0:
        raise ValueError(f"{total_columns} columns cannot be split over {num_shards} workers")
    if targets is not None and targets.numel() != tokens.numel():
        raise ValueError(
            f"the target stream has {targets.numel()} tokens but the input stream {tokens.numel()}; "
            "they must be token-aligned"
        )
    column_length = tokens.numel() // total_columns
    min_length = 2 if targets is None else 1
    if column_length < min_length:
        raise StreamTooShortError(
            f"a stream of {tokens.numel()} tokens gives {column_length} tokens to each of "
            f"{total_columns} columns; use a smaller batch size or more data"
        )
    per_shard = total_columns // num_shards
    rows = slice(shard_id * per_shard, (shard_id + 1) * per_shard)
    columns = tokens[: total_columns * column_length].view(total_columns, column_length)[rows]
    if targets is None:
        return columns[:, :-1].contiguous(), columns[:, 1:].contiguous()  # C x (L-1)
    target_columns = targets[: total_columns * column_length].view(total_columns, column_length)
    return columns.contiguous(), target_columns[rows].contiguous()  # C x L


def aligned_stream(tokens: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The whole split as one input stream and its aligned targets (for sampling estimate windows)."""
    if targets is None:
        return tokens[:-1], tokens[1:]
    return tokens, targets


@dataclass
class StreamCursor:
    """Where training stands in the column stream.

    ``position``: the next position to score; ``state_position``: the position the carried state
    belongs to (the state after reading inputs ``[0, state_position)``); ``passes``: completed
    passes over the data.
    """

    position: int = 0
    state_position: int = 0
    passes: int = 0

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "state_position": self.state_position,
            "passes": self.passes,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "StreamCursor":
        return cls(int(state["position"]), int(state["state_position"]), int(state["passes"]))


@dataclass
class Segment:
    """One training window over the columns.

    Inputs ``[window_start, window_end)`` are read from the state at ``window_start``; positions
    ``[window_start + output_start, window_end)`` are scored; the state after ``carry_offset``
    steps is carried to the next segment. ``new_pass``: the carried state must be reset to zero.
    """

    window_start: int
    window_end: int
    output_start: int
    carry_offset: int
    new_pass: bool

    @property
    def scored(self) -> int:
        return self.window_end - self.window_start - self.output_start


def plan_segment(
    cursor: StreamCursor,
    truncation_length: int,
    style: str,
    stream_length: int,
    join_remainder: bool = True,
) -> Segment:
    """Plan the next segment and advance ``cursor`` past it.

    ``disjoint``: window K from the carried state, all K positions scored, stride K.
    ``overlap`` (the paper's): the window starts K-1 steps before the scored positions (at the
    carried state), K positions are scored, the stride is K, and the state carried on is the one
    K-1 steps before the next scored position. At the start of a pass the window is clipped to the
    stream start, so every position of a pass is scored exactly once. A remainder at the end of the
    pass shorter than half a segment joins the last segment (up to 1.5 K scored positions), so no
    update is spent on a few tokens (e.g. one end-of-sentence symbol) with a large loss variance;
    ``join_remainder`` False keeps it a segment of its own.
    """
    if truncation_length < 1:
        raise ValueError(f"truncation length must be >= 1, got {truncation_length}")
    new_pass = cursor.position >= stream_length
    if new_pass or (cursor.position == 0 and cursor.state_position == 0):
        if new_pass:
            cursor.passes += 1
        cursor.position = cursor.state_position = 0
        new_pass = True
    start = cursor.state_position
    scored_start = cursor.position
    end = min(scored_start + truncation_length, stream_length)
    if join_remainder and 2 * (stream_length - end) < truncation_length:
        end = stream_length
    if style == "disjoint":
        next_state_position = end
        start = scored_start
    elif style == "overlap":
        next_state_position = max(start, end - (truncation_length - 1))
    else:
        raise ValueError(f"unknown TBPTT style {style!r}; use 'overlap' or 'disjoint'")
    segment = Segment(
        window_start=start,
        window_end=end,
        output_start=scored_start - start,
        carry_offset=next_state_position - start,
        new_pass=new_pass,
    )
    cursor.position = end
    cursor.state_position = next_state_position
    return segment


def segments_per_pass(truncation_length: int, style: str, stream_length: int) -> int:
    """How many segments one pass over a stream of ``stream_length`` positions takes at a fixed K."""
    cursor = StreamCursor()
    segments = 0
    while True:
        plan_segment(cursor, truncation_length, style, stream_length)
        segments += 1
        if cursor.position >= stream_length:
            return segments
