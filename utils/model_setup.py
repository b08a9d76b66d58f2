"""The base model with LoRA, placed for training: the one call train_clm.py makes.

Three ways to hold the frozen base (docs/distributed.md; docs/DESIGN.md 2.9):
  * whole on every process (one process, or data parallel): `load_model`, as always;
  * FSDP: built on the meta device and sharded before anything is loaded, each process then reads
    only its own shards from the safetensors files (utils/sharded_loading.py): no process ever
    holds the whole base, not even while loading;
  * --load_in_4bit: quantised to NF4 while it loads (bitsandbytes), whole on every process.
In all three the LoRA parameters are float32, initialised from --seed alone (so identical on every
process), and never managed by FSDP.
"""

from utils.cli import UserInputError
from utils.fsdp_utils import fsdp_requested, return_freed_memory_at_once, shard_frozen_base
from utils.lora_utils import add_lora, lora_summary, parse_target_modules
from utils.model_utils import PRECISION_DTYPES, check_block_size, disable_base_dropout, load_model, load_model_4bit
from utils.sharded_loading import cpu_stand_ins, empty_model, load_local_shards, local_folder


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
