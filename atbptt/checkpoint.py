"""Loading checkpoints safely: verified first, unpickled weights-only, refused in one line.

:func:`load_checkpoint` is ``torch.load`` for checkpoints a user hands to a program (every front
end resumes through it). Before anything is unpickled it

* compares every member of the checkpoint's zip archive with the CRC-32 stored for it (a flipped
  bit inside tensor data would otherwise load and give wrong results);
* refuses a pickle that names a global outside torch's weights-only allowlist (and what was
  added to it with ``torch.serialization.add_safe_globals``): such a file could run code when
  loaded. A pickle that cannot be parsed, or names a global that exists nowhere (a damaged
  name), is reported as corrupt instead;
* refuses torch's legacy (non-zip) format, which stores no checksums;

then unpickles weights-only whatever the environment says (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
included). Every problem is a :class:`CheckpointError` of one line that names the file. Importing
this module changes nothing; torch and the standard library only.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import importlib.util
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import torch

DEFAULT_ADVICE = "use another checkpoint (an earlier one), or start afresh"

_FORCE_VARIABLES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
# torch's legacy format begins with its magic number pickled as a LONG1 opcode
_LEGACY_MAGIC = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_MISSING = object()


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or unsafe to unpickle."""


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = None, advice: str = DEFAULT_ADVICE
) -> Any:
    """``torch.load(path, map_location, weights_only=True)`` after :func:`check_checkpoint_file`.

    ``advice``: what to do about a damaged file, the end of its error message.
    """
    path = os.fspath(path)
    check_checkpoint_file(path, advice)
    with weights_only_unpickling(path, advice):
        return torch.load(path, map_location=map_location, weights_only=True)


def check_checkpoint_file(path: str | os.PathLike[str], advice: str = DEFAULT_ADVICE) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete zip checkpoint of plain data.

    Reads only the zip archive and the pickle's opcodes; nothing is unpickled.
    """
    path = os.fspath(path)
    check_checkpoint_path(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted write?); {advice}")
    if not zipfile.is_zipfile(path):
        raise _not_an_archive(path, advice)
    _check_archive(path, advice)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:  # any failure to read the archive
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({_first_line(error)}); {advice}"
        ) from error
    code = [name for name in sorted(unsafe) if names_existing_object(name)]
    if code:
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it pickles {', '.join(code)}, which could run "
            "code when loaded; use only checkpoints from a source you trust"
        )
    if unsafe:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (its pickle names {', '.join(sorted(unsafe))}, which "
            f"does not exist); {advice}"
        )


def check_checkpoint_path(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` unless ``path`` names a file: a missing path and a
    directory (naming the checkpoints in it) each get their own line. Reads nothing."""
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            inside = sorted(name for name in os.listdir(path) if name.endswith(".pt"))
        except OSError:
            inside = []
        held = f" (it holds {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})"
        raise CheckpointError(
            f"checkpoint {path} is a directory{held if inside else ''}; give the path of a "
            "checkpoint file"
        )
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {path} does not exist; give the path of a checkpoint file"
        )


@contextlib.contextmanager
def weights_only_unpickling(path: str, advice: str = DEFAULT_ADVICE) -> Iterator[None]:
    """Inside: ``torch.load`` unpickles weights-only whatever the environment says, and any
    failure becomes a :class:`CheckpointError` naming ``path`` (the code it refused, or damage).

    The environment is restored on exit; it is process-wide, so load from one thread at a time.
    """
    saved = {name: os.environ.get(name) for name in _FORCE_VARIABLES}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:  # reading the file failed: say which and why
        raise _load_error(path, error, advice) from error
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def names_existing_object(dotted: str) -> bool:
    """Whether the global ``module.name`` of a pickle may name real code.

    Imports nothing: a module already imported is looked into; one that is not counts as real if
    its top-level package can be found. A name that exists nowhere can only be damage.
    """
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name, attributes = ".".join(parts[:split]), parts[split:]
        # pickles of protocol 2 name Python 2 modules (``__builtin__``), renamed when loaded
        renamed = _compat_pickle.NAME_MAPPING.get((module_name, attributes[0]))
        if len(attributes) == 1 and renamed is not None:
            module_name, attributes = renamed[0], [renamed[1]]
        module_name = _compat_pickle.IMPORT_MAPPING.get(module_name, module_name)
        module = sys.modules.get(module_name)
        if module is None:
            try:
                if importlib.util.find_spec(module_name.split(".")[0]) is not None:
                    return True
            except (ImportError, ValueError):
                pass
            continue
        target = module
        for attribute in attributes:
            target = getattr(target, attribute, _MISSING)
            if target is _MISSING:
                break
        if target is not _MISSING:
            return True
    return False


def _not_an_archive(path: str, advice: str) -> CheckpointError:
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        return CheckpointError(
            f"refusing to load checkpoint {path}: it is in torch's legacy format, which stores "
            "no checksums, so damage cannot be detected; if you trust it, save it again: "
            f"torch.save(torch.load({path!r}, weights_only=True), NEW_PATH)"
        )
    if head.startswith(b"PK"):
        return CheckpointError(
            f"checkpoint {path} is truncated or corrupt (its zip archive has no end); {advice}"
        )
    return CheckpointError(
        f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (no zip archive), or it "
        f"is truncated or corrupt; {advice}"
    )


def _check_archive(path: str, advice: str) -> None:
    """Compare every archive member with the CRC-32 the zip stores for it."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({_first_line(error)}); {advice}"
        ) from error
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {damaged} fails its CRC-32 check (the file changed "
            f"after it was written); {advice}"
        )


def _load_error(path: str, error: BaseException, advice: str) -> CheckpointError:
    """A failed weights-only ``torch.load`` of ``path`` as one line: code refused, or damage."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named is not None and names_existing_object(named.group(1).rstrip(".")):
        return CheckpointError(
            f"refusing to load checkpoint {path}: it holds objects that are not plain data "
            f"({_unsupported_global(error)}); use only checkpoints from a source you trust"
        )
    reason = _reason(error) if named is None else f"{named.group(1)} does not exist"
    return CheckpointError(
        f"cannot read checkpoint {path} ({reason}): it is not a PyTorch checkpoint, or it is "
        f"truncated or corrupt; {advice}"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _unsupported_global(error: BaseException) -> str:
    """The line of torch's weights-only refusal that names the global, else its first line."""
    for line in str(error).splitlines():
        if "GLOBAL" in line:
            return line.strip().split(" was not an allowed global")[0]
    return _first_line(error)


def _reason(error: BaseException) -> str:
    """The informative line of torch's long weights-only message, else the first line."""
    for line in str(error).splitlines():
        if "Unsupported operand" in line:
            return line.strip()
    return _first_line(error)
