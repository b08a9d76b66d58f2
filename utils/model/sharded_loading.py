"""Sharded loading: under FSDP no process ever holds the whole frozen base (docs/DESIGN.md 2.9).

The model is built on the meta device, LoRA is added (initialised on the CPU from --seed exactly as
on a loaded model, see `cpu_stand_ins`), `shard_frozen_base` shards the base, and then each process
allocates only its own shards and reads into them, from the safetensors files, the rows it owns
(FSDP2 shards every weight along its first dimension).

Why every process reads its own slices rather than process 0 streaming layers with a broadcast:
reading slices moves each byte of the checkpoint once, in parallel, straight into the shard that
keeps it, with no collective and no full-size layer buffer anywhere; a broadcast sends every whole
layer to every process (N times the bytes, through process 0's disk and network link) and each
receiver still needs a full-layer buffer. The price is that every machine must see the checkpoint
files (a shared file system or a copy per machine), as a non-FSDP run needs them too.

Reads use plain `readinto` on the file, not a memory map: mapped file pages count in a process's
resident set while mapped, read pages only sit in the (shared, reclaimable) page cache.
"""

import contextlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.cli import UserInputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 64 * 2**20  # staging buffer when the dtype or the device differs from the file's
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class Entry:
    """One tensor of a safetensors file: where its bytes are."""

    path: str
    dtype: torch.dtype
    shape: tuple
    offset: int  # from the start of the file
    nbytes: int


# ----------------------------------------------------------------------------------------------
# The checkpoint: safetensors headers only, checked against the model before anything is loaded
# ----------------------------------------------------------------------------------------------


def _read_header(path):
    """(entries by name, file size); any damage is a one-line error naming the file."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: safetensors shard missing (named in {INDEX_FILE})")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= size - 8:
            raise UserInputError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise UserInputError(f"{path}: not a safetensors file (unreadable header)") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise UserInputError(f"{path}: tensor {name} has a dtype this loader does not read ({info.get('dtype')})")
        begin, end = info["data_offsets"]
        entry = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, end - begin)
        if entry.nbytes != math.prod(entry.shape) * entry.dtype.itemsize or entry.offset + entry.nbytes > size:
            raise UserInputError(f"{path}: tensor {name} is truncated or its header is damaged")
        entries[name] = entry
    return entries


def open_checkpoint(folder):
    """Every tensor of the folder's safetensors checkpoint (one file, or shards with an index)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError):
            raise UserInputError(f"{index}: not a safetensors index (no weight_map)") from None
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        weight_map = None
    else:
        raise UserInputError(
            f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; sharded loading (FSDP) reads safetensors checkpoints only"
        )
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    entries = {}
    for file in files:
        entries.update(_read_header(os.path.join(folder, file)))
    for name, file in (weight_map or {}).items():
        if name not in entries or os.path.basename(entries[name].path) != file:
            raise UserInputError(
                f"{os.path.join(folder, file)}: safetensors shard does not hold {name}, which {INDEX_FILE} says it does"
            )
    return entries


def checkpoint_name(name):
    """A base parameter's name in the checkpoint: PEFT's wrapper adds `.base_layer`."""
    return re.sub(r"\.base_layer(?=\.)", "", name)


def _aliases(model, frozen_only):
    """Each parameter once, with every name it has (tied weights have several); frozen_only: the
    base after PEFT froze it, without the adapters."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not (frozen_only and p.requires_grad):
            names.setdefault(id(p), (p, []))[1].append(checkpoint_name(name))
    return list(names.values())


def find_entry(entries, names, folder):
    for name in names:
        if name in entries:
            return name, entries[name]
    raise UserInputError(
        f"{folder}: the checkpoint has no tensor {names[0]}, which the model needs "
        "(a shard missing from the index, or files of another model)"
    )


def check_checkpoint(entries, model, folder):
    """Every parameter of the (LoRA-free) model is in the checkpoint with the model's shape: fail
    before any loading."""
    for p, names in _aliases(model, frozen_only=False):
        name, entry = find_entry(entries, names, folder)
        if entry.shape != tuple(p.shape):
            raise UserInputError(
                f"{entry.path}: tensor {name} has shape {list(entry.shape)}, the model's config gives {list(p.shape)}"
            )


# ----------------------------------------------------------------------------------------------
# The model on the meta device, LoRA initialised as on a loaded model
# ----------------------------------------------------------------------------------------------


def empty_model(folder, dtype):
    """The model of `folder`'s config with its parameters on the meta device (buffers, such as the
    rotary frequencies, computed for real), checked against the checkpoint. Returns (model, entries)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserInputError(f"--model_name_or_path {folder}: cannot build the model ({first})") from None
    model.tie_weights()  # init_empty_weights re-registers every parameter, which unties tied ones
    model.config.use_cache = False
    entries = open_checkpoint(folder)
    check_checkpoint(entries, model, folder)
    return model, entries


