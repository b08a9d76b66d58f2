"""DP-SGD for LoRA, the whole engine: exact per-example gradients, clipping, accumulation, noise.

Privacy rules implemented here (docs/DESIGN.md section 2):
  * per-example gradient g_i of record i's own loss, products accumulated in float32 (or wider);
  * clip jointly over all trainable parameters: g_i * min(1, C / ||g_i||);
  * S = sum of clipped g_i over micro-batches and processes, one all-reduce per logical step;
  * Z ~ N(0, sigma^2 C^2 I) drawn once per logical step (by process 0 only, before the sum);
  * the optimizer sees (S + Z) / B with B the expected logical batch size;
  * a non-finite per-example gradient contributes zero (its count stays on the console);
  * the training loss leaves the process only as a DP estimate on the same sample.

Per-example gradients (docs/DESIGN.md 2.2, 2.12): each trainable linear layer's forward runs through
an autograd function that saves its input and whose backward computes the per-example weight
gradients (one rule per layer type, registered in PER_EXAMPLE_FORWARDS) straight into the store,
so autograd never computes the summed LoRA gradient that would be thrown away. Saving the input in
the autograd context (not in a module attribute) keeps activation checkpointing safe: a recomputed
forward saves a fresh input for exactly one backward call.

Speed (docs/performance.md): every layer's per-example gradients land in one [n, P] buffer (one row per
record), so the joint norms are one reduction and the clipped sum one matrix-vector product,
whatever the number of layers; the buffer is dropped as soon as the micro-batch is clipped.
"""

import dataclasses
import functools
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils.cli import UserInputError
from utils.dist_utils import rank, world_size
from utils.dp_randomness import secure_gaussian

# ----------------------------------------------------------------------------------------------
# Per-layer rules and the store their backward fills
# ----------------------------------------------------------------------------------------------


def accumulation_dtype(dtype):
    """float32 products even under bf16/fp16 autocast; float64 stays float64 (tests)."""
    return torch.promote_types(dtype, torch.float32)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def linear_per_example_grad(inputs, grad_output, transposed=None, dtype=None):
    """Per-example weight gradient of y = x W^T for x [n, ..., in] and dL/dy [n, ..., out].

    Tokens (all middle dimensions) are summed inside one batched matmul (float32 or wider).
    Returns [n, out, in] (transposed=False) or its [n, in, out] transpose (transposed=True);
    by default whichever is faster to compute, as an [n, out, in] (possibly transposed) view:
    x^T g when out > in (LoRA B: [n, r, out] has long rows, [n, out, r] rows only r wide;
    measured 1.8x on [8, 512, 16]). dtype: of the products, by default float32 or wider."""
    if dtype is None:
        dtype = accumulation_dtype(torch.promote_types(inputs.dtype, grad_output.dtype))
    x, g = _as(inputs, dtype), _as(grad_output, dtype)
    if x.dim() != 3:
        n = x.shape[0]
        x, g = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
    if transposed is None:
        wide = g.shape[-1] > x.shape[-1]
        return torch.bmm(x.transpose(1, 2), g).transpose(1, 2) if wide else torch.bmm(g.transpose(1, 2), x)
    return torch.bmm(x.transpose(1, 2), g) if transposed else torch.bmm(g.transpose(1, 2), x)


class _PerExampleLinear(torch.autograd.Function):
    """y = F.linear(x, W); backward gives dL/dx and writes per-example dL/dW into `store`."""

    @staticmethod
    def forward(ctx, x, weight, store):
        ctx.store = store
        # the parameter itself keys the store: under activation checkpointing the saved tensors
        # come back as new tensor objects
        ctx.param = weight
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _as(grad_output.matmul(_as(weight, grad_output.dtype)), x.dtype)
        store = ctx.store
        if torch.is_autocast_enabled(grad_output.device.type):  # backward called inside autocast
            with torch.autocast(grad_output.device.type, enabled=False):
                store.add_linear(ctx.param, x, grad_output)
        else:
            store.add_linear(ctx.param, x, grad_output)
        return grad_x, None, None


def _per_example_linear_forward(module, store, name):
    def forward(x):
        store.check_input(name, x)
        return _PerExampleLinear.apply(x, module.weight, store)

    return forward


# layer type -> function(module, store, name) returning the replacement forward
PER_EXAMPLE_FORWARDS = {nn.Linear: _per_example_linear_forward}


