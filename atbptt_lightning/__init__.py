"""Adaptive truncated BPTT for Lightning 2.x, which dropped ``truncated_bptt_steps``.

A thin adapter over :class:`atbptt.TbpttDriver`: see :class:`TbpttModule`.
"""

from .module import SegmentSlots, TbpttModule

__all__ = ["SegmentSlots", "TbpttModule"]