@contextlib.contextmanager
def cpu_stand_ins(model):
    """PEFT creates each adapter on the CPU, initialises it, then moves it to the device and dtype of
    the adapted layer's weight: a meta weight would take the values with it. For the duration, every
    meta weight is replaced by a zero-stride CPU tensor of its shape and dtype (no memory), so the
    adapter is initialised, rounded and placed exactly as on a loaded model. No-op on a loaded model."""
    swapped = []
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.is_meta:
            module.weight = nn.Parameter(
                torch.empty((), dtype=weight.dtype).expand(weight.shape), requires_grad=weight.requires_grad
            )
            swapped.append((module, weight))
    try:
        yield
    finally:
        for module, weight in swapped:
            weight.requires_grad_(module.weight.requires_grad)  # PEFT freezes the base through the stand-in
            module.weight = weight


# ----------------------------------------------------------------------------------------------
# After `shard_frozen_base`: allocate this process's shards and read them
# ----------------------------------------------------------------------------------------------


def _materialize(model, device):
    """Allocate the meta parameters (FSDP: only this process's shard of each) on `device`;
    `to_empty` would also blank the tensors that hold values already (LoRA, buffers): they are
    kept aside and copied back."""

    def tensors():
        yield from model.named_parameters(remove_duplicate=False)
        yield from model.named_buffers(remove_duplicate=False)

    kept = {name: t.detach() for name, t in tensors() if not _local(t).is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in tensors():
            if name in kept:
                t.copy_(kept[name])


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _owned_rows(p):
    """(first, end) rows of the full tensor that this process's shard holds."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor) or p.dim() == 0 or all(isinstance(x, Replicate) for x in p.placements):
        return 0, (p.shape[0] if p.dim() else 1)
    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise RuntimeError(f"sharded loading reads dim-0 shards only, not {p.placements}")
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = math.ceil(p.shape[0] / world)  # torch.chunk's split, which FSDP2 uses
    first = min(rank * chunk, p.shape[0])
    return first, min(first + chunk, p.shape[0])


def _readinto(handle, offset, buffer, entry, name):
    view = memoryview(buffer.numpy()).cast("B")
    handle.seek(offset)
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise UserInputError(f"{entry.path}: tensor {name} is truncated")
        done += got


def read_rows(handle, entry, name, first, end, out):
    """Rows [first, end) of the tensor into `out` (any dtype and device): straight into `out`'s
    memory when it is a contiguous CPU tensor of the file's dtype, else through a bounded buffer."""
    rows = entry.shape[0] if entry.shape else 1
    row_bytes = entry.nbytes // rows if rows else 0
    offset = entry.offset + first * row_bytes
    if out.numel() * entry.dtype.itemsize != (end - first) * row_bytes:  # a layout this loader misreads
        raise RuntimeError(f"{name}: local shard of {list(out.shape)} for rows {first}:{end} of {list(entry.shape)}")
    if end <= first:
        return 0
    if out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous():
        _readinto(handle, offset, out.view(-1).view(torch.uint8), entry, name)
        return (end - first) * row_bytes
    out = out.view(end - first, -1)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for a in range(0, end - first, step):
        b = min(a + step, end - first)
        buffer = torch.empty((b - a) * row_bytes, dtype=torch.uint8)
        _readinto(handle, offset + a * row_bytes, buffer, entry, name)
        out[a:b].copy_(buffer.view(entry.dtype).view(b - a, -1))
    return (end - first) * row_bytes


@torch.no_grad()
def load_local_shards(model, entries, folder, device):
    """Allocate and fill this process's part of every base parameter (and the persistent buffers
    the checkpoint holds). Returns {"bytes_read", "checkpoint_bytes"} for this process."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # checkpoint names
    _materialize(model, device)
    handles, read = {}, 0
    try:
        jobs = [(p, *find_entry(entries, names, folder)) for p, names in _aliases(model, frozen_only=True)]
        jobs += [(b, name, entries[name]) for name, b in model.named_buffers() if name in entries]
        for tensor, name, entry in jobs:
            if entry.path not in handles:
                handles[entry.path] = open(entry.path, "rb", buffering=0)
            first, end = _owned_rows(tensor)
            read += read_rows(handles[entry.path], entry, name, first, end, _local(tensor))
    finally:
        for handle in handles.values():
            handle.close()
    used = {id(e) for _, _, e in jobs}
    return {"bytes_read": read, "checkpoint_bytes": sum(e.nbytes for e in entries.values() if id(e) in used)}


def local_folder(name, token=None):
    """A local model folder as it is; a hub name: its config and safetensors files (downloaded once
    per machine, or found in the hub cache)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, token=token, allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:  # the hub client raises many types: all mean "no files"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserInputError(f"--model_name_or_path {name}: cannot get its safetensors files ({first})") from None
