"""Exact per-example gradients of the trainable (LoRA) layers, one small rule per layer type,
registered in PER_EXAMPLE_FORWARDS (docs/DESIGN.md 2.2, 2.12).

Per-example gradients are captured by a hook on each trainable linear layer: the layer's forward
runs through an autograd function that saves its input, and whose backward computes the
per-example weight gradients (and the input gradient) instead of the summed weight gradient, so
autograd never computes the summed LoRA gradient that would be thrown away. Saving the input in the
autograd context (rather than in a module attribute) makes activation checkpointing safe: a
recomputed forward saves a fresh input for exactly one backward call.
"""

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.cli import UserInputError


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
