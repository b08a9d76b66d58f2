"""Inference scripts: adapter loading, exact counts on one and two processes, batching, resuming."""

import collections
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import datasets
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from helpers import ROOT, cli_flags, free_port, process_env, run_ok, train_args, write_records
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import inference_generation_dataset
import inference_generation_instruction
import train_clm
from utils.cli import UserInputError
from utils.data_utils import encode_prompt, load_records_file
from utils.generation_utils import load_generation_model
from utils.lora_utils import add_lora, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
COUNTS = {"Describe a list.": 3, "What is a tuple?": 2}
ENV = {**process_env(CUDA_VISIBLE_DEVICES=""), "ACCELERATE_USE_CPU": "1"}


def reset_accelerate():
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_instructions(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def instruction_args(model, instructions, out, *extra, **options):
    """inference_generation_instruction.py's arguments: `options` as in cli_flags, then `extra`."""
    flags = cli_flags(model_name_or_path=model, instruction_file=instructions, output_dir=str(out), **options)
    return [*flags, *extra]


def instruct(model, out, instruction_file, *extra):
    """One in-process run of the instruction script; returns its records."""
    reset_accelerate()
    args = instruction_args(model, instruction_file, out, *extra, max_new_tokens=8)
    path = inference_generation_instruction.main(args)
    reset_accelerate()
    return read_jsonl(path)


@pytest.fixture(scope="module")
def trained(tiny_llama, text_records, tmp_path_factory):
    """A DP adapter trained by train_clm.py with a non-default rank and alpha."""
    root = tmp_path_factory.mktemp("inference")
    data = write_records(root / "train.json", text_records[:64])
    out = root / "adapter"
    reset_accelerate()
    sizes = dict(block_size=64, per_device_train_batch_size=8, max_train_steps=3, learning_rate=0.05)
    dp = dict(clip_norm="1.0", noise_multiplier=0.5, delta=1e-3)
    train_clm.main(train_args(tiny_llama, data, out, **sizes, **dp, lora_r=4, lora_alpha=8, seed=5))
    reset_accelerate()
    return str(out)


@pytest.fixture(scope="module")
def instruction_file(tmp_path_factory):
    return write_instructions(
        tmp_path_factory.mktemp("instructions") / "instructions.txt",
        ["Describe a list. #### 3", "", "What is a tuple? #### 2"],
    )


def adapter_path(trained, kind):
    return trained if kind == "folder" else os.path.join(trained, "lora_weights.bin")


def test_trained_adapter_loads_in_peft_with_every_tensor_matched(trained, tiny_llama):
    saved = load_file(os.path.join(trained, "adapter_model.safetensors"))
    legacy = torch.load(os.path.join(trained, "lora_weights.bin"), weights_only=True)
    assert saved.keys() == legacy.keys() and all(torch.equal(saved[k], legacy[k]) for k in saved)
    assert any(k.endswith("lora_B.weight") and saved[k].abs().sum() > 0 for k in saved), "training left B at zero"
    with open(os.path.join(trained, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"]) == (4, 8)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), trained).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    loaded = get_peft_model_state_dict(peft_model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    ids = torch.tensor([encode_prompt_ids(tiny_llama)])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits
    assert not torch.allclose(expected, base, atol=1e-4), "the adapter changes nothing"
    result = peft_model.load_adapter(trained, adapter_name="again")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k and ".again." in k]
    for kind in ("folder", "bin"):
        reset_accelerate()
        argv = instruction_args(tiny_llama, "unused", "unused", lora_weights_path=adapter_path(trained, kind))
        args = inference_generation_instruction.parse_args(argv)
        model, _ = load_generation_model(args, Accelerator(cpu=True))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def encode_prompt_ids(model_dir):
    from utils.model.model_utils import load_tokenizer

    return encode_prompt(load_tokenizer(model_dir), "What is a tuple? A tuple is an immutable sequence")


@pytest.mark.parametrize("kind", ["folder", "bin"])
def test_instruction_counts_one_process(trained, tiny_llama, instruction_file, tmp_path, kind):
    records = instruct(
        tiny_llama, tmp_path, instruction_file, "--lora_weights_path", adapter_path(trained, kind), "--batch_size", "2"
    )
    assert [r["instruction"] for r in records] == ["Describe a list."] * 3 + ["What is a tuple?"] * 2
    assert all(isinstance(r["answer"], str) and set(r) == {"instruction", "answer"} for r in records)
    assert json.loads((tmp_path / "generation_info.json").read_text())["num_processes"] == 1
    assert sorted(os.listdir(tmp_path)) == ["generation_info.json", "generation_run.json", "generations.jsonl"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["folder", "bin"])
def test_instruction_counts_two_processes(trained, tiny_llama, instruction_file, tmp_path, kind):
    out = tmp_path / "two"
    launch = cli_flags(multi_gpu=True, num_processes=2, num_machines=1, mixed_precision="no", dynamo_backend="no")
    launch += cli_flags(main_process_port=free_port())
    generation = dict(lora_weights_path=adapter_path(trained, kind), max_new_tokens=8, batch_size=2)
    args = instruction_args(tiny_llama, instruction_file, out, **generation)
    run_ok(["accelerate", "launch", *launch, "inference_generation_instruction.py", *args], ENV)
    assert json.loads((out / "generation_info.json").read_text())["num_processes"] == 2
    records = read_jsonl(out / "generations.jsonl")
    assert collections.Counter(r["instruction"] for r in records) == COUNTS and len(records) == 5
    assert not [f for f in os.listdir(out) if ".part-" in f]
    # batches are seeded by their first prompt's index: the process count does not change the samples
    adapter = adapter_path(trained, kind)
    one = instruct(tiny_llama, tmp_path / "one", instruction_file, "--lora_weights_path", adapter, "--batch_size", "2")
    assert records == one


def test_batched_equals_unbatched_under_greedy_decoding(trained, tiny_llama, tmp_path):
    lines = [
        "Hi #### 1",
        "Describe a list of numbers and what a Python list can hold. #### 2",
        "What is a tuple? #### 1",
        "#### 1",
        "Explain: the os module provides a portable way of using operating system functions. #### 2",
    ]
    instructions = write_instructions(tmp_path / "mixed.txt", lines)
    common = ["--lora_weights_path", trained, "--max_length", "40"]  # budgets differ with the prompt length
    single = instruct(tiny_llama, tmp_path / "b1", instructions, *common, "--greedy", "--batch_size", "1")
    batched = instruct(tiny_llama, tmp_path / "b8", instructions, *common, "--greedy", "--batch_size", "8")
    zero_temp = instruct(tiny_llama, tmp_path / "t0", instructions, *common, "--temperature", "0", "--batch_size", "4")
    assert len(single) == 7 and single == batched == zero_temp
    assert any(r["answer"] for r in single)


def test_killed_generation_resumes_without_duplicates_or_losses(trained, tiny_llama, tmp_path):
    instructions = write_instructions(
        tmp_path / "many.txt", ["Tell me about lists. #### 60", "What is a tuple? #### 60"]
    )
    args = cli_flags(model_name_or_path=tiny_llama, lora_weights_path=trained, instruction_file=instructions)
    args += cli_flags(max_new_tokens=16, batch_size=2)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "inference_generation_instruction.py", *args, "--output_dir", str(out)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    part = out / "generations.part-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and len(part.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "generations.jsonl").exists(), "the run finished before it could be interrupted"
    done = len(part.read_bytes().splitlines())
    assert 4 <= done < 120
    with open(part, "a") as f:  # as if killed in the middle of writing a line
        f.write('{"index": 70, "batch": 35, "batch_si')

    with pytest.raises(UserInputError, match="different settings"):
        instruct(tiny_llama, out, instructions, *args[2:4], "--batch_size", "4")
    resumed = instruct(tiny_llama, out, instructions, *args[2:])
    info = json.loads((out / "generation_info.json").read_text())
    assert info["generated_this_run_by_process_0"] == 120 - done
    assert not [f for f in os.listdir(out) if ".part-" in f]
    uninterrupted = instruct(tiny_llama, tmp_path / "whole", instructions, *args[2:])
    assert resumed == uninterrupted  # sampled (temperature 1), so every batch's seed is checked too
    assert [r["instruction"] for r in resumed] == ["Tell me about lists."] * 60 + ["What is a tuple?"] * 60


def test_generations_train_again(trained, tiny_llama, instruction_file, tmp_path):
    instruct(tiny_llama, tmp_path / "gen", instruction_file, "--lora_weights_path", trained)
    generations = str(tmp_path / "gen" / "generations.jsonl")
    assert len(load_records_file(generations)) == 5
    reset_accelerate()
    sizes = dict(block_size=32, per_device_train_batch_size=2, max_train_steps=1)
    train_clm.main(train_args(tiny_llama, generations, tmp_path / "again", **sizes, clip_norm=-1, noise_multiplier=-1))
    assert (tmp_path / "again" / "adapter_model.safetensors").exists()


def test_merge_lora_gives_the_same_logits(trained, tiny_llama):
    ids = torch.tensor([encode_prompt_ids(tiny_llama)])
    logits = {}
    for merge in ([], ["--merge_lora"]):
        reset_accelerate()
        args = inference_generation_instruction.parse_args(
            instruction_args(tiny_llama, "unused", "unused", *merge, lora_weights_path=trained)
        )
        model, _ = load_generation_model(args, Accelerator(cpu=True))
        assert isinstance(model, PeftModel) != bool(merge)
        with torch.no_grad():
            logits[bool(merge)] = model(input_ids=ids).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        "What is a tuple? 2",
        "What is a tuple? #### two",
        "What is a tuple? #### 0",
        "What is a tuple? #### -1",
        "What is a tuple? #### 2 more",
    ],
)
def test_malformed_instruction_line_is_refused_naming_it(tiny_llama, tmp_path, bad):
    instructions = write_instructions(tmp_path / "bad.txt", ["Describe a list. #### 3", bad])
    with pytest.raises(UserInputError, match=r"bad\.txt, line 2: expected"):
        instruct(tiny_llama, tmp_path / "out", instructions)
    assert not (tmp_path / "out").exists()


