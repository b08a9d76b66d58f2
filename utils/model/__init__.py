"""The base model: loading it (whole, 4-bit, or sharded under FSDP), LoRA placed for training, and
its memory per process."""
