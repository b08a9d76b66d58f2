"""Memory per process of a DP LoRA run: what a run needs per GPU before it starts (docs/distributed.md:
memory per GPU). Checked against measured CPU peaks in docs/performance.md (scripts/sharded_memory.py).

    python -m utils.model.memory_model      # the table of docs/distributed.md: Llama 2 7B/13B/70B, 1/8/64 processes

Terms, in bytes, for one process:
  base         the frozen base it holds: all of it (one process, data parallel, 4-bit), or 1/N of
               it under FSDP; NF4 keeps 4 bits per linear weight plus its block scales, and the
               layers bitsandbytes does not quantise (embeddings, norms, output) in the compute dtype;
  gathered     FSDP's working set: whole copies of the groups in use at one time (two decoder layers,
               the root's norm, or the embedding / output layer, each its own group), the largest;
  lora         adapters, their gradient, AdamW's two moments and the DP step's sum: 20 bytes each;
  per_example  the per-example gradient buffer: records per micro-batch x LoRA parameters x 4;
  activations  what backward keeps, at the block size: every layer's (or with --gradient_ckpt one
               layer's plus each layer's input), LoRA inputs in float32;
  logits       the output layer's logits and their float32 loss and gradient;
  fixed        what does not depend on the model (interpreter, libraries, CUDA context): measured.
"""

import dataclasses

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + an 8-bit scale per 64 + a float32 per 256 scales
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def kv_dim(self):
        return self.hidden // self.heads * self.kv_heads

    def llama_config(self) -> dict:
        """This shape as LlamaConfig fields (to build a random model of it)."""
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
        )


LLAMA_2 = {
    "Llama 2 7B": Shape(32000, 4096, 11008, 32, 32, 32),
    "Llama 2 13B": Shape(32000, 5120, 13824, 40, 40, 40),
    "Llama 2 70B": Shape(32000, 8192, 28672, 80, 64, 8),
}


def shape_of(config):
    """The Shape of a transformers Llama-like config."""
    return Shape(
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        bool(getattr(config, "tie_word_embeddings", False)),
    )


def parameter_counts(s):
    h, kv = s.hidden, s.kv_dim
    layer_linear = 2 * h * h + 2 * h * kv + 3 * h * s.intermediate
    layer = layer_linear + 2 * h  # two RMSNorms
    embed = s.vocab * h
    head = 0 if s.tied else embed
    return {
        "layer_linear": layer_linear,
        "layer": layer,
        "embed": embed,
        "head": head,
        "total": s.layers * layer + embed + head + h,
    }


def lora_parameter_count(s, r=16):
    """LoRA on q, k, v and o (train_clm.py's default targets)."""
    h, kv = s.hidden, s.kv_dim
    return s.layers * r * ((h + h) + 2 * (h + kv) + (h + h))


def _base_bytes(s, counts, base_dtype, compute_bytes):
    if base_dtype == "nf4":
        linear = s.layers * counts["layer_linear"]
        return linear * NF4_BYTES + (counts["total"] - linear) * compute_bytes
    return counts["total"] * DTYPE_BYTES[base_dtype]


def _activation_bytes(s, tokens, compute_bytes, gradient_ckpt):
    """Saved for backward, per layer: the norms' float32 work (2 x 2h), q/k/v/o and MLP inputs and
    attention (about 8h + 4 x intermediate in the compute dtype), the float32 copies of the LoRA
    layers' inputs where the compute dtype is not float32 (2h: q/k/v share one, o its own)."""
    h, i = s.hidden, s.intermediate
    fp32_lora = 0 if compute_bytes == 4 else 2 * h * 4
    per_token_layer = 4 * h * 4 + (8 * h + 4 * i) * compute_bytes + fp32_lora
    if gradient_ckpt:  # each layer's input kept, one layer recomputed at a time
        return tokens * (s.layers * h * compute_bytes + per_token_layer)
    return tokens * s.layers * per_token_layer


def predict(
    shape,
    processes,
    *,
    fsdp=True,
    base_dtype="bfloat16",
    compute_bytes=2,
    micro_batch=4,
    block_size=512,
    lora_r=16,
    gradient_ckpt=True,
    fixed_bytes=0,
):
    """Bytes per process, by term (module docstring) and in total. base_dtype: float32, bfloat16 or
    nf4 (4-bit bases are never sharded: FSDP cannot shard bitsandbytes' weights)."""
    counts = parameter_counts(shape)
    sharded = fsdp and base_dtype != "nf4"
    base = _base_bytes(shape, counts, base_dtype, compute_bytes)
    weight_bytes = DTYPE_BYTES.get(base_dtype, compute_bytes)
    groups = [2 * counts["layer"], counts["embed"], counts["head"]]
    p_lora = lora_parameter_count(shape, lora_r)
    tokens = micro_batch * block_size
    out = {
        "base": base / processes if sharded else base,
        "gathered": max(groups) * weight_bytes if sharded else 0,
        "lora": 20 * p_lora,
        "per_example": micro_batch * p_lora * 4,
        "activations": _activation_bytes(shape, tokens, compute_bytes, gradient_ckpt),
        "logits": tokens * shape.vocab * (compute_bytes + 4 + 4),
        "fixed": fixed_bytes,
    }
    out["total"] = sum(out.values())
    return out


def readme_table(micro_batch=4, block_size=512, lora_r=16, processes=(1, 8, 64)):
    """The table of docs/distributed.md (memory per GPU): GiB per process, total (and the base's
    share), bf16 sharded with FSDP over more than one process, 4-bit whole on each; fixed costs (CUDA
    context, about 1 GiB) not included."""
    rows = [
        "| model | base | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in processes) + " |",
        "| --- | --- | " + " | ".join("---" for _ in processes) + " |",
    ]
    for name, shape in LLAMA_2.items():
        for label, dtype in (("bf16 (FSDP)", "bfloat16"), ("4-bit NF4", "nf4")):
            cells = []
            for n in processes:
                terms = predict(
                    shape,
                    n,
                    fsdp=n > 1,
                    base_dtype=dtype,
                    micro_batch=micro_batch,
                    block_size=block_size,
                    lora_r=lora_r,
                )
                cells.append(f"{terms['total'] / 2**30:.1f} ({terms['base'] / 2**30:.1f})")
            rows.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(readme_table())