class PerExampleGradStore:
    """Per-example gradients of one micro-batch, all parameters in one [n, P] buffer.

    Row i holds record i's gradient over every trainable parameter (parameter k in columns
    offset_k .. offset_k + numel_k), so the joint norm is one reduction over rows and the clipped
    sum one matrix-vector product. Each layer's batched matmul result is copied into its slice; a 2-D
    weight with more rows than columns (LoRA B) is stored transposed ([in, out] per record), the
    faster orientation to compute. The buffer lives from the micro-batch's first per-example
    gradient until `clear()` (after clipping). `grads` maps each parameter to its [n, *shape] view."""

    def __init__(self, layout, dtype=torch.float32):
        self.layout = layout  # param -> (offset, numel, transposed)
        self.dtype = dtype  # float32 (or float64 for float64 parameters), whatever the activations' dtype
        self.size = sum(numel for _, numel, _ in layout.values())
        self.buffer = None
        self.filled = set()
        self.records = None  # records in the current micro-batch (DPGradient's hook on the model)

    def check_input(self, name, x):
        """docs/DESIGN.md 2.12: the rules sum over every dimension but the first, which must therefore be
        the records. A layer on flattened [records x tokens, hidden] input (an MoE shared expert,
        router or expert) would be clipped per token, so it stops the run instead."""
        if self.records is None:
            raise RuntimeError(f"{name}: record count unknown (call the model given to DPGradient with input_ids)")
        if x.dim() < 3 or x.shape[0] != self.records:
            raise UserInputError(
                f"LoRA layer {name} gets input of shape {list(x.shape)} in a micro-batch of {self.records} records, "
                "not [records, tokens, features]: its gradients would be clipped per token, not per record (an MoE "
                "expert, router or shared expert runs on flattened tokens); leave it out of --lora_target_modules"
            )

    def view(self, flat, param, compute_layout=False):
        """param's slice of a [P] or [n, P] tensor, shaped like the parameter (or its compute layout)."""
        offset, numel, transposed = self.layout[param]
        part = flat[..., offset : offset + numel]
        shape = param.shape[::-1] if transposed else param.shape
        part = part.unflatten(-1, shape)
        return part if compute_layout or not transposed else part.transpose(-1, -2)

    def _slot(self, param, n):
        """The buffer slice to write param's per-example gradient into; None if already written."""
        if self.buffer is None:
            self.buffer = torch.empty(n, self.size, dtype=self.dtype, device=param.device)
        elif self.buffer.shape[0] != n:
            raise RuntimeError(f"per-example gradients of one micro-batch for {self.buffer.shape[0]} and {n} records")
        if param in self.filled:
            return None
        self.filled.add(param)
        return self.view(self.buffer, param, compute_layout=True)

    def add_linear(self, param, x, grad_output):
        slot = self._slot(param, x.shape[0])
        if slot is not None:
            # bmm(out=slot) would loop over the records (slot rows are strided): compute, then copy
            slot.copy_(linear_per_example_grad(x, grad_output, self.layout[param][2], self.dtype))
        else:  # the parameter is used twice in this micro-batch: sum its contributions
            self.view(self.buffer, param).add_(linear_per_example_grad(x, grad_output))

    @property
    def grads(self):
        return {p: self.view(self.buffer, p) for p in self.layout if p in self.filled}

    def clear(self):
        self.buffer = None
        self.filled = set()


def _layer_name(name):
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.default' -> 'model.layers.0.mlp.up_proj'."""
    name = re.sub(r"\.(lora_[A-Za-z_]+)(\.default)?$", "", name)
    return name.removeprefix("base_model.model.")


