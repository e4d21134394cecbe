"""Three fixes for fairseq-fixed under torchrun.

1. torchrun on a machine without CUDA devices. fairseq's ``_infer_torch_distributed_launch_init``
   sets ``device_id = rank % torch.cuda.device_count()``, a ZeroDivisionError when there is no
   GPU, so ``torchrun ... fairseq-train --cpu`` dies before training starts. Without CUDA devices
   the replacement does what fairseq does otherwise (env:// rendezvous, rank and world size from
   torchrun's environment, no spawning) with device 0, and picks the gloo backend instead of the
   default nccl, which needs GPUs. With GPUs fairseq's own function runs unchanged.

2. Resuming with several ranks. Rank 0 loads the checkpoint (through the plugin's safe loader)
   and fairseq broadcasts it to the other ranks with ``torch.save``/``torch.load``. Under torch's
   weights-only default the receivers refuse the checkpoint's config (an OmegaConf ``DictConfig``
   that rank 0 built itself), so every multi-rank resume fails. The receivers here unpickle the
   broadcast fully: it is an object rank 0 of the same job holds in memory, not a file, and the
   file it came from was checked by :mod:`atbptt_fairseq.checkpoint_guard`.

3. Exiting with gloo. fairseq never destroys its process group; at interpreter exit gloo's
   worker threads can then still hold tensors whose release needs the GIL of an interpreter being
   torn down, and the process aborts ("terminate called without an active exception", SIGABRT)
   after training has finished, so torchrun reports the run as failed (pytorch/pytorch#190489).
   A process using gloo destroys its process group while the interpreter is still alive (an
   ``atexit`` handler). gloo's teardown is local to the process; nccl is left to fairseq.
"""

import io
import logging
import os

import torch
from fairseq.distributed import utils as distributed_utils

logger = logging.getLogger(__name__)

_original_launch_init = distributed_utils._infer_torch_distributed_launch_init


def _infer_torch_distributed_launch_init(cfg) -> None:
    if torch.cuda.device_count() > 0:
        return _original_launch_init(cfg)
    cfg.distributed_init_method = "env://"
    cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
    cfg.distributed_rank = int(os.environ["RANK"])
    cfg.device_id = 0
    cfg.distributed_no_spawn = True
    if cfg.distributed_backend == "nccl":
        logger.info("no CUDA device: using the gloo backend instead of nccl")
        cfg.distributed_backend = "gloo"


def _broadcast_object_slow(obj, src_rank: int, group, dist_device: torch.device):
    """fairseq's version, with the receivers' ``torch.load(..., weights_only=False)``."""
    if distributed_utils.get_rank(group) == src_rank:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer = torch.ByteTensor(buffer.getbuffer()).to(dist_device)
        length = torch.LongTensor([len(buffer)]).to(dist_device)
        distributed_utils.broadcast(length, src=src_rank, group=group)
        distributed_utils.broadcast(buffer, src=src_rank, group=group)
        return obj
    length = torch.LongTensor([0]).to(dist_device)
    distributed_utils.broadcast(length, src=src_rank, group=group)
    buffer = torch.ByteTensor(int(length.item())).to(dist_device)
    distributed_utils.broadcast(buffer, src=src_rank, group=group)
    return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)


def destroy_gloo_process_group() -> None:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        if distributed.get_backend() == "gloo":
            distributed.destroy_process_group()
