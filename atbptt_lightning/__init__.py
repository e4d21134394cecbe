"""Adaptive truncated BPTT for Lightning 2.x, which dropped ``truncated_bptt_steps``.

A thin adapter over :class:`atbptt.TbpttDriver`: see :class:`TbpttModule`. Pass
``plugins=[SafeCheckpointIO()]`` to the ``Trainer`` so that resuming verifies the checkpoint.
"""

from .checkpoint_io import SafeCheckpointIO
from .module import SegmentSlots, TbpttModule

__all__ = ["SafeCheckpointIO", "SegmentSlots", "TbpttModule"]
