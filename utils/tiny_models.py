"""Tiny random causal LMs with a tokenizer trained in a second on local text: for tests, the
privacy audit and CPU benchmarks (no model hub, no network); LoRA B drawn at random for them."""

import pydoc

import torch


def local_sentences(limit: int = 400) -> list[str]:
    """Real English text available offline: sentences of standard-library docstrings."""
    out, seen = [], set()
    for name in [
        "json",
        "argparse",
        "collections",
        "functools",
        "itertools",
        "os",
        "re",
        "string",
        "textwrap",
        "threading",
        "logging",
        "pathlib",
        "shutil",
        "subprocess",
        "random",
    ]:
        module = __import__(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            doc = pydoc.getdoc(obj) if callable(obj) or obj is module else ""
            for part in doc.replace("\n", " ").split(". "):
                part = " ".join(part.split())
                if 40 <= len(part) <= 200 and part not in seen:
                    seen.add(part)
                    out.append(part)
    return out[:limit]


def train_tokenizer(folder: str, add_bos: bool):
    """A 400-token byte-level BPE; `add_bos` makes it prepend <s> itself, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(local_sentences(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


# the tiny Llama of the tests: 2 layers, hidden 64, grouped-query attention
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def random_llama(
    dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, max_position_embeddings: int = 256, **shape
):
    """A randomly initialised Llama of the given shape (LlamaConfig fields: vocab_size, hidden_size,
    num_hidden_layers, ...; untied embeddings unless `shape` says so), built directly on `device`;
    its weights depend only on `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=max_position_embeddings, **{"tie_word_embeddings": False, **shape})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            return LlamaForCausalLM._from_config(config, dtype=dtype)


def build_tiny_model(folder: str, kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    """A random 2-layer model (hidden 64) saved with its tokenizer into `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(folder, add_bos=(kind == "llama"))
    if kind == "llama":
        model = random_llama(seed=seed, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, **TINY_SHAPE)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            shape = dict(n_embd=TINY_SHAPE["hidden_size"], n_layer=2, n_head=4, n_positions=256)
            no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, **shape, **no_dropout)
            model = GPT2LMHeadModel(config)
    model.to(dtype).save_pretrained(folder)
    return folder


def randomise_lora_b(model: torch.nn.Module, std: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """LoRA B starts at zero, which makes every A gradient zero and the adapter a no-op: tests,
    benchmarks and checks draw it at random, from a generator of its own."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
    return model
