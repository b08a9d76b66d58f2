"""Where this process stands in a torch.distributed job (a plain run is a job of one)."""

import socket
import sys

import torch.distributed as dist


def distributed() -> bool:
    """True inside an initialised process group (torchrun, accelerate launch)."""
    return dist.is_available() and dist.is_initialized()


def end_process_group() -> None:
    """Leave the job's process group, once every process has finished its work."""
    if distributed():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def torchrun_command(processes: int, *args: str) -> list[str]:
    """A one-machine torchrun launch of `processes` processes, each running `args` (a script or -m module)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]


def accelerate_launch_command(config: str, *args: str) -> list[str]:
    """`accelerate launch` with a config file; `args` are launcher overrides (cli_flags(num_processes=2)),
    then the script and its arguments."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *args]


def free_port() -> int:
    """A TCP port on localhost that no process listens on now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_main_process(fn, share: bool = False):
    """fn() on process 0 alone (e.g. the privacy ledger, which only process 0 writes). Its bad-input
    error stops every process with the same line; with share, every process gets its (small,
    picklable) result, else the others get None."""
    from utils.cli import UserInputError

    outcome = [(None, None)]
    if rank() == 0:
        try:
            value = fn()
            outcome = [(None, value if share else None)]
        except UserInputError as err:
            outcome = [(str(err), None)]
            if world_size() == 1:
                raise
    if world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    error, shared = outcome[0]
    if error is not None:
        raise UserInputError(error)
    return value if rank() == 0 else shared
