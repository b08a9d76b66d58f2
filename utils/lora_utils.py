"""LoRA adapters through PEFT: which layers to wrap, seeded initialisation, saving and loading."""

import json
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict, load_peft_weights

ADAPTER_BIN = "lora_weights.bin"

# Attention linears per architecture (the original recipe adapts attention only). GPT-2's
# attention projections are Conv1D; the regex keeps its MLP c_proj out.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj"]
ATTENTION_TARGETS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": r".*\.attn\.(c_attn|c_proj)$",
}


def default_target_modules(model_type):
    if model_type not in ATTENTION_TARGETS:
        raise ValueError(
            f"no default LoRA target layers for model type '{model_type}': "
            "name them with --lora_target_modules (e.g. --lora_target_modules q_proj,v_proj)"
        )
    return ATTENTION_TARGETS[model_type]


def parse_target_modules(value):
    """'q_proj,v_proj' -> list; a single value containing regex characters stays a regex."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if len(parts) == 1 and any(c in parts[0] for c in "*.()|$^["):
        return parts[0]
    return parts


def add_lora(model, r, alpha, dropout=0.0, target_modules=None, seed=0):
    """Wrap the model with LoRA adapters; the initialisation depends only on `seed`.

    The generator state is saved and restored around the initialisation so that the adapter does
    not depend on whatever consumed random numbers before (data loading, process count)."""
    targets = target_modules or default_target_modules(model.config.model_type)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:
            raise ValueError(f"LoRA targets {targets!r} do not match this model ({err}); "
                             "choose them with --lora_target_modules") from None
    return peft_model


def lora_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(model, output_dir):
    """PEFT adapter files (adapter_config.json + adapter_model.safetensors) and lora_weights.bin."""
    model.save_pretrained(output_dir, safe_serialization=True)
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    torch.save(state, os.path.join(output_dir, ADAPTER_BIN))


def _shape_mismatch(path, err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = next((line for line in lines if "mismatch" in line), lines[0] if lines else type(err).__name__)
    return f"{path}: adapter does not match the base model ({first})"


def load_adapter(base_model, path, is_trainable=False):
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
        loaded, saved = set(get_peft_model_state_dict(model)), set(load_peft_weights(folder))
        if loaded != saved:
            raise ValueError(f"{path}: adapter does not match the base model "
                             f"(missing {sorted(loaded - saved)[:3]}, unexpected {sorted(saved - loaded)[:3]})")
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
        raise ValueError(f"{path}: adapter does not match the base model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not is_trainable:
        model.eval()
    return model
