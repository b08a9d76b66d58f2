"""Where this process stands in a torch.distributed job (a plain run is a job of one)."""

import torch.distributed as dist


def distributed() -> bool:
    """True inside an initialised process group (torchrun, accelerate launch)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1
