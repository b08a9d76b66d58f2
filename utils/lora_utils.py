"""LoRA adapters through PEFT: which layers to wrap, seeded initialisation, saving and loading."""

import difflib
import json
import os
import re
from collections import Counter

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, load_peft_weights
from transformers.pytorch_utils import Conv1D

from utils.cli import UserInputError

ADAPTER_BIN = "lora_weights.bin"

# the attention of a decoder layer, where its class name does not end in "Attention"
ATTENTION_CHILDREN = {"self_attn", "attn", "attention", "self_attention"}


def _is_linear(module):
    return isinstance(module, (nn.Linear, Conv1D))  # the GPT-2 family's projections are Conv1D


def _leaf(name):
    return name.rsplit(".", 1)[-1]


def attention_linears(model: nn.Module) -> list[str]:
    """Full names of the linear children of the model's attention modules, fused qkv projections
    (qkv_proj, query_key_value, c_attn, Wqkv) included: asked of the model itself, so a new family
    needs no table (the original recipe adapts attention only)."""
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") or _leaf(name) in ATTENTION_CHILDREN:
            names.update(f"{name}.{child}" for child, sub in module.named_children() if _is_linear(sub))
    return sorted(names)


def default_target_modules(model: nn.Module) -> list[str] | str:
    """The attention linears as PEFT targets: their short names (q_proj, ...) when no other layer
    shares them, else a regex over their paths (GPT-2: attn.c_proj, but not mlp.c_proj)."""
    names = attention_linears(model)
    if not names:
        raise UserInputError(
            f"no attention layers found in this {model.config.model_type} model: name the layers "
            f"to adapt with --lora_target_modules (its linear layers: {', '.join(_linear_leaves(model))})"
        )
    leaves = sorted({_leaf(n) for n in names})
    modules = [n for n, _ in model.named_modules()]
    if {n for n in modules if _leaf(n) in leaves} == set(names):
        return leaves
    parents = {}
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        parents.setdefault(r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in parent.split(".")), set()).add(
            leaf
        )
    regex = "|".join(rf"{parent}\.({'|'.join(sorted(leaves))})" for parent, leaves in sorted(parents.items()))
    return regex if {n for n in modules if re.fullmatch(regex, n)} == set(names) else names


def _linear_leaves(model):
    return sorted({_leaf(n) for n, m in model.named_modules() if _is_linear(m)})


def check_targets(model: nn.Module, targets: list[str] | str) -> None:
    """Every name given must match a layer: PEFT itself only complains when none does."""
    if targets == "all-linear":
        return
    modules = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, n) for n in modules)
        except re.error as err:
            raise UserInputError(f"--lora_target_modules {targets}: not a valid regex ({err})") from None
        if not found:
            raise UserInputError(
                f"--lora_target_modules {targets}: the regex matches no layer of this model "
                f"(layer names look like {modules[-1]})"
            )
        return
    leaves = sorted({_leaf(n) for n in modules if not _leaf(n).isdigit()})
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in modules):
            close = difflib.get_close_matches(target, leaves, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"its linear layers: {', '.join(_linear_leaves(model))}"
            raise UserInputError(f"--lora_target_modules: '{target}' matches no layer of this model ({hint})")


def parse_target_modules(value: str | None) -> list[str] | str | None:
    """'q_proj,v_proj' -> list; PEFT's 'all-linear' and a single value with regex characters stay strings."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) == 1 and (parts[0] == "all-linear" or any(c in parts[0] for c in "*.()|$^[\\")):
        return parts[0]
    return parts


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    seed: int = 0,
    freeze_a: bool = False,
) -> PeftModel:
    """Wrap the model with LoRA adapters; the initialisation depends only on `seed`.

    target_modules: names, one regex or 'all-linear'; by default the attention linears. The
    generator state is saved and restored around the initialisation so that the adapter does not
    depend on whatever consumed random numbers before (data loading, process count).
    freeze_a: train B only; A keeps its seeded random start (FFA-LoRA, Sun et al., ICLR 2024), which
    leaves the DP noise fewer parameters (out x r of (in + out) x r) at the same rank."""
    targets = target_modules or default_target_modules(model)
    check_targets(model, targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            config = LoraConfig(
                r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
            )
            peft_model = get_peft_model(model, config)
        except (ValueError, TypeError, NotImplementedError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserInputError(f"--lora_target_modules {targets}: PEFT cannot adapt these layers ({first})") from None
    if freeze_a:
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return peft_model


def lora_summary(model: nn.Module) -> str:
    """'LoRA on 8 layers (self_attn.q_proj x2, ...): 4,096 trainable parameters'."""
    layers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    kinds = Counter(".".join(p for p in n.split(".")[-2:] if not p.isdigit()) for n in layers)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    listed = ", ".join(f"{kind} x{count}" for kind, count in kinds.items())
    return f"LoRA on {len(layers)} layers ({listed}): {params:,} trainable parameters"


def save_adapter(model: PeftModel, output_dir: str) -> None:
    """PEFT adapter files (adapter_config.json + adapter_model.safetensors) and lora_weights.bin.

    Only what was trained: with lm_head (or embed_tokens) as a target PEFT would also save that
    layer's whole frozen vocabulary x hidden matrix (tied to the input embeddings on e.g. Gemma);
    the base model supplies it when the adapter is loaded."""
    model.save_pretrained(output_dir, safe_serialization=True, save_embedding_layers=False)
    state = {
        k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }
    torch.save(state, os.path.join(output_dir, ADAPTER_BIN))


def _shape_mismatch(path, err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = next((line for line in lines if "mismatch" in line), lines[0] if lines else type(err).__name__)
    return f"{path}: adapter does not match the base model ({first})"


def load_adapter(base_model: nn.Module, path: str, is_trainable: bool = False) -> PeftModel:
    """Base model + adapter from a PEFT folder or a lora_weights.bin (with its adapter_config.json
    beside it). Rank, alpha and targets come from the adapter, never from defaults; every tensor
    must match the base model."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    config_file = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(config_file):
        raise ValueError(f"{path}: no adapter_config.json beside the adapter weights")
    if os.path.isdir(path):
        try:
            model = PeftModel.from_pretrained(base_model, folder, is_trainable=is_trainable)
        except RuntimeError as err:  # shape mismatches: a multi-line message, one line per tensor
            raise ValueError(_shape_mismatch(path, err)) from None
        # from_pretrained only warns about missing keys and ignores unexpected ones
        loaded = set(get_peft_model_state_dict(model, save_embedding_layers=False))
        # PEFT elsewhere saves a targeted lm_head's frozen matrix too: not adapter weights
        saved = {k for k in load_peft_weights(folder) if not k.endswith(".base_layer.weight")}
        if loaded != saved:
            raise ValueError(
                f"{path}: adapter does not match the base model "
                f"(missing {sorted(loaded - saved)[:3]}, unexpected {sorted(saved - loaded)[:3]})"
            )
        return model
    with open(config_file) as f:
        config = LoraConfig(**{k: v for k, v in json.load(f).items() if k in LoraConfig.__dataclass_fields__})
    model = get_peft_model(base_model, config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as err:
        raise ValueError(_shape_mismatch(path, err)) from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{path}: adapter does not match the base model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if not is_trainable:
        model.eval()
    return model
