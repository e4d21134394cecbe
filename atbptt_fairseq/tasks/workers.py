"""The data-parallel workers of a fairseq run, as the task sees them."""

from typing import List, Sequence, Tuple

import torch
from fairseq.distributed import utils as distributed_utils
from torch import Tensor


def world() -> Tuple[int, int]:
    """(world size, rank) of the data-parallel group; (1, 0) outside a distributed run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group = distributed_utils.get_data_parallel_group()
        return distributed_utils.get_world_size(group), distributed_utils.get_rank(group)
    return 1, 0


def average_over_workers(tensors: List[Tensor]) -> None:
    """Replace each tensor by its mean over the workers (so that every worker decides the same
    K); a no-op on one worker."""
    world_size, _ = world()
    if world_size > 1:
        group = distributed_utils.get_data_parallel_group()
        for tensor in tensors:
            distributed_utils.all_reduce(tensor, group=group)
            tensor.div_(world_size)


def gather_columns(state: Sequence[Tensor]) -> List[Tensor]:
    """Every worker's columns of a state (batch along dim 1), concatenated in rank order."""
    group = distributed_utils.get_data_parallel_group()
    return [
        torch.cat(distributed_utils.all_gather(tensor.detach().contiguous(), group), dim=1)
        for tensor in state
    ]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model (or criterion) inside fairseq's and DDP's wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
