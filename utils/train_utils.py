"""The training step, evaluation and output writing used by train_clm.py."""

import json
import math
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from utils.dp_utils import per_record_loss


def _to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def forward_losses(model, batch, accelerator):
    with accelerator.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_record_loss(logits, batch["labels"])


def train_logical_step(model, micro_batches, collator, dp_gradient, accelerator, step):
    """One logical step: every micro-batch's backward, clipped accumulation, then the noisy average
    in param.grad. Returns the step's StepStats (only its released_loss may be published)."""
    for indices in micro_batches:
        batch = _to_device(collator(indices), accelerator.device)
        losses, counts = forward_losses(model, batch, accelerator)
        # the sum of per-record losses: each record's gradient is its own, unscaled by the others
        losses.sum().backward()
        dp_gradient.accumulate_micro_batch(losses, counts)
    return dp_gradient.finish_step(step)


def all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        reduced = tensor.to(device)
        dist.all_reduce(reduced)
        return reduced.cpu()
    return tensor


@torch.no_grad()
def evaluate(model, dataset, collator, batch_size, accelerator):
    """Token-weighted validation loss and perplexity, the validation set split over processes."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    rounds = math.ceil(math.ceil(len(dataset) / accelerator.num_processes) / batch_size)
    for k in range(rounds):  # the same count on every process (FSDP gathers are collective)
        batch = _to_device(collator(indices[k * batch_size:(k + 1) * batch_size]), accelerator.device)
        losses, counts = forward_losses(model, batch, accelerator)
        totals[0] += (losses.double() * counts).sum().cpu()
        totals[1] += counts.sum().cpu()
    model.train()
    totals = all_reduce_sum(totals)
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def write_json(path, data):
    """Write-then-rename, so a crash never leaves a half-written file that looks complete."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def publish_outputs(output_dir, write_files):
    """Write outputs into a scratch folder, then move them into output_dir at once."""
    os.makedirs(output_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".incomplete-", dir=output_dir)
    try:
        write_files(scratch)
        for name in sorted(os.listdir(scratch)):
            os.replace(os.path.join(scratch, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
