"""Decoder-only families as tiny random models (issue 13): default LoRA targets found in the model
itself, the DP step equal to a brute-force reference, PEFT loading the saved adapter, and the
layers whose per-example gradients would not be per record refused with one clear line."""

import copy
import os

import pytest
import torch
import torch.nn as nn
from helpers import train_args, write_records
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from test_dp_utils import RECORDS, batch_of, brute_force_grads, loss_of
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import train_clm
from utils.cli import UserInputError, run_cli
from utils.dp_utils import DPGradient
from utils.lora_utils import (
    add_lora,
    default_target_modules,
    lora_summary,
    parse_target_modules,
    save_adapter,
)
from utils.model.model_utils import disable_base_dropout
from utils.tiny_models import randomise_lora_b

LLAMA_NAMES = ["k_proj", "o_proj", "q_proj", "v_proj"]
GPT2_REGEX = r"transformer\.h\.\d+\.attn\.(c_attn|c_proj)"  # attn.c_proj, not mlp.c_proj
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, experts_implementation="eager")  # grouped_mm: no float64
# family -> (config beyond the common tiny sizes, the default targets expected; the table of docs/models.md)
FAMILIES = {
    "llama": ({}, LLAMA_NAMES),
    "mistral": (dict(sliding_window=4), LLAMA_NAMES),  # a window shorter than the records
    "mixtral": (dict(MOE, num_local_experts=4, sliding_window=4), LLAMA_NAMES),
    "qwen2": ({}, LLAMA_NAMES),
    "qwen3": (dict(head_dim=8), LLAMA_NAMES),
    "qwen2_moe": (dict(MOE, num_experts=4, shared_expert_intermediate_size=32), LLAMA_NAMES),
    "qwen3_moe": (dict(MOE, num_experts=4, head_dim=8), LLAMA_NAMES),
    "gemma": (dict(head_dim=8), LLAMA_NAMES),  # tied input and output embeddings
    # eager attention only: a window shorter than a record's padding turns that record into NaN
    "gemma2": (dict(head_dim=8), LLAMA_NAMES),
    "gemma3_text": (dict(head_dim=8, sliding_window=4), LLAMA_NAMES),
    "starcoder2": (dict(sliding_window=4), LLAMA_NAMES),
    "olmo": ({}, LLAMA_NAMES),
    "olmo2": ({}, LLAMA_NAMES),
    "stablelm": ({}, LLAMA_NAMES),
    "granite": ({}, LLAMA_NAMES),
    "cohere": ({}, LLAMA_NAMES),
    "smollm3": ({}, LLAMA_NAMES),
    "phi": ({}, ["dense", "k_proj", "q_proj", "v_proj"]),
    "phi3": ({}, ["o_proj", "qkv_proj"]),  # fused qkv
    "gpt_neox": ({}, ["dense", "query_key_value"]),
    "falcon": ({}, ["dense", "query_key_value"]),
    "bloom": ({}, ["dense", "query_key_value"]),
    "gptj": (dict(rotary_dim=4), ["k_proj", "out_proj", "q_proj", "v_proj"]),
    "opt": (dict(ffn_dim=64, word_embed_proj_dim=32), ["k_proj", "out_proj", "q_proj", "v_proj"]),
    "gpt2": ({}, GPT2_REGEX),  # Conv1D projections
    "gpt_bigcode": ({}, GPT2_REGEX),
}
TOLERANCE = {"bloom": 1e-5, "gemma2": 1e-5}  # their attention softmax runs in float32 even in float64 models


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def tiny_config(family, vocab, **extra):
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    tokens = dict(max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    options = {**FAMILIES.get(family, ({}, None))[0], **extra}
    return AutoConfig.for_model(family, **sizes, num_attention_heads=4, num_key_value_heads=2, **tokens, **options)


def tiny_base(family, vocab, dtype=torch.float64, **extra):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config(family, vocab, **extra)).to(dtype)


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_defaults_dp_step_and_peft_loading(family, tokenizer, tiny_llama, tmp_path):
    base = tiny_base(family, len(tokenizer))
    assert default_target_modules(base) == FAMILIES[family][1]
    disable_base_dropout(base)
    pristine = copy.deepcopy(base)
    model = add_lora(base, r=4, alpha=8)
    modules = dict(model.named_modules())
    adapted = [n for n, m in modules.items() if isinstance(m, LoraLayer)]
    assert len(adapted) >= 4 and all(type(modules[n.rsplit(".", 1)[0]]).__name__.endswith("Attention") for n in adapted)
    randomise_lora_b(model)
    model.train()
    collate, indices = batch_of(tiny_llama, RECORDS), list(range(len(RECORDS)))

    # the DP step against one-record backward passes, clipped by the same formula (its +1e-6 included)
    reference = brute_force_grads(model, collate, indices)
    norms = torch.stack([flat(g) for g in zip(*reference)]).norm(dim=1)
    clip = float(norms.median())  # some records clipped, some not
    dp = DPGradient(model, clip, 0.0, len(indices))
    dp.logical_step([(loss_of(model, collate(indices)), None)], 0)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    for p, ref in zip(dp.params, reference):
        expected = (ref * scale.view(-1, *[1] * (ref.dim() - 1))).sum(0) / len(indices)
        tol = TOLERANCE.get(family, 1e-8)
        assert torch.allclose(p.grad.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    dp.detach()

    # PEFT loads the saved adapter onto a fresh copy of the base: identical logits
    model.eval()
    batch = collate(indices)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        save_adapter(model, str(tmp_path))
        again = PeftModel.from_pretrained(pristine, str(tmp_path))(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    assert torch.equal(logits, again)


def test_tied_lm_head_adapter_carries_only_what_was_trained(tokenizer, tiny_llama, tmp_path):
    """Gemma ties lm_head to the input embeddings: PEFT would save that frozen matrix as well."""
    base = tiny_base("gemma", len(tokenizer))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    pristine = copy.deepcopy(base)
    model = add_lora(base, r=4, alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    randomise_lora_b(model)
    collate = batch_of(tiny_llama, RECORDS)
    dp = DPGradient(model, 1.0, 0.0, 4)  # lm_head sees [records, tokens, hidden]: allowed
    dp.detach()
    save_adapter(model, str(tmp_path))
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)
    assert set(torch.load(os.path.join(tmp_path, "lora_weights.bin"), weights_only=True)) == set(saved)
    loaded = PeftModel.from_pretrained(pristine, str(tmp_path))
    batch = collate([0, 1])
    with torch.no_grad():
        ours, theirs = (m.eval()(input_ids=batch["input_ids"]).logits for m in (model, loaded))
    assert torch.equal(ours, theirs)
    assert torch.equal(loaded.get_input_embeddings().weight, pristine.get_input_embeddings().weight)


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("gate_proj,up_proj,down_proj", ["model.layers.0.mlp.shared_expert.gate_proj", "[15, 32]", "per token"]),
        ("shared_expert_gate", ["model.layers.0.mlp.shared_expert_gate", "per token"]),
        ("all-linear", ["mlp.shared_expert", "per token"]),
        ("gate", ["PEFT cannot adapt", "Qwen2MoeTopKRouter"]),  # the router: not a linear layer
        ("experts", ["PEFT cannot adapt", "Qwen2MoeExperts"]),
    ],
)
def test_moe_layers_on_flattened_tokens_are_refused(targets, expected, tokenizer):
    """The shared expert, its gate and the router run on [records x tokens, hidden]: per-example
    gradients there would be per token. Refused before any private data is read."""
    base = tiny_base("qwen2_moe", len(tokenizer), torch.float32)
    with pytest.raises(UserInputError) as err:
        model = add_lora(base, r=4, alpha=8, target_modules=parse_target_modules(targets))
        DPGradient(model, 1.0, 0.0, 4)
    message = str(err.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message
    if "per token" in message:  # the refused DPGradient left the layers' own forwards in place
        assert not any("forward" in vars(m) for m in model.modules())


def test_guard_at_run_time_and_records_mixed_before_a_layer(tokenizer):
    model = add_lora(tiny_base("llama", len(tokenizer), torch.float32), r=4, alpha=8)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    dp = DPGradient(model, 1.0, 0.0, 2)
    model(input_ids=torch.arange(8).view(2, 4))  # a micro-batch of 2 records
    with pytest.raises(UserInputError, match=r"shape \[8, 32\] in a micro-batch of 2 records"):
        q_proj.lora_A["default"](torch.zeros(8, 32))  # flattened tokens reaching a layer during training
    dp.detach()
    # a layer whose input mixes the records ([records, ...] shape, but not each record's own)
    q_proj.register_forward_pre_hook(lambda m, args: (args[0] + args[0].mean(0, keepdim=True),))
    with pytest.raises(UserInputError, match=r"self_attn\.q_proj: one record's input depends on another record"):
        DPGradient(model, 1.0, 0.0, 2)


def test_embeddings_as_targets_are_refused_under_dp(tokenizer):
    model = add_lora(
        tiny_base("llama", len(tokenizer), torch.float32), r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]
    )
    with pytest.raises(UserInputError, match=r"model\.embed_tokens \(Embedding\).*linear layers only"):
        DPGradient(model, 1.0, 0.0, 4)


