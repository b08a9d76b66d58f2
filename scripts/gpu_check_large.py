"""scripts/gpu_check.py's sections on bases larger than one process's memory (issue: sharded
loading, 4-bit bases, memory model), on a random Llama of the 7B width saved to disk:

  sharded  train_clm.py under torchrun with --fsdp (sharded loading) vs the whole base, bf16:
           peak GPU memory and peak host memory per process, against utils.model.memory_model;
  qlora    the same checkpoint loaded in 4 bits (--load_in_4bit's loader): per-example LoRA
           gradients against autograd of each record's own loss in the same batch, float32
           LoRA on the NF4 base; DP vs non-private tokens/s and peak memory.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time

import torch

from scripts.gpu_check_common import Skip, lora, make_batch, same_batch_exactness, time_variant
from utils.model.memory_model import predict, shape_of

_SAVED = {}


def saved_model(args):
    """The random Llama of args.shape with args.large_layers layers, saved once as bf16 safetensors."""
    cache = _SAVED
    if "folder" not in cache:
        from scripts.sharded_memory import build_random_llama

        folder = tempfile.mkdtemp(prefix="gpu_check_large_")
        start = time.perf_counter()
        build_random_llama(
            folder, shape=args.shape, layers=args.large_layers, dtype=torch.bfloat16, max_shard_size="2GB"
        )
        cache["folder"], cache["seconds"] = folder, time.perf_counter() - start
    return cache["folder"]


def _run_worker(args, model, out, fsdp):
    """One train_clm.py run through scripts.sharded_memory's worker; returns its rank-0 report."""
    from scripts.sharded_memory import worker_command, worker_env, write_data

    reports = out + "_reports"
    options = dict(block_size=128, per_device_train_batch_size=4, gradient_ckpt=True)  # block_size over TRAIN_ARGS's
    cmd = worker_command(model, write_data(os.path.dirname(out)), out, 1, fsdp, **options)
    env = worker_env(reports, 4)
    if args.device.type == "cuda":
        env["ACCELERATE_MIXED_PRECISION"] = "bf16"
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"train_clm.py ({'sharded' if fsdp else 'whole'}) failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(reports, "rank0.json")) as f:
        return json.load(f)


def check_sharded(args, notes):
    """Peak memory of one process with the base sharded (sharded loading) and whole, vs the model."""
    from transformers import AutoConfig

    model = saved_model(args)
    shape = shape_of(AutoConfig.from_pretrained(model))
    gib = 2**30
    bf16 = args.device.type == "cuda"
    common = dict(
        base_dtype="bfloat16" if bf16 else "float32",
        compute_bytes=2 if bf16 else 4,
        micro_batch=4,
        block_size=128,
        gradient_ckpt=True,
    )
    out, work = {}, tempfile.mkdtemp(prefix="gpu_check_sharded_")
    for label, fsdp in (("sharded", True), ("whole", False)):
        rep = _run_worker(args, model, os.path.join(work, label), fsdp)
        predicted = predict(shape, 1, fsdp=fsdp, **common)["total"]
        out[label] = {**rep, "predicted_bytes": predicted}
        line = (
            f"sharded, base {label} (1 process, {shape.layers} layers of hidden {shape.hidden}, "
            f"{'bf16' if bf16 else 'fp32'}): peak host memory {rep['peak_rss_bytes'] / gib:.2f} GiB"
        )
        if rep["peak_gpu_bytes"]:  # the model predicts device memory; on CPU the fixed costs dominate
            ratio = predicted / rep["peak_gpu_bytes"]
            line += (
                f", peak GPU memory {rep['peak_gpu_bytes'] / gib:.2f} GiB, memory model {predicted / gib:.2f} "
                f"GiB ({ratio:.2f}x{'' if 0.8 <= ratio <= 1.2 else ', off by more than 20%'})"
            )
        notes.append(line)
    shutil.rmtree(work, ignore_errors=True)
    return out


def check_qlora(args, notes):
    """4-bit base: exactness of the per-example gradients, DP vs non-private tokens/s."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes not installed (pip install bitsandbytes==0.50.2)") from None
    from utils.dp_randomness import DPRandomness
    from utils.dp_utils import DPGradient
    from utils.model.model_utils import load_model_4bit

    start = time.perf_counter()
    dtype = "bf16" if args.device.type == "cuda" else "no"
    model = lora(load_model_4bit(saved_model(args), dtype, device=args.device), random_b=True)
    notes.append(
        f"qlora: {args.large_layers} layers of hidden {args.shape['hidden_size']} loaded in 4 bits in "
        f"{time.perf_counter() - start:.0f} s"
    )
    batch = make_batch(4, min(args.block_size, 256), args.shape["vocab_size"], args.device, ragged=True)
    out = {"exactness": {}}
    # without autocast LoRA runs in float32 on the NF4 base's bf16 output; under the bf16 config's
    # autocast LoRA's matmuls are bf16 too, and autograd's reference rounds its sums to bf16
    cuda = args.device.type == "cuda"
    modes = [("float32 LoRA", None, 1e-4)] + ([("bf16 autocast", torch.bfloat16, 3e-2)] if cuda else [])
    for label, autocast, tolerance in modes:
        worst = same_batch_exactness(model, batch, autocast)
        out["exactness"][label] = worst
        notes.append(
            f"qlora exactness, {label}: max over 4 records of ||g_i - autograd of record i's loss|| / ||.|| "
            f"= {worst:.3g} (tolerance {tolerance:g})"
        )
        if worst >= tolerance:
            raise AssertionError(f"4-bit base, {label}: per-example gradients differ from autograd: {worst:.3g}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batch = make_batch(args.batch_size, args.block_size, args.shape["vocab_size"], args.device)
    for label, clip, sigma in [("non-private", None, 0.0), ("DP", 1.0, 1.0)]:
        dp = DPGradient(model, clip, sigma, args.batch_size, DPRandomness(insecure_seed=0))
        out[label] = time_variant(
            model, dp, optimizer, batch, args, torch.bfloat16 if cuda else None, f"qlora {label}", notes
        )
        dp.detach()
    out["dp_over_nonprivate_time"] = out["DP"]["step_s"] / out["non-private"]["step_s"]
    notes.append(f"qlora: DP step time / non-private step time = {out['dp_over_nonprivate_time']:.2f}")
    return out
