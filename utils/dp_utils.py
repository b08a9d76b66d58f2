"""DP-SGD primitives for LoRA: exact per-example gradients, clipping, accumulation, noise.

Privacy rules implemented here (DESIGN.md section 2):
  * per-example gradient g_i of record i's own loss, products accumulated in float32 (or wider);
  * clip jointly over all trainable parameters: g_i * min(1, C / ||g_i||);
  * S = sum of clipped g_i over micro-batches and processes, one all-reduce per logical step;
  * Z ~ N(0, sigma^2 C^2 I) drawn once per logical step (by process 0 only, before the sum);
  * the optimizer sees (S + Z) / B with B the expected logical batch size.

Per-example gradients are captured by a hook on each trainable linear layer: the layer's forward
runs through an autograd function that saves its input, and whose backward computes the
per-example weight gradients (and the input gradient) instead of the summed weight gradient, so
autograd never computes the summed LoRA gradient that would be thrown away. Saving the input in the
autograd context (rather than in a module attribute) makes activation checkpointing safe: a
recomputed forward saves a fresh input for exactly one backward call.

Speed (PERFORMANCE.md): every layer's per-example gradients land in one [n, P] buffer (one row per
record), so the joint norms are one reduction and the clipped sum one matrix-vector product,
whatever the number of layers; the buffer is dropped as soon as the micro-batch is clipped.
"""

import functools
import hashlib
import math
import secrets
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Per-example gradients, one small function per layer type (registered in PER_EXAMPLE_FORWARDS)
# ----------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype):
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
        dtype = _accumulation_dtype(torch.promote_types(inputs.dtype, grad_output.dtype))
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


def _per_example_linear_forward(module, store):
    def forward(x):
        return _PerExampleLinear.apply(x, module.weight, store)

    return forward


# layer type -> function(module, store) returning the replacement forward
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

    def view(self, flat, param, compute_layout=False):
        """param's slice of a [P] or [n, P] tensor, shaped like the parameter (or its compute layout)."""
        offset, numel, transposed = self.layout[param]
        part = flat[..., offset:offset + numel]
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

    def add(self, param, grad):
        """Generic entry for other layer types: grad is [n, *param.shape]."""
        slot = self._slot(param, grad.shape[0])
        if slot is not None:
            self.view(self.buffer, param).copy_(grad)
        else:
            self.view(self.buffer, param).add_(grad)

    @property
    def grads(self):
        return {p: self.view(self.buffer, p) for p in self.layout if p in self.filled}

    def clear(self):
        self.buffer = None
        self.filled = set()


def trainable_modules(model):
    """Modules owning trainable parameters; each must be a type with a per-example rule."""
    modules = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        has_trainable_bias = getattr(module, "bias", None) is not None and module.bias.requires_grad
        if type(module) not in PER_EXAMPLE_FORWARDS or has_trainable_bias:
            raise TypeError(f"no per-example gradient rule for trainable layer {name} ({type(module).__name__})")
        modules.append(module)
    return modules


# ----------------------------------------------------------------------------------------------
# DP randomness: OS-seeded, shared by all processes, a fresh generator per (purpose, step)
# ----------------------------------------------------------------------------------------------


class DPRandomness:
    """Generators for Poisson sampling and noise, derived from one secret seed.

    The seed comes from the operating system (never from --seed) and is broadcast from process 0
    so every process draws the same sample. Deriving a generator per (purpose, step) means the
    draws depend only on the seed and the step: not on the number of processes, and a resumed run
    (with --insecure_dp_seed) continues the same sequence without saving generator state."""

    def __init__(self, insecure_seed=None, device="cpu"):
        if insecure_seed is None:
            seed = secrets.randbits(63)
        else:
            warnings.warn(
                f"--insecure_dp_seed {insecure_seed}: sampling and noise are reproducible by anyone "
                "who knows this seed; use it for testing only, never for a release"
            )
            seed = int(insecure_seed)
        self.seed = _broadcast_int(seed)
        self.device = torch.device(device)

    def generator(self, purpose, step, device=None):
        digest = hashlib.sha256(f"{self.seed}:{purpose}:{step}".encode()).digest()
        gen = torch.Generator(device=device or "cpu")
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


def _broadcast_int(value):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


# ----------------------------------------------------------------------------------------------
# The DP gradient: clip, accumulate, sum over processes, noise, average
# ----------------------------------------------------------------------------------------------


