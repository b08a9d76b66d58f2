"""Loading the base model and tokenizer, shared by training and inference; and `build_model`, the base
with LoRA placed for training, the one call train_clm.py makes.

Three ways to hold the frozen base (docs/distributed.md; docs/DESIGN.md 2.9):
  * whole on every process (one process, or data parallel): `load_model`, as always;
  * FSDP: built on the meta device and sharded before anything is loaded, each process then reads
    only its own shards from the safetensors files (utils/model/sharded_loading.py): no process ever
    holds the whole base, not even while loading;
  * --load_in_4bit: quantised to NF4 while it loads (bitsandbytes), whole on every process.
In all three the LoRA parameters are float32, initialised from --seed alone (so identical on every
process), and never managed by FSDP.
"""

import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.cli import UserInputError
from utils.lora_utils import add_lora, lora_summary, parse_target_modules
from utils.model.fsdp_utils import fsdp_requested, return_freed_memory_at_once, shard_frozen_base
from utils.model.sharded_loading import cpu_stand_ins, empty_model, load_local_shards, local_folder

PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def access_token(args_token: str | None) -> str | None:
    """--access_token, else the HF_TOKEN environment variable (preferred: it stays off the command line)."""
    return args_token or os.environ.get("HF_TOKEN")


def check_model_path(name: str) -> None:
    """A name that can only be a local path (absolute, ./, ~, a file, nested folders) must be a folder."""
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        what = "a file, not a model folder" if os.path.exists(name) else "no such model folder"
        raise UserInputError(f"--model_name_or_path {name}: {what}")


def load_tokenizer(name: str, token: str | None = None, padding_side: str = "right"):
    check_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, token=token)
    except (OSError, ValueError) as err:
        raise UserInputError(f"--model_name_or_path {name}: cannot load a tokenizer ({_first_line(err)})") from None
    if tokenizer.eos_token_id is None:
        raise UserInputError(f"--model_name_or_path {name}: the tokenizer has no EOS token")
    # reuse an existing token for padding: adding one would resize the embeddings, and then the
    # adapter alone would no longer describe the fine-tuned model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name: str, mixed_precision: str = "no", token: str | None = None) -> torch.nn.Module:
    """Weights in the mixed-precision dtype (bf16/fp16) or float32; LoRA adapters stay float32."""
    check_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=PRECISION_DTYPES[mixed_precision], token=token)
    except (OSError, ValueError) as err:
        raise UserInputError(f"--model_name_or_path {name}: cannot load the model ({_first_line(err)})") from None
    model.config.use_cache = False
    return model


BNB_VERSION = "0.50.2"  # the version the 4-bit path was tested with (docs/distributed.md: 4-bit bases)


def bnb_4bit_config(compute_dtype=torch.bfloat16):
    """QLoRA's quantisation: NF4 weights with double quantisation, products in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def check_4bit_backend(device):
    """bitsandbytes installed and able to run an NF4 layer on `device`, else a one-line error:
    better now than after the data is tokenised and the whole base is quantised."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserInputError(f"--load_in_4bit needs bitsandbytes: pip install bitsandbytes=={BNB_VERSION}") from None
    try:
        layer = bnb.nn.Linear4bit(64, 8, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer = layer.to(device)
        layer(torch.ones(1, 64, device=device, dtype=torch.bfloat16))
    except Exception as err:  # the backends raise many types: all mean "cannot run here"
        raise UserInputError(
            f"--load_in_4bit: bitsandbytes {bnb.__version__} cannot run 4-bit layers on "
            f"{torch.device(device).type} ({_first_line(err)})"
        ) from None


def load_model_4bit(name, mixed_precision="no", token=None, device="cpu"):
    """The base quantised to NF4 on `device` while it loads (bitsandbytes); the layers it does not
    quantise (embeddings, norms, output layer) in the mixed-precision dtype or float32, as
    `load_model`. LoRA adapters added later stay float32."""
    check_model_path(name)
    check_4bit_backend(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=PRECISION_DTYPES[mixed_precision],
            token=token,
            quantization_config=bnb_4bit_config(),
            device_map={"": torch.device(device)},
        )
    except (OSError, ValueError, ImportError) as err:
        why = _first_line(err)
        raise UserInputError(f"--model_name_or_path {name}: cannot load the model in 4 bits ({why})") from None
    model.config.use_cache = False
    # bitsandbytes (0.50.2) repacks a layer's weight for a CPU inference kernel at its first forward
    # in eval mode (DPGradient's layout check, evaluation) and keeps it so: that kernel has no
    # backward, so later training steps silently lose every gradient path through the base layers
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def disable_base_dropout(model: torch.nn.Module) -> dict[str, float]:
    """Every dropout of the base model set to 0: the config's rates, nn.Dropout modules and the
    float rates attention layers keep for functional dropout (Llama's attention_dropout, OPT's
    dropout). Under DP dropout costs utility (Li et al. 2022) and makes a step impossible to check
    against a reference. Call before adding LoRA (its own dropout stays). Returns {config rate: old
    value} for the rates that were not 0."""
    was = {
        k: v
        for k, v in model.config.to_dict().items()
        if k.endswith(("dropout", "pdrop")) and isinstance(v, float) and v > 0
    }
    for key in was:
        setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        rates = [k for k, v in vars(module).items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)]
        for key in rates:
            setattr(module, key, 0.0)
    return was


