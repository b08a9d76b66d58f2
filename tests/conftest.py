"""Fixtures: tiny random Llama and GPT-2 models with a tokenizer trained here on local text."""

import json
import os

import pytest

from utils.tiny_models import build_tiny_model, local_sentences  # noqa: F401 (local_sentences: for the tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