def test_all_linear_adapts_every_linear_but_the_output_layer(tokenizer, tiny_llama):
    assert parse_target_modules("all-linear") == "all-linear"
    model = add_lora(tiny_base("llama", len(tokenizer)), r=4, alpha=8, target_modules="all-linear")
    assert lora_summary(model).startswith("LoRA on 14 layers (self_attn.q_proj x2, self_attn.k_proj x2")
    assert "mlp.down_proj x2" in lora_summary(model) and "lm_head" not in lora_summary(model)
    randomise_lora_b(model)
    dp = DPGradient(model, 1.0, 0.0, 2)
    collate = batch_of(tiny_llama, RECORDS)
    loss_of(model, collate([0, 1])).sum().backward()
    ours = [dp.store.grads[p].double().clone() for p in dp.params]
    dp.detach()
    for g, ref in zip(ours, brute_force_grads(model, collate, [0, 1])):
        assert torch.allclose(g, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_bigcode", "bloom", "phi"])
def test_base_dropout_is_switched_off(family, tokenizer):
    rates = {k: 0.1 for k in tiny_config(family, len(tokenizer)).to_dict() if k.endswith(("dropout", "pdrop"))}
    model = tiny_base(family, len(tokenizer), torch.float32, **rates).train()
    ids = torch.arange(2 * 8).view(2, 8)
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert disable_base_dropout(model)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


# ---- through the command line: one line, exit status 2 ----


def _train_cli(capsys, tmp_path, text_records, model_path, *extra):
    data = write_records(tmp_path / "train.json", text_records[:20])
    sizes = dict(block_size=32, per_device_train_batch_size=2, max_train_steps=1)
    dp = dict(clip_norm=1, noise_multiplier=1, delta=1e-3)
    argv = [*train_args(model_path, data, tmp_path / "out", **sizes, **dp), *extra]
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train_clm.main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2, lines
    assert lines[-1].startswith("error: ") and sum("error" in line.lower() for line in lines) == 1, lines
    assert "Traceback" not in "".join(lines)
    assert not os.path.exists(tmp_path / "out" / "adapter_model.safetensors")
    return lines[-1]


def test_target_typo_names_near_matches(capsys, tmp_path, text_records, tiny_llama):
    line = _train_cli(capsys, tmp_path, text_records, tiny_llama, "--lora_target_modules", "q_prj,v_proj")
    assert "'q_prj' matches no layer" in line and "closest: q_proj" in line, line


def test_moe_shared_expert_stops_the_run(capsys, tmp_path, text_records, tokenizer):
    folder = str(tmp_path / "qwen2_moe")
    tiny_base("qwen2_moe", len(tokenizer), torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    line = _train_cli(capsys, tmp_path, text_records, folder, "--lora_target_modules", "gate_proj,up_proj,down_proj")
    assert "shared_expert.gate_proj" in line and "per token, not per record" in line, line