def test_malformed_instruction_file_exits_2_with_one_line(tiny_llama, tmp_path):
    instructions = write_instructions(tmp_path / "bad.txt", ["Describe a list. #### 3", "", "oops ####"])
    args = instruction_args(tiny_llama, instructions, tmp_path / "out")
    cmd = [sys.executable, "inference_generation_instruction.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {instructions}, line 3: expected `instruction text #### N` with N a whole number >= 1, got 'oops ####'"
    ]
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_model_is_refused(trained, tiny_llama, tiny_gpt2, instruction_file, tmp_path):
    for path in (trained, adapter_path(trained, "bin")):
        with pytest.raises(UserInputError, match="--lora_weights_path .* cannot be loaded onto --model_name_or_path"):
            instruct(tiny_gpt2, tmp_path / "gpt2", instruction_file, "--lora_weights_path", path)
    # same architecture, one layer more: PEFT alone would drop the extra tensors silently
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.num_hidden_layers = 3
    deeper = tmp_path / "deeper"
    save_adapter(add_lora(LlamaForCausalLM(config), 4, 8), str(deeper))
    for path in (str(deeper), str(deeper / "lora_weights.bin")):
        with pytest.raises(UserInputError, match="does not match the base model"):
            instruct(tiny_llama, tmp_path / "deep", instruction_file, "--lora_weights_path", path)