def context_length(model: torch.nn.Module) -> int | None:
    """The model's context in tokens, as its config states it (None when it states none)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_block_size(block_size: int, model: torch.nn.Module) -> None:
    context = context_length(model)
    if block_size < 2:
        raise UserInputError(f"--block_size {block_size}: must be at least 2")
    if context is not None and block_size > context:
        raise UserInputError(f"--block_size {block_size}: beyond the model's context length {context}")


def uniform_guess_loss(model: torch.nn.Module) -> float:
    """ln(V): the per-token loss of a uniform guess over the model's output vocabulary."""
    return math.log(model.get_output_embeddings().weight.shape[0])


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def build_model(args, accelerator, token, say=print):
    """args: train_clm.py's (model_name_or_path, block_size, keep_base_dropout, gradient_ckpt,
    lora_*, seed, fsdp, load_in_4bit). Returns the PEFT model on this process's device."""
    fsdp = fsdp_requested(args.fsdp, accelerator)
    four_bit = getattr(args, "load_in_4bit", False)
    if four_bit and fsdp:
        raise UserInputError(
            "--load_in_4bit with FSDP: FSDP cannot shard bitsandbytes' 4-bit weights; use a data "
            "parallel config (accelerate_configs/accelerate_config_nofsdp.cfg), where every "
            "process holds the whole 4-bit base (docs/distributed.md: memory per GPU)"
        )
    entries = folder = None
    if four_bit:
        model = load_model_4bit(args.model_name_or_path, accelerator.mixed_precision, token, accelerator.device)
    elif fsdp:
        if accelerator.device.type == "cpu":  # before anything loads: gathered layers are freed at once
            return_freed_memory_at_once()
        with accelerator.local_main_process_first():  # a hub download happens once per machine
            folder = local_folder(args.model_name_or_path, token)
        model, entries = empty_model(folder, PRECISION_DTYPES[accelerator.mixed_precision])
    else:
        model = load_model(args.model_name_or_path, accelerator.mixed_precision, token)
    check_block_size(args.block_size, model)
    dropped = {} if args.keep_base_dropout else disable_base_dropout(model)
    if dropped:
        rates = ", ".join(f"{k} {v:g}" for k, v in dropped.items())
        say(f"base model dropout off ({rates}); --keep_base_dropout keeps it")
    if args.gradient_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with cpu_stand_ins(model):
        model = add_lora(
            model,
            args.lora_r,
            args.lora_alpha,
            args.lora_dropout,
            parse_target_modules(args.lora_target_modules),
            seed=args.seed,
            freeze_a=args.lora_freeze_a,
        )
    say(lora_summary(model))
    if fsdp:  # frozen base sharded, LoRA replicated (docs/DESIGN.md 2.9)
        shard_frozen_base(model, accelerator.device, accelerator)
        read = load_local_shards(model, entries, folder, accelerator.device)
        say(
            f"sharded loading: process 0 read {read['bytes_read'] / 2**20:,.1f} MiB of the "
            f"{read['checkpoint_bytes'] / 2**20:,.1f} MiB base (its shards only)"
        )
    elif not four_bit:  # bitsandbytes placed the 4-bit base while quantising it
        model.to(accelerator.device)
    return model
