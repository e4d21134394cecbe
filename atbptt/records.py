"""Metrics as data: the loop's records, one JSON object a line in ``atbptt_metrics.jsonl``.

Two kinds of record produced by :class:`atbptt.TbpttLoop`: ``update`` (per update: K in force as
trained, the last estimate's bias and decay rate, the lr and clip factors, processed and scored
tokens, estimate seconds) and ``k_decision`` (per estimate: every field of the
:class:`~atbptt.TruncationDecision`, the raw choice and the reason included); and ``valid``, one
per validation of a split, from the front end that validates (:func:`valid_record`). Front ends
write them with :func:`append_records`; scripts read them with :func:`read_records` instead of
parsing logs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .controller import TruncationDecision

METRICS_FILE = "atbptt_metrics.jsonl"


def decision_record(update: int, decision: TruncationDecision) -> dict[str, Any]:
    """The record of a decision on K taken before ``update``."""
    return {"kind": "k_decision", "update": update, **dataclasses.asdict(decision)}


def valid_record(
    num_updates: int,
    subset: str,
    loss: float,
    processed_tokens: int,
    scored_tokens: int,
    wall: float,
) -> dict[str, Any]:
    """The record of a validation on ``subset`` after ``num_updates`` updates: its loss in bits
    per token (unrounded) and perplexity, the training tokens processed and scored so far and the
    run's wall-clock seconds."""
    return {
        "kind": "valid",
        "num_updates": num_updates,
        "subset": subset,
        "loss": loss,
        "ppl": 2.0**loss,
        "processed_tokens": processed_tokens,
        "scored_tokens": scored_tokens,
        "wall": wall,
    }


def record_update(record: dict[str, Any]) -> int:
    """The update a record belongs to: its ``update``; a validation after ``num_updates``
    updates belongs to the last of them (a checkpoint of that update was saved after it)."""
    if "update" in record:
        return int(record["update"])
    return int(record.get("num_updates", 0)) - 1


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records to the file at ``path``, one JSON object a line (the folder is created)."""
    lines = "".join(json.dumps(record) + "\n" for record in records)
    if not lines:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(lines)


def read_records(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file (those of ``kind`` if given); none if it does not exist. A
    last line cut short by a crash is skipped."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


def drop_records_from(path: str | os.PathLike, update: int) -> None:
    """Keep only the records of updates before ``update`` (a run resumed there writes the later
    ones again), replacing the file atomically."""
    if not Path(path).exists():
        return
    kept = [record for record in read_records(path) if record_update(record) < update]
    partial = Path(f"{path}.tmp")
    partial.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    os.replace(partial, path)


class MetricsFile:
    """``atbptt_metrics.jsonl`` in ``folder``: records appended as they come, and on a resume
    the records after the restored update dropped, so that none is written twice.

    The first write of a run also drops the file's records from its update on: they belong to
    an attempt that died before saving the checkpoint this run starts from (or before any, when
    this run starts from scratch in the same folder)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / METRICS_FILE
        self._written = False

    def write(self, *records: dict[str, Any]) -> None:
        if records and not self._written:
            drop_records_from(self.path, min(map(record_update, records)))
            self._written = True
        append_records(self.path, records)

    def resume_at(self, update: int) -> None:
        """Drop the records of ``update`` and later (the resumed run writes them again)."""
        drop_records_from(self.path, update)
        self._written = True  # nothing of a dead attempt is left for the first write to drop
