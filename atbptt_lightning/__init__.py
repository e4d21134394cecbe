"""Adaptive truncated BPTT for Lightning 2.x, which dropped ``truncated_bptt_steps``.

A thin adapter over :class:`atbptt.TbpttDriver`: see :class:`TbpttModule`. Pass
``plugins=[SafeCheckpointIO()]`` to the ``Trainer`` so that resuming verifies the checkpoint.
Needs Lightning, the package's ``lightning`` extra.
"""

try:
    import lightning  # noqa: F401
except ModuleNotFoundError as error:
    if error.name != "lightning":
        raise
    raise ModuleNotFoundError(
        "atbptt_lightning needs Lightning: pip install 'atbptt-fairseq[lightning]'",
        name="lightning",
    ) from None

from .checkpoint_io import SafeCheckpointIO  # noqa: E402
from .module import SegmentSlots, TbpttModule  # noqa: E402

__all__ = ["SafeCheckpointIO", "SegmentSlots", "TbpttModule"]
