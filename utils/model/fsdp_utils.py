"""Multi-process helpers: FSDP of the frozen base (LoRA parameters left out), replica agreement check.

docs/DESIGN.md 2.9: with FSDP the frozen base weights are sharded over the processes; the LoRA
parameters are excluded from FSDP, replicated on every process as plain tensors, and synchronised
only through the DP sum (one all-reduce per logical step in `DPGradient.finish_step`). FSDP
therefore never reduces a gradient: the base is frozen and the adapters are ignored parameters.

accelerate applies FSDP only to GPU-like devices and only to models passed through
`accelerator.prepare`, which train_clm.py does not do (no DDP/FSDP hooks on LoRA parameters).
`shard_frozen_base` is the one function both paths use: under an FSDP accelerate config on GPUs,
and on CPU (gloo, under torchrun) when `--fsdp` asks for it in tests.
"""

import ctypes
import ctypes.util
import os

import torch
import torch.distributed as dist

from utils.cli import UserInputError
from utils.dist_utils import distributed, world_size


def fsdp_requested(flag, accelerator):
    """--fsdp, an FSDP accelerate config (GPU), or `ACCELERATE_USE_FSDP=true` set by `accelerate
    launch` with an FSDP config on a machine where accelerate itself would not apply it (CPU)."""
    from accelerate.utils import DistributedType

    requested = (
        bool(flag)
        or accelerator.distributed_type == DistributedType.FSDP
        or (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.num_processes > 1)
    )
    if requested and not distributed():
        raise UserInputError("--fsdp needs a process group: start the script with `accelerate launch` or `torchrun`")
    return requested


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 64 << 10


def return_freed_memory_at_once(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation above `threshold` by mmap, so a freed block leaves the
    resident set at once (True when set). Under FSDP on CPU each all-gathered layer is freed after
    use; glibc's dynamic threshold (up to 32 MiB) keeps such blocks in the heap, and the two-process
    peak rose from 0.70x to 1.08x of one unsharded process (docs/performance.md). The environment
    variable MALLOC_MMAP_THRESHOLD_ does the same but is read only when a process starts; when it is
    set, it wins. Elsewhere than glibc (no mallopt) nothing changes."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def _hf_model(model):
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plugin_settings(accelerator):
    """Wrap class names and reshard setting from an FSDP accelerate config, when there is one."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if accelerator is not None else None
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) if plugin is not None else None
    reshard = getattr(plugin, "reshard_after_forward", True) if plugin is not None else True
    return names, reshard if isinstance(reshard, bool) else True


def _own_groups(hf_model):
    """The input and output embeddings, each its own group unless they share their weight: in the
    root's group they would stay whole through the whole forward and backward (the root's forward
    is the model's), the largest whole copy a process would hold (2 x vocab x hidden)."""
    embed, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    if embed is None or head is None:
        return []
    shared = {id(p) for p in embed.parameters()} & {id(p) for p in head.parameters()}
    return [] if shared else [embed, head]


def shard_frozen_base(model, device, accelerator=None, layer_class_names=None):
    """Shard the frozen base with torch FSDP2 `fully_shard`: each decoder layer is one group, the
    input and output embeddings one each (unless tied), the root (final norm, and tied embeddings)
    another. Trainable (LoRA) parameters are passed as `ignored_params`: FSDP neither shards nor
    moves them nor touches their gradients, so the per-example hooks see the full LoRA weights and
    the optimizer updates plain tensors.

    Needs an initialised process group (accelerate launch, torchrun). The model may sit on the CPU
    (FSDP moves one layer at a time to `device` and keeps this process's shard) or on the meta
    device (utils/model/sharded_loading.py then allocates and reads the shards). Returns the model."""
    if not distributed():
        raise RuntimeError("FSDP needs a process group: start the script with `accelerate launch` or `torchrun`")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    hf_model = _hf_model(model)
    config_names, reshard = _plugin_settings(accelerator)
    names = set(layer_class_names or config_names or getattr(hf_model, "_no_split_modules", None) or [])
    layers = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"FSDP: no decoder layer of the classes {sorted(names)} in {type(hf_model).__name__}; "
            "set fsdp_transformer_layer_cls_to_wrap in the accelerate config"
        )
    trainable = {p for p in model.parameters() if p.requires_grad}
    for p in trainable:  # ignored parameters are not moved by FSDP
        p.data = p.data.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for group in reversed(layers + _own_groups(hf_model)):  # bottom-up, as fully_shard requires
        fully_shard(group, mesh=mesh, reshard_after_forward=reshard, ignored_params=trainable)
    # the root too reshards after forward (FSDP2 would keep it whole from forward to backward, and
    # after an evaluation forward until the next step): the base stays sharded between passes
    fully_shard(hf_model, mesh=mesh, reshard_after_forward=reshard, ignored_params=trainable)
    return model


def shard_summary(model):
    """How the parameters are held on this process (for tests and gpu_check): base parameters
    sharded (DTensor, local shard smaller than the full tensor), LoRA parameters plain and whole."""
    from torch.distributed.tensor import DTensor

    out = {
        "base_params": 0,
        "base_sharded": 0,
        "base_local_numel": 0,
        "base_full_numel": 0,
        "lora_params": 0,
        "lora_sharded": 0,
        "lora_numel": 0,
        "example": None,
    }
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        kind = "lora" if p.requires_grad else "base"
        out[f"{kind}_params"] += 1
        out[f"{kind}_sharded"] += int(isinstance(p, DTensor) and local.numel() < p.numel())
        if kind == "base":
            out["base_local_numel"] += local.numel()
            out["base_full_numel"] += p.numel()
            if out["example"] is None and name.endswith("q_proj.base_layer.weight"):
                out["example"] = {"name": name, "local_shape": list(local.shape), "full_shape": list(p.shape)}
        else:
            out["lora_numel"] += local.numel()
    return out


# ----------------------------------------------------------------------------------------------
# Adapters never drift: every process applies the same update to the same replica
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def replica_checksum(params):
    """float64 [sum, sum of |x|, position-weighted sum] over the parameters: equal bit for bit on
    every process when the replicas are equal, different with overwhelming probability otherwise."""
    total = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    for k, p in enumerate(params):
        x = p.detach().double().flatten()
        weights = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) / x.numel() + k
        total += torch.stack([x.sum(), x.abs().sum(), (x * weights).sum()])
    return total


def assert_replicas_agree(params, step=None):
    """All-gather the checksum of the trainable parameters; raise if any process differs."""
    if world_size() == 1:
        return
    mine = replica_checksum(params)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        values = [g.tolist() for g in gathered]
        raise RuntimeError(f"LoRA adapters differ across processes after step {step}: checksums {values}")
