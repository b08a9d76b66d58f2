"""Fixtures: tiny random Llama and GPT-2 models with a tokenizer trained here on local text."""

import json
import os
import pydoc
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def local_sentences(limit=400):
    """Real English text available offline: docstrings of standard-library modules."""
    sentences = []
    for name in ["json", "argparse", "collections", "functools", "itertools", "os", "re", "string",
                 "textwrap", "threading", "logging", "pathlib", "shutil", "subprocess", "random"]:
        module = __import__(name)
        for obj in [module] + [getattr(module, a) for a in dir(module) if not a.startswith("_")]:
            doc = pydoc.getdoc(obj) if callable(obj) or obj is module else ""
            for part in doc.replace("\n", " ").split(". "):
                part = " ".join(part.split())
                if 40 <= len(part) <= 200 and part not in sentences:
                    sentences.append(part)
    return sentences[:limit]


def train_tokenizer(folder, add_bos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(local_sentences(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder, kind="llama", dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = train_tokenizer(folder, add_bos=(kind == "llama"))
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=0, eos_token_id=1)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_gpt2")), "gpt2")


def write_records(path, records, jsonl=False):
    """records: list of (instruction, answer)."""
    with open(path, "w") as f:
        if jsonl:
            for instruction, answer in records:
                f.write(json.dumps({"instruction": instruction, "answer": answer}) + "\n")
        else:
            json.dump({"instruction": [r[0] for r in records], "answer": [r[1] for r in records]}, f)
    return str(path)


@pytest.fixture(scope="session")
def text_records():
    sentences = local_sentences()
    return [("Explain:" if i % 3 == 0 else "", s) for i, s in enumerate(sentences)]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process run of a script builds its own Accelerator."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
