"""The training step, what each step publishes, evaluation, the optimizer and output writing used by
train_clm.py."""

import math

import torch
import torch.distributed as dist
from transformers import get_scheduler

from utils.dist_utils import world_size
from utils.dp_utils import per_record_loss


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def forward_losses(model: torch.nn.Module, batch: dict, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    with accelerator.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_record_loss(logits, batch["labels"])


def train_logical_step(model: torch.nn.Module, record_batches: list, collator, dp_gradient, accelerator, step: int):
    """One logical step: every micro-batch's backward, clipped accumulation, then the noisy average
    in param.grad. record_batches: the sampler's (record indices, unit slots) of each micro-batch.
    Returns the step's StepStats (only its released_loss may be published)."""

    def forward(record_batch):
        indices, units = record_batch
        losses, counts = forward_losses(model, to_device(collator(indices), accelerator.device), accelerator)
        return losses, counts, units

    return dp_gradient.logical_step(map(forward, record_batches), step)


class StepLog:
    """What each step publishes (`history`: training_log.json and the tracker) and what only the
    console sees (`postfix`, the progress bar; `exact`: --train_loss exact's curator-only file).

    A private run publishes its DP loss estimate; a non-private run (epsilon infinite) its exact
    loss; `--train_loss exact` keeps exact losses out of the history, in their own file."""

    def __init__(self, plan):
        self.plan = plan
        self.history, self.exact, self.postfix = [], [], {}
        self.last_released_loss = None

    def add(self, step: int, stats, lr: float) -> dict:
        """The row of step `step`, epsilon after it included: what the log and tracker publish."""
        plan = self.plan
        row = {"step": step, "lr": lr}
        loss = stats.released_loss if plan.private else stats.exact_loss
        if loss is not None:
            row["train_loss"] = self.last_released_loss = loss
            self.postfix["loss"] = f"{loss:.4f}"
        if plan.private and plan.train_loss == "exact":
            self.exact.append({"step": step, "exact_train_loss": stats.exact_loss, "records": stats.records})
            self.postfix["exact loss (not private)"] = f"{stats.exact_loss:.4f}"
        if plan.private:
            row["epsilon"] = plan.published_epsilon()  # None when the DP seed is known
            self.postfix["eps_if_seed_secret" if plan.seed_published else "eps"] = f"{plan.epsilon():.3f}"
        self.postfix["lr"] = f"{lr:.2e}"
        self.history.append(row)
        return row


def build_optimizer(params: list, args, total_steps: int):
    """AdamW (or plain SGD) over the LoRA parameters, with the requested learning-rate schedule."""
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(
            params,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.weight_decay,
            eps=args.adam_epsilon,
        )
    else:
        optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=0.0, weight_decay=args.weight_decay)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=max(total_steps, 1),
    )
    return optimizer, scheduler


def tracker_config(args) -> dict:
    """The run's arguments for the tracker: public configuration, without the access token and the
    testing DP seed (whoever has it regenerates every sample and noise draw)."""
    flags = {k: v for k, v in vars(args).items() if k != "privacy"} | vars(args.privacy)
    return {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in flags.items()
        if k not in ("access_token", "insecure_dp_seed")
    }


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        reduced = tensor.to(device)
        dist.all_reduce(reduced)
        return reduced.cpu()
    return tensor


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, collator, batch_size: int, accelerator) -> dict[str, float]:
    """Token-weighted validation loss and perplexity, the validation set split over processes."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    rounds = math.ceil(math.ceil(len(dataset) / accelerator.num_processes) / batch_size)
    for k in range(rounds):  # the same count on every process (FSDP gathers are collective)
        batch = to_device(collator(indices[k * batch_size : (k + 1) * batch_size]), accelerator.device)
        losses, counts = forward_losses(model, batch, accelerator)
        totals[0] += (losses.double() * counts).sum().cpu()
        totals[1] += counts.sum().cpu()
    model.train()
    totals = all_reduce_sum(totals)
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