def trainable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules owning trainable parameters; each must have a per-example rule."""
    modules = []
    by_name = dict(model.named_modules())
    for name, module in by_name.items():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        has_trainable_bias = getattr(module, "bias", None) is not None and module.bias.requires_grad
        if type(module) not in PER_EXAMPLE_FORWARDS or has_trainable_bias:
            # e.g. LoRA on an embedding (its A and B live in ParameterDicts): name the adapted layer
            owner = by_name.get(re.sub(r"\.lora_[A-Za-z_]+$", "", name))
            kind = type(getattr(owner, "base_layer", module)).__name__ + (
                " with a trainable bias" if has_trainable_bias else ""
            )
            raise UserInputError(
                f"no per-example gradient rule for the trainable layer {_layer_name(name)} ({kind}): "
                "DP training adapts linear layers only; leave it out of --lora_target_modules"
            )
        modules.append((_layer_name(name), module))
    return modules


# ----------------------------------------------------------------------------------------------
# The DP gradient: clip, accumulate, sum over processes, noise, average
# ----------------------------------------------------------------------------------------------


class DPGradient:
    """Turns micro-batch backward passes into the DP (or non-private) gradient of one logical step.

    Usage per logical step: `logical_step(micro_batch_losses, step)`, or by hand: for each
    micro-batch, backward the *sum* of per-record losses (each record normalised by its own
    label-token count), then `accumulate_micro_batch(losses, counts)`; finally `finish_step(step)`
    writes (S + Z) / B into `param.grad` and returns the step's `StepStats`.

    With `loss_clip` L set, the step also releases a private training loss: each record's loss
    clipped to [0, L] (non-finite: L), summed over the same sample, plus one draw of
    N(0, (loss_noise_multiplier * L)^2), divided by B. The accountant composes the pair (docs/DESIGN.md
    2.10; accounting.effective_noise_multiplier). `accountant.step()` is called by `finish_step`
    itself, once per released gradient, so no training loop can forget a step.

    clip_norm None: non-private; plain autograd, no per-example work, no noise.
    """

    def __init__(
        self,
        model,
        clip_norm: float | None,
        noise_multiplier: float,
        expected_batch_size: int,
        randomness=None,
        *,
        loss_clip=None,
        loss_noise_multiplier=0.0,
        secure_noise=False,
        accountant=None,
    ):
        self.private = clip_norm is not None
        if self.private and not clip_norm > 0:
            raise ValueError(f"clip norm {clip_norm}: must be positive (None: non-private)")
        if not noise_multiplier >= 0 or (noise_multiplier > 0 and not self.private):
            raise ValueError(f"noise multiplier {noise_multiplier}: must be >= 0, and 0 without clipping")
        self.clip_norm = float(clip_norm) if self.private else None
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = expected_batch_size
        self.randomness = randomness
        self.loss_clip = loss_clip
        self.loss_noise_multiplier = float(loss_noise_multiplier or 0.0)
        self.secure_noise = secure_noise
        self.accountant = accountant
        self.params = [p for p in model.parameters() if p.requires_grad]
        layout, offset = {}, 0
        for p in self.params:
            # 2-D weights with more rows than columns (LoRA B) are kept transposed: see the store
            layout[p] = (offset, p.numel(), self.private and p.dim() == 2 and p.shape[0] > p.shape[1])
            offset += p.numel()
        dtypes = {accumulation_dtype(p.dtype) for p in self.params} or {torch.float32}
        self._dtype = functools.reduce(torch.promote_types, dtypes)
        self.store = PerExampleGradStore(layout, self._dtype)
        self._device = self.params[0].device if self.params else torch.device("cpu")
        self.summed = self._new_sum()  # the step's sum of clipped gradients, flat [P]
        self.stats = self._new_stats()
        self._saved_forwards = []
        self.last_norms = None
        if self.private:
            self._attach(model)

    @classmethod
    def from_plan(cls, model, plan, randomness) -> "DPGradient":
        """The DP gradient a run's PrivacyPlan describes (clipping, noise, released loss, accountant),
        or plain autograd when the plan is non-private."""
        if not plan.private:
            return cls(model, None, 0.0, plan.expected_batch_size)
        return cls(
            model,
            plan.settings.clip_norm,
            plan.noise_multiplier,
            plan.expected_batch_size,
            randomness,
            loss_clip=plan.loss_clip,
            loss_noise_multiplier=plan.loss_noise_multiplier,
            secure_noise=plan.settings.secure_noise,
            accountant=plan.accountant,
        )

    def _new_sum(self):
        return torch.zeros(self.store.size, dtype=self._dtype, device=self._device)

    def _new_stats(self):
        # [clipped loss sum (released with noise), exact loss sum, records, non-finite gradients]
        return torch.zeros(4, dtype=torch.float64, device=self._device)

    def _attach(self, model):
        named = trainable_modules(model)
        for name, module in named:
            module.forward = PER_EXAMPLE_FORWARDS[type(module)](module, self.store, name)
            self._saved_forwards.append(module)
        # every forward of the model tells the store how many records the micro-batch has; a
        # checkpointed layer recomputed in backward still sees its own micro-batch's count
        self._records_hook = model.register_forward_pre_hook(self._count_records, with_kwargs=True)
        try:
            self._check_record_layout(model, named)
        except Exception:
            self.detach()  # leave the model as it was
            raise

    def _count_records(self, module, args, kwargs):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        self.store.records = None if inputs is None else inputs.shape[0]

    @torch.no_grad()
    def _check_record_layout(self, model, named, records=3, tokens=5):
        """Before any private data is read: a forward on dummy records, twice, the last record
        changed the second time. Every adapted layer must see [records, ...] input (check_input)
        whose other rows do not change: its first dimension really is the record, not tokens
        (flattened MoE input) nor a [tokens, records, ...] layout that happens to match in size."""
        inputs = {name: [] for name, _ in named}
        hooks = [
            m.register_forward_pre_hook(lambda m, args, seen=inputs[name]: seen.append(args[0].clone()))
            for name, m in named
        ]
        modes = {m: m.training for m in model.modules()}
        model.eval()  # no dropout: the two passes differ only in the last record
        try:
            vocab = model.get_input_embeddings().num_embeddings
            ids = torch.arange(records * tokens, device=self._device).view(records, tokens) % vocab
            for changed in (ids, torch.cat([ids[:-1], (ids[-1:] + 7) % vocab])):
                model(input_ids=changed, attention_mask=torch.ones_like(changed))
        finally:
            for hook in hooks:
                hook.remove()
            for m, training in modes.items():
                m.training = training
            self.store.records = None
        for name, seen in inputs.items():
            calls = len(seen) // 2  # a layer may run several times per forward
            for first, second in zip(seen[:calls], seen[calls:]):
                if not torch.allclose(first[:-1], second[:-1], rtol=1e-3, atol=1e-3 * float(first.abs().max())):
                    raise UserInputError(
                        f"LoRA layer {name}: one record's input depends on another record, so "
                        "its per-example gradient would not be the record's own; leave it out of "
                        "--lora_target_modules"
                    )

    def detach(self) -> None:
        """Restore the layers' own forward (e.g. before saving or generating)."""
        for module in self._saved_forwards:
            del module.forward
        self._saved_forwards = []
        if getattr(self, "_records_hook", None) is not None:
            self._records_hook.remove()
            self._records_hook = None

    # -- per micro-batch ----------------------------------------------------------------------

    def accumulate_micro_batch(
        self, losses: torch.Tensor | None = None, counts: torch.Tensor | None = None, units: torch.Tensor | None = None
    ) -> None:
        """Clip this micro-batch's per-example gradients and add them to the step's sum.

        losses, counts: the records' losses and label-token counts (per_record_loss); records
        without label tokens are masked dummies and count for nothing. units: each record's unit
        slot in the micro-batch when privacy units hold several records (their rows, computed from
        losses weighted by 1/records of the unit, add up to the unit's mean gradient, which is
        clipped once); None: every record is its own unit."""
        if losses is not None:
            self._add_losses(losses.detach(), counts, units)
        if not self.private:
            for p in self.params:
                if p.grad is not None:
                    self.store.view(self.summed, p).add_(p.grad)
                    p.grad = None
            return
        store = self.store
        if store.buffer is None:
            return  # no per-example gradient at all (no backward through the adapters)
        if len(store.filled) != len(self.params):
            store.clear()
            raise RuntimeError("some trainable parameters got no per-example gradient in this micro-batch")
        per_example = store.buffer  # [n, P]: one record per row
        if units is not None:  # one row per unit
            units = units.to(per_example.device)
            per_example = per_example.new_zeros(int(units.max()) + 1, per_example.shape[1]).index_add_(
                0, units, per_example
            )
        norms = torch.linalg.vector_norm(per_example, dim=1)  # the joint norm over all parameters
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            # a non-finite row (e.g. fp16 overflow) would turn the whole sum into NaN and reveal
            # that its record was sampled: it contributes zero instead, which keeps sensitivity C
            per_example.masked_fill_(~finite.unsqueeze(1), 0.0)
            norms = norms.masked_fill(~finite, 0.0)
            self.stats[3] += (~finite).sum()
        scale = (self.clip_norm / (norms + 1e-6)).clamp_(max=1.0)
        self.summed.addmv_(per_example.t(), scale)  # sum_i scale_i g_i, one matrix-vector product
        self.last_norms = norms
        store.clear()  # per-example gradients are not kept past this point

    def _add_losses(self, losses, counts, units=None):
        losses = losses.to(self.stats.device, torch.float64)
        real = (counts > 0).to(self.stats.device) if counts is not None else torch.ones_like(losses, dtype=torch.bool)
        if self.loss_clip is not None:  # each unit's mean loss in [0, L]: sensitivity L
            bounded = torch.nan_to_num(losses, nan=self.loss_clip, posinf=self.loss_clip).clamp(0.0, self.loss_clip)
            weights = unit_weights(units)
            self.stats[0] += (bounded if weights is None else bounded * weights.to(bounded)).sum()
        self.stats[1] += torch.where(torch.isfinite(losses) & real, losses, 0.0).sum()
        self.stats[2] += real.sum()

    # -- per logical step ---------------------------------------------------------------------

    def logical_step(self, micro_batch_losses, step: int) -> "StepStats":
        """The whole step: for each micro-batch's (losses, counts[, units]) (its forward runs as the
        iterable yields it), backward of the sum of per-record losses and clipped accumulation; then
        finish_step. Training, benchmarks and checks share this one driver."""
        for losses, counts, *units in micro_batch_losses:
            units = units[0] if units else None
            weights = unit_weights(units)
            # the sum of per-record losses: each record's gradient is its own, unscaled by the others
            # (a unit's records weighted 1/n_u: their rows add up to the unit's mean gradient)
            (losses.sum() if weights is None else (losses * weights.to(losses)).sum()).backward()
            self.accumulate_micro_batch(losses, counts, units)
        return self.finish_step(step)

    def finish_step(self, step: int) -> "StepStats":
        """Sum over processes, add one noise draw, divide by B, write into param.grad; returns the
        step's StepStats (its `released_loss` is private; every other field is console-only)."""
        flat, self.summed = self.summed, self._new_sum()  # param.grad will be views of `flat`
        stats, self.stats = self.stats, self._new_stats()
        if self.private and rank() == 0:
            # one draw for the whole job: only process 0 adds noise, before the sum
            if self.noise_multiplier > 0:
                flat += self.noise(flat.shape, self.noise_multiplier * self.clip_norm, "noise", step, flat)
            if self.loss_clip is not None and self.loss_noise_multiplier > 0:
                stats[:1] += self.noise((1,), self.loss_noise_multiplier * self.loss_clip, "loss_noise", step, stats)
        if world_size() > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        flat /= self.expected_batch_size
        for p in self.params:
            p.grad = self.store.view(flat, p).to(p.dtype, memory_format=torch.contiguous_format)
        if self.accountant is not None:
            self.accountant.step()
        clipped_sum, exact_sum, records, nonfinite = stats.tolist()
        return StepStats(
            released_loss=clipped_sum / self.expected_batch_size if self.loss_clip is not None else None,
            exact_loss=exact_sum / max(records, 1),
            records=int(records),
            nonfinite=int(nonfinite),
        )

    def noise(self, shape, std, purpose, step, like):
        """One draw of N(0, std^2): from the OS's cryptographic generator with --secure_noise, else from
        the DP generator of (purpose, step). Process 0 alone calls it: one draw for the whole job."""
        if self.secure_noise:
            return secure_gaussian(shape, std, like.dtype, like.device)
        gen = self.randomness.generator(purpose, step, device=like.device.type)
        return torch.normal(0.0, std, shape, generator=gen, device=like.device, dtype=like.dtype)

    def noise_std(self) -> float:
        """Standard deviation of the noise in the averaged gradient: sigma * C / B."""
        return self.noise_multiplier * self.clip_norm / self.expected_batch_size


def unit_weights(units: torch.Tensor | None) -> torch.Tensor | None:
    """1 / (records of the row's unit) for each row; None when every record is its own unit."""
    if units is None:
        return None
    return 1.0 / torch.bincount(units).double()[units]


@dataclasses.dataclass
class StepStats:
    """One logical step's loss figures. Only `released_loss` (the private estimate, or None when no
    loss is released) may leave the console; the exact mean loss, the realised number of records
    and the count of non-finite per-example gradients are exact statistics of private data."""

    released_loss: float | None
    exact_loss: float
    records: int
    nonfinite: int


# ----------------------------------------------------------------------------------------------
# Per-record loss
# ----------------------------------------------------------------------------------------------


def per_record_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss of each record over its own label tokens: [n].

    Normalising by the record's own count (not the micro-batch's) keeps each record's gradient
    independent of the other records (docs/DESIGN.md 2.2). Records with no label token (masked dummy
    records) get exactly zero loss and zero gradient."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(1)
    return token_loss.sum(1) / counts.clamp(min=1), counts