class DPGradient:
    """Turns micro-batch backward passes into the DP (or non-private) gradient of one logical step.

    Usage per logical step: for each micro-batch, backward the *sum* of per-record losses (each
    record normalised by its own label-token count), then call `accumulate_micro_batch()`; finally
    `finish_step(step)` writes (S + Z) / B into `param.grad`.

    clip_norm < 0 and noise_multiplier < 0: non-private; plain autograd, no per-example work.
    """

    def __init__(self, model, clip_norm, noise_multiplier, expected_batch_size, randomness=None):
        self.private = clip_norm > 0
        if noise_multiplier > 0 and not self.private:
            raise ValueError("--noise_multiplier > 0 needs --clip_norm > 0 (noise is scaled by the clip norm)")
        if self.private and noise_multiplier < 0:
            raise ValueError("--clip_norm > 0 needs --noise_multiplier >= 0 (or a target epsilon)")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = max(float(noise_multiplier), 0.0)
        self.expected_batch_size = expected_batch_size
        self.randomness = randomness
        self.params = [p for p in model.parameters() if p.requires_grad]
        layout, offset = {}, 0
        for p in self.params:
            # 2-D weights with more rows than columns (LoRA B) are kept transposed: see the store
            layout[p] = (offset, p.numel(), self.private and p.dim() == 2 and p.shape[0] > p.shape[1])
            offset += p.numel()
        dtypes = {_accumulation_dtype(p.dtype) for p in self.params} or {torch.float32}
        self._dtype = functools.reduce(torch.promote_types, dtypes)
        self.store = PerExampleGradStore(layout, self._dtype)
        self._device = self.params[0].device if self.params else torch.device("cpu")
        self.summed = self._new_sum()  # the step's sum of clipped gradients, flat [P]
        self._saved_forwards = []
        self.last_norms = None
        if self.private:
            self._attach(model)

    def _new_sum(self):
        return torch.zeros(self.store.size, dtype=self._dtype, device=self._device)

    def _attach(self, model):
        for module in trainable_modules(model):
            module.forward = PER_EXAMPLE_FORWARDS[type(module)](module, self.store)
            self._saved_forwards.append(module)

    def detach(self):
        """Restore the layers' own forward (e.g. before saving or generating)."""
        for module in self._saved_forwards:
            del module.forward
        self._saved_forwards = []

    # -- per micro-batch ----------------------------------------------------------------------

    def accumulate_micro_batch(self):
        """Clip this micro-batch's per-example gradients and add them to the step's sum."""
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
        norms = torch.linalg.vector_norm(per_example, dim=1)  # the joint norm over all parameters
        scale = (self.clip_norm / (norms + 1e-6)).clamp_(max=1.0)
        self.summed.addmv_(per_example.t(), scale)  # sum_i scale_i g_i, one matrix-vector product
        self.last_norms = norms
        store.clear()  # per-example gradients are not kept past this point

    # -- per logical step ---------------------------------------------------------------------

    def finish_step(self, step):
        """Sum over processes, add one noise draw, divide by B, write into param.grad."""
        flat, self.summed = self.summed, self._new_sum()  # param.grad will be views of `flat`
        if self.private and self.noise_multiplier > 0 and _rank() == 0:
            # one draw for the whole job: only process 0 adds noise, before the sum
            gen = self.randomness.generator("noise", step, device=flat.device.type)
            std = self.noise_multiplier * self.clip_norm
            flat += torch.normal(0.0, std, flat.shape, generator=gen, device=flat.device, dtype=flat.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.expected_batch_size
        for p in self.params:
            p.grad = self.store.view(flat, p).to(p.dtype, memory_format=torch.contiguous_format)

    def noise_std(self):
        """Standard deviation of the noise in the averaged gradient: sigma * C / B."""
        return self.noise_multiplier * self.clip_norm / self.expected_batch_size


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ----------------------------------------------------------------------------------------------
# Per-record loss
# ----------------------------------------------------------------------------------------------


def per_record_loss(logits, labels):
    """Mean next-token loss of each record over its own label tokens: [n].

    Normalising by the record's own count (not the micro-batch's) keeps each record's gradient
    independent of the other records (DESIGN.md 2.2). Records with no label token (masked dummy
    records) get exactly zero loss and zero gradient."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=-100, reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(1)
    return token_loss.sum(1) / counts.clamp(min=1), counts


def clip_factor_bound_ok(norms, clip_norm):
    """True when every clipped norm min(1, C/||g||) * ||g|| is at most C (used in tests and debug)."""
    clipped = norms * (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    return bool((clipped <= clip_norm * (1 + 1e-6)).all()) and not math.isnan(float(norms.sum()))