def test_prompts_from_a_data_file_are_refused_unless_declared_public(tiny_llama, tmp_path):
    """generations.jsonl repeats each prompt: private instructions must never reach it."""
    secret = "Patient Jane Roe, SSN 078-05-1120:"
    records = write_records(tmp_path / "private.jsonl", [(secret, "a"), ("Q2:", "b")], jsonl=True)
    for flag in ("--train_file", "--validation_file"):
        out = tmp_path / f"out{flag}"
        args = [flag, records, *cli_flags(model_name_or_path=tiny_llama, output_dir=str(out), max_new_tokens=4)]
        cmd = [sys.executable, os.path.join(ROOT, "inference_generation_dataset.py"), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 2 and "--prompts_are_public" in result.stderr
        assert result.stderr.startswith(f"error: {records}:") and len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()
    holders = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert holders == [tmp_path / "private.jsonl"]


def test_dataset_script_prompts(tiny_llama, tmp_path):
    records = write_records(tmp_path / "val.jsonl", [("Q1:", "a"), ("Q2:", "b"), ("", "c")], jsonl=True)
    reset_accelerate()
    args = cli_flags(validation_file=records, num_samples=7, model_name_or_path=tiny_llama, prompts_are_public=True)
    path = inference_generation_dataset.main([*args, *cli_flags(output_dir=tmp_path / "file", max_new_tokens=4)])
    assert [r["instruction"] for r in read_jsonl(path)] == ["Q1:", "Q2:", ""] * 2 + ["Q1:"]

    pubmed = tmp_path / "pubmed"
    datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"text": [f"{split} abstract {i}" for i in range(3)]})
            for split in ("train", "validation", "test")
        }
    ).save_to_disk(str(pubmed))
    reset_accelerate()
    args = cli_flags(dataset_name="pubmed_generation", dataset_dir=pubmed, model_name_or_path=tiny_llama, num_samples=2)
    path = inference_generation_dataset.main([*args, *cli_flags(output_dir=tmp_path / "pm", max_new_tokens=4)])
    assert [r["instruction"] for r in read_jsonl(path)] == ["Abstract:", "Abstract:"]
