"""What every experiment command prints and writes: progress lines, one-line errors, JSON files."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def log(message: str, prefix: str = "") -> None:
    """One progress line on stderr (stdout stays free for results and data)."""
    print(f"[{prefix}] {message}" if prefix else message, file=sys.stderr, flush=True)


def fail(message: str) -> SystemExit:
    """The one-line user-facing error, for ``raise fail(...)``."""
    return SystemExit(f"error: {message}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` write ``path``'s content to a temporary sibling, then rename it into place,
    so that a reader or an interrupted writer never sees half a file (and a failed write leaves
    none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict[str, Any], indent: int = 1) -> None:
    """Write ``payload`` as JSON atomically (:func:`write_atomically`)."""
    text = json.dumps(payload, indent=indent) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], numbers_right: bool = True
) -> str:
    """A plain-text table under a rule of dashes, the first column left-aligned, the others
    right-aligned (``numbers_right``) or left-aligned."""
    cells = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def render(row: list[str]) -> str:
        rest = [
            cell.rjust(width) if numbers_right else cell.ljust(width)
            for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join([row[0].ljust(widths[0]), *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(cells[0]), rule] + [render(row) for row in cells[1:]])
