"""Lightning's checkpoint I/O with the core's safe loader (:func:`atbptt.load_checkpoint`).

Lightning's own ``TorchCheckpointIO`` calls ``torch.load`` with ``weights_only=None``, which
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into a full unpickling (a pickled ``os.system``
runs), and it loads a checkpoint whose tensor data changed without a word. Pass
``plugins=[SafeCheckpointIO()]`` to the ``Trainer``: ``fit(ckpt_path=...)`` then verifies the
file's CRC-32s and refuses unsafe globals before anything is unpickled, and raises
:class:`atbptt.CheckpointError` (one line naming the file) for a bad checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from atbptt import CheckpointError, load_checkpoint

ADVICE = "resume from another checkpoint, or start afresh without ckpt_path"


class SafeCheckpointIO(TorchCheckpointIO):
    """Saves as Lightning does; loads local files through :func:`atbptt.load_checkpoint`.

    Loading is always weights-only: globals outside torch's allowlist (e.g. from
    ``save_hyperparameters`` of custom objects) are refused unless you allowlist them with
    ``torch.serialization.add_safe_globals``. ``advice``: what to do about a damaged file, the
    end of its error message.
    """

    def __init__(self, advice: str = ADVICE) -> None:
        super().__init__()
        self.advice = advice

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = "cpu",
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                "SafeCheckpointIO loads weights only; use Lightning's TorchCheckpointIO to load "
                "a trusted checkpoint with weights_only=False"
            )
        path = os.fspath(path)
        if "://" in path:
            raise CheckpointError(
                f"checkpoint {path} is not a local file: SafeCheckpointIO verifies local files "
                "only; copy it here first"
            )
        return load_checkpoint(path, map_location=map_location, advice=self.advice)
