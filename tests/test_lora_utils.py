"""utils/lora_utils.py on its own: target parsing, seeded initialisation, saving and loading."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from utils.lora_utils import ADAPTER_BIN, add_lora, load_adapter, parse_target_modules, save_adapter
from utils.tiny_models import randomise_lora_b


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_target_strings_parse_into_names_regex_or_all_linear():
    assert parse_target_modules(None) is None
    assert parse_target_modules(" q_proj, v_proj ,") == ["q_proj", "v_proj"]
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules(r".*\.attn\.c_attn$") == r".*\.attn\.c_attn$"


def test_initialisation_depends_on_the_seed_only(tiny_llama):
    torch.manual_seed(123)
    first = lora_state(add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, 8, seed=5))
    torch.rand(1000)  # whatever consumed random numbers before must not matter
    again = lora_state(add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, 8, seed=5))
    other = lora_state(add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, 8, seed=6))
    assert first.keys() == again.keys() and len(first) > 0
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)
    assert all(float(v.abs().max()) == 0 for k, v in first.items() if "lora_B" in k)  # B starts at zero


def test_saved_adapter_round_trips_through_both_files(tiny_llama, tmp_path):
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, 8, seed=1)
    randomise_lora_b(model)
    save_adapter(model, str(tmp_path))
    saved, binary = load_file(tmp_path / "adapter_model.safetensors"), torch.load(tmp_path / ADAPTER_BIN)
    assert saved.keys() == binary.keys() and all(torch.equal(saved[k], binary[k]) for k in saved)
    trained = lora_state(model)
    for path in (str(tmp_path), os.path.join(tmp_path, ADAPTER_BIN)):
        loaded = lora_state(load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), path))
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_loading_needs_the_adapter_config(tiny_llama, tmp_path):
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, 8)
    save_adapter(model, str(tmp_path))
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / ADAPTER_BIN))
