"""utils/model/memory_model.py: parameter counts as the real models have them, the terms behave as the
sharding says, and the memory table of docs/distributed.md is the function's output (measured
check: docs/performance.md, sharded loading and the memory model)."""

import os

import pytest
from helpers import ROOT


def test_parameter_counts_are_the_published_ones():
    from utils.model.memory_model import LLAMA_2, parameter_counts

    assert parameter_counts(LLAMA_2["Llama 2 7B"])["total"] == 6_738_415_616
    assert parameter_counts(LLAMA_2["Llama 2 13B"])["total"] == 13_015_864_320
    assert parameter_counts(LLAMA_2["Llama 2 70B"])["total"] == 68_976_648_192


@pytest.mark.parametrize("tied", [False, True])
def test_counts_match_a_built_model_and_peft(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from utils.lora_utils import add_lora
    from utils.model.memory_model import lora_parameter_count, parameter_counts, shape_of

    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    config = LlamaConfig(**sizes, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    shape = shape_of(config)
    assert parameter_counts(shape)["total"] == sum(p.numel() for p in model.parameters())
    lora = add_lora(model, 4, 4)
    assert lora_parameter_count(shape, 4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_terms_follow_the_sharding():
    from utils.model.memory_model import LLAMA_2, predict

    shape = LLAMA_2["Llama 2 70B"]
    one, eight = predict(shape, 1), predict(shape, 8)
    assert eight["base"] * 8 == pytest.approx(one["base"])
    assert 128e9 < one["base"] < 140e9  # 69B parameters in bf16
    assert eight["lora"] == one["lora"] and eight["per_example"] == one["per_example"]
    assert eight["total"] < 80 * 2**30  # a 70B bf16 run fits 8 GPUs of 80 GB
    nf4 = predict(shape, 8, base_dtype="nf4")
    assert nf4["base"] == predict(shape, 1, base_dtype="nf4")["base"] and nf4["gathered"] == 0
    assert 34e9 < nf4["base"] < 40e9  # 4.1 bits per linear weight, bf16 embeddings and output
    # per-example buffer: records x LoRA parameters x 4 bytes
    assert predict(shape, 1, micro_batch=8)["per_example"] == 2 * one["per_example"]
    no_ckpt = predict(shape, 1, gradient_ckpt=False)
    assert no_ckpt["activations"] > 10 * one["activations"]


def test_docs_table_is_the_function_output():
    from utils.model.memory_model import readme_table

    with open(os.path.join(ROOT, "docs", "distributed.md")) as f:
        page = f.read()
    section = page[page.index("## Memory per GPU") :]
    assert readme_table() in section, "docs/distributed.md memory table out of date: python -m utils.model.memory_model"


def test_shape_of_a_transformers_config():
    from transformers import LlamaConfig

    from utils.model.memory_model import Shape, shape_of

    sizes = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80)
    config = LlamaConfig(**sizes, num_attention_heads=64, num_key_value_heads=8)
    assert shape_of(config) == Shape(32000, 8192, 28672, 80, 64, 8)
