"""What scripts/gpu_check.py and scripts/gpu_check_large.py both use: test models and batches, the
per-example exactness check, the timing of training steps, and the SKIPPED verdict of a section."""

import contextlib
import time

import torch

from utils.dp_utils import DPGradient, per_record_loss
from utils.lora_utils import add_lora
from utils.tiny_models import randomise_lora_b


class Skip(Exception):
    """A section that cannot run here (reported as SKIPPED with the reason, not as a failure)."""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def lora(model, r=16, random_b=False):
    model = add_lora(model, r=r, alpha=r, seed=0)
    return (randomise_lora_b(model, std=0.02) if random_b else model).train()


def make_batch(n, length, vocab, device, ragged=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    if ragged:  # right padding, as the collator makes it
        for i in range(n):
            mask[i, length - i * (length // (2 * n)) :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ids = ids.masked_fill(mask == 0, 1)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def losses_of(model, batch, autocast_dtype):
    device_type = batch["input_ids"].device.type
    context = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_record_loss(logits, batch["labels"])[0]


def relative(a, b):
    a = torch.cat([x.double().flatten() for x in a])
    b = torch.cat([x.double().flatten() for x in b])
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def same_batch_exactness(model, batch, autocast_dtype):
    """Max over records of ||g_i - r_i|| / ||r_i||: g_i the per-example gradient DPGradient stores,
    r_i autograd's gradient of record i's own loss in the same forward pass (so batch composition
    and padding are identical: any difference is the per-example machinery's)."""
    n = batch["input_ids"].shape[0]
    dp = DPGradient(model, 1.0, 0.0, n)
    losses_of(model, batch, autocast_dtype).sum().backward()
    ours = [dp.store.grads[p].detach().double().clone() for p in dp.params]
    dp.store.clear()
    dp.detach()
    losses = losses_of(model, batch, autocast_dtype)
    worst = 0.0
    for i in range(n):
        reference = torch.autograd.grad(losses[i], dp.params, retain_graph=i < n - 1)
        worst = max(worst, relative([g[i] for g in ours], reference))
    return worst


def time_variant(model, dp, optimizer, batch, args, autocast, label, notes):
    """3 warm-up and args.steps timed logical steps of one micro-batch; tokens/s and peak memory."""
    times = []
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(3 + args.steps):
        sync(args.device)
        start = time.perf_counter()
        dp.logical_step([(losses_of(model, batch, autocast), None)], step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        if step >= 3:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    tokens = int(batch["attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.type == "cuda" else float("nan")
    result = {"step_s": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak}
    notes.append(
        f"throughput {label}: {tokens / seconds:,.0f} tokens/s ({seconds * 1000:.0f} ms per step of "
        f"{args.batch_size} x {args.block_size} tokens), peak memory {peak:.1f} GiB"
    )
    return result
