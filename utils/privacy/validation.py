"""A private validation loss, for validation data that may not be disclosed (docs/DESIGN.md 2.15).

Each evaluation is one Gaussian mechanism over the validation units (records, or units under
--privacy_unit_key): every unit's mean record loss clipped to [0, L], summed, plus one draw of
N(0, (sigma_v L)^2) by process 0, divided by the published number of units V. Adding or removing a
unit moves the sum by at most L, so E evaluations compose E Gaussians of noise multiplier sigma_v
(`validation_epsilon`). The evaluations go on the privacy ledger under the validation units, each
before it runs; training and validation data share no unit (data_utils.check_disjoint), so the
two compose in parallel.
"""

import dataclasses
import math

import torch

from utils.data_utils import privacy_units, unit_keys
from utils.dist_utils import rank
from utils.privacy.accounting import check_delta, compute_epsilon
from utils.train_utils import all_reduce_sum, forward_losses, to_device


@dataclasses.dataclass
class PrivateValidation:
    units: list  # record indices per validation unit
    noise_multiplier: float  # sigma_v
    loss_clip: float  # L
    keys: list  # data_utils.unit_keys of the validation records (the ledger salts them)
    evaluations: int = 0  # taken by this session
    admitted: object = None  # the ledger session (process 0)


def private_validation(args, validation, loss_clip: float) -> PrivateValidation | None:
    """From --validation_noise_multiplier: the validation units and their Gaussian (None: public
    validation data, evaluated exactly)."""
    if args.validation_noise_multiplier is None or validation is None:
        return None
    if args.privacy.privacy_unit_key:
        units = privacy_units(validation, args.privacy.privacy_unit_key, args.validation_file or "validation split")
    else:
        units = [[i] for i in range(len(validation))]
    try:
        check_delta(args.privacy.delta, len(units), "validation units")
    except ValueError as err:
        from utils.cli import UserInputError

        raise UserInputError(f"--validation_noise_multiplier: {err}") from None
    keys = unit_keys(validation, args.privacy.privacy_unit_key)
    return PrivateValidation(units, args.validation_noise_multiplier, loss_clip, keys)


def planned_evaluations(start: int, total: int, eval_freq: int) -> int:
    """Evaluations a session from step `start` to `total` runs: every eval_freq steps, and the final one."""
    periodic = (total - 1) // eval_freq - start // eval_freq if eval_freq and total > start else 0
    return max(periodic, 0) + 1


@torch.no_grad()
def evaluate_private(model, dataset, collator, batch_size, accelerator, validation, noise) -> dict[str, float]:
    """The private validation loss and its perplexity. noise() is process 0's one draw of
    N(0, (sigma_v L)^2); the units are split over processes, every process runs as many batches."""
    model.eval()
    units, clip, processes = validation.units, validation.loss_clip, accelerator.num_processes
    mine = units[accelerator.process_index :: processes]
    records = [r for unit in mine for r in unit]
    slot = torch.tensor([k for k, unit in enumerate(mine) for _ in unit], dtype=torch.long)
    weight = torch.tensor([1.0 / len(unit) for unit in mine for _ in unit], dtype=torch.float64)
    longest = max(sum(len(u) for u in units[p::processes]) for p in range(processes))
    means = torch.zeros(len(mine), dtype=torch.float64)
    for start in range(0, math.ceil(longest / batch_size) * batch_size, batch_size):
        part = records[start : start + batch_size]
        losses, _ = forward_losses(model, to_device(collator(part), accelerator.device), accelerator)
        losses = torch.nan_to_num(losses[: len(part)].double().cpu(), nan=clip, posinf=clip, neginf=0.0)
        means.index_add_(0, slot[start : start + len(part)], losses * weight[start : start + len(part)])
    model.train()
    total = means.clamp(0.0, clip).sum().reshape(1)
    if rank() == 0:
        total += noise()
    loss = float(all_reduce_sum(total)[0]) / len(units)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def validation_report(validation, evaluations: int, delta: float, seed_published: bool = False) -> dict:
    """privacy_report.json's validation keys; `evaluations`: every one this run took, on any branch.
    A known DP seed (--insecure_dp_seed) regenerates the noise: no epsilon, only the figure if it
    were secret."""
    if validation is None:
        return {"validation": "public"}
    sigma = validation.noise_multiplier
    epsilons = {
        "validation_epsilon": compute_epsilon(sigma, 1.0, evaluations, delta),
        "validation_epsilon_replace_one": compute_epsilon(sigma, 1.0, evaluations, delta, "replace_one"),
    }
    if seed_published:
        epsilons = {**{k: None for k in epsilons}, **{f"{k}_if_seed_secret": v for k, v in epsilons.items()}}
    return {
        "validation": "private",
        "validation_noise_multiplier": sigma,
        "validation_loss_clip": validation.loss_clip,
        "validation_units": len(validation.units),
        "validation_evaluations": evaluations,
        **epsilons,
    }
