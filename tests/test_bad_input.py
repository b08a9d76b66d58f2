"""Bad input through the command line: one line naming the file, record or argument, a non-zero
exit, no traceback, and nothing in --output_dir that looks like a finished run.

Each case runs the script's `main` under `run_cli`, exactly what its `__main__` does, in this process
(the exit status is run_cli's SystemExit code, stderr what it prints): a subprocess per case would
spend ~6 s of CPU on imports alone. One case also runs as a real `python <script>` process, so the
contract is checked at the process boundary too."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, write_records

import train_clm
from utils.cli import UserInputError
from utils.data_utils import load_raw_datasets

FINISHED = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "lora_weights.bin",
    "privacy_report.json",
    "all_results.json",
    "generations.jsonl",
    "generation_info.json",
}

# name -> (script, arguments, substrings of the error line); {d} = data folder, {m} = tiny model
TRAIN = (
    "train_clm.py",
    [
        "--model_name_or_path",
        "{m}",
        "--block_size",
        "64",
        "--clip_norm",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--max_train_steps",
        "1",
    ],
)
DP = ["--noise_multiplier", "1", "--delta", "1e-3"]
CASES = {
    "missing data file": ([*DP, "--train_file", "{d}/nope.json"], ["{d}/nope.json", "file not found"]),
    "malformed JSON": (
        [*DP, "--train_file", "{d}/malformed.json"],
        ["{d}/malformed.json", "not valid JSON", "line 1, column"],
    ),
    "mismatched lengths": (
        [*DP, "--train_file", "{d}/mismatch.json"],
        ["{d}/mismatch.json", "'instruction' has 3 entries but 'answer' has 2"],
    ),
    "missing keys": ([*DP, "--train_file", "{d}/nokeys.jsonl"], ["{d}/nokeys.jsonl", "lack the key(s) ['answer']"]),
    "non-string record": (
        [*DP, "--train_file", "{d}/nonstring.jsonl"],
        ["{d}/nonstring.jsonl", "record 3", "'answer'", "int"],
    ),
    "empty data set": ([*DP, "--train_file", "{d}/empty.json"], ["{d}/empty.json", "no records"]),
    "block_size beyond context": (
        [*DP, "--train_file", "{d}/good.json", "--block_size", "1024"],
        ["--block_size 1024", "context length 256"],
    ),
    "delta >= 1/N": (
        ["--noise_multiplier", "1", "--delta", "0.1", "--train_file", "{d}/good.json"],
        ["--delta 0.1", "1/N", "20 records"],
    ),
    "target_epsilon with noise_multiplier": (
        [*DP, "--target_epsilon", "2", "--train_file", "{d}/good.json"],
        ["--target_epsilon", "--noise_multiplier", "exclude"],
    ),
    "infeasible target": (
        ["--target_epsilon", "1e-6", "--delta", "1e-5", "--train_file", "{d}/good.json"],
        ["--target_epsilon 1e-06", "unreachable"],
    ),
    "missing model folder": (
        [*DP, "--train_file", "{d}/good.json", "--model_name_or_path", "{d}/no_model"],
        ["--model_name_or_path {d}/no_model", "no such model folder"],
    ),
    "batch size 0": (
        [*DP, "--train_file", "{d}/good.json", "--per_device_train_batch_size", "0"],
        ["--per_device_train_batch_size 0", "at least 1"],
    ),
    "batch size not a number": (
        [*DP, "--train_file", "{d}/good.json", "--per_device_train_batch_size", "abc"],
        ["--per_device_train_batch_size", "invalid int value: 'abc'"],
    ),
    # inference side
    "adapter not matching the base model": (
        (
            "inference_generation_instruction.py",
            [
                "--instruction_file",
                "{d}/instructions.txt",
                "--model_name_or_path",
                "{m}",
                "--lora_weights_path",
                "{d}/other_adapter",
                "--max_new_tokens",
                "4",
            ],
        ),
        ["--lora_weights_path {d}/other_adapter", "does not match the base model", "size mismatch"],
    ),
    "malformed instruction line": (
        (
            "inference_generation_instruction.py",
            ["--instruction_file", "{d}/bad_instructions.txt", "--model_name_or_path", "{m}", "--max_new_tokens", "4"],
        ),
        ["{d}/bad_instructions.txt", "line 3", "#### N"],
    ),
}
LONG_RECORDS = "records longer than block_size"  # not an error: truncated, with a count
IN_A_PROCESS = "missing data file"  # also run as its own process


def _write_inputs(d, records):
    write_records(d / "good.json", records)
    (d / "malformed.json").write_text('{"instruction": ["a", "b"], "answer": ["x", ')
    json.dump({"instruction": ["a", "b", "c"], "answer": ["x", "y"]}, open(d / "mismatch.json", "w"))
    (d / "nokeys.jsonl").write_text(json.dumps({"instruction": "a", "text": "x"}) + "\n")
    (d / "nonstring.jsonl").write_text(
        "".join(json.dumps({"instruction": "", "answer": 7 if i == 3 else "text"}) + "\n" for i in range(5))
    )
    json.dump({"instruction": [], "answer": []}, open(d / "empty.json", "w"))
    (d / "instructions.txt").write_text("Write an abstract. #### 1\n")
    (d / "bad_instructions.txt").write_text("Write an abstract. #### 1\n\nno count on this line\n")


def _write_other_adapter(folder):
    """A LoRA adapter for a Llama with another hidden size: its tensors cannot fit the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=402, hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=64)
    config = LlamaConfig(**sizes, num_attention_heads=2, num_key_value_heads=1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(folder)


def _run(script, args, output_dir):
    """`python <script> args --output_dir output_dir`, run in this process: (exit status, stdout, stderr)."""
    import contextlib
    import importlib
    import io

    from accelerate.state import AcceleratorState, PartialState

    from utils.cli import run_cli

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err, argv0 = io.StringIO(), io.StringIO(), sys.argv[0]
    sys.argv[0] = os.path.join(ROOT, script)  # argparse names the script in its errors
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(lambda: main([*args, "--output_dir", output_dir]))
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv[0] = argv0
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def _run_process(script, args, output_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args, "--output_dir", output_dir],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def runs(tiny_llama, text_records, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    _write_inputs(d, text_records[:20])
    _write_other_adapter(str(d / "other_adapter"))
    fill = lambda items: [a.format(d=d, m=tiny_llama) for a in items]  # noqa: E731
    jobs = {}
    for name, (spec, _) in CASES.items():
        script, args = spec if isinstance(spec, tuple) else (TRAIN[0], TRAIN[1] + spec)
        jobs[name] = (script, fill(args), str(d / ("out_" + re.sub(r"\W+", "_", name))))
    jobs[LONG_RECORDS] = (
        TRAIN[0],
        fill(TRAIN[1] + DP + ["--train_file", "{d}/good.json", "--block_size", "16"]),
        str(d / "out_long"),
    )
    results = {name: _run(*job) for name, job in jobs.items()}
    script, args, output_dir = jobs[IN_A_PROCESS]
    jobs[IN_A_PROCESS + " (process)"] = (script, args, output_dir + "_process")
    results[IN_A_PROCESS + " (process)"] = _run_process(*jobs[IN_A_PROCESS + " (process)"])
    return {name: (result, jobs[name][2], d, tiny_llama) for name, result in results.items()}


def _looks_finished(output_dir):
    if not os.path.isdir(output_dir):
        return []
    return [n for n in os.listdir(output_dir) if n in FINISHED or n.startswith(".incomplete")]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES, IN_A_PROCESS + " (process)"])
def test_bad_input_is_refused_in_one_line(runs, name):
    result, output_dir, d, model = runs[name]
    expected = [s.format(d=d, m=model) for s in CASES[name.removesuffix(" (process)")][1]]
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-1]
    assert re.match(r"^(error: |\S+\.py: error: )", last), last
    assert sum("error:" in line for line in lines) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in last, (text, last)
    assert not _looks_finished(output_dir), os.listdir(output_dir)


@pytest.mark.slow
def test_records_longer_than_block_size_are_truncated_and_counted(runs):
    result, output_dir, _, _ = runs[LONG_RECORDS]
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(
        r"note: (\d+) of 20 training records exceed --block_size 16 and were truncated", result.stdout + result.stderr
    )
    assert found and int(found.group(1)) > 0, result.stdout[-2000:]
    assert {"adapter_model.safetensors", "privacy_report.json", "all_results.json"} <= set(os.listdir(output_dir))


# ---- more data-file variants, checked in process (the loader the CLI calls) ----


def _variants(d):
    (d / "badline.jsonl").write_text(
        json.dumps({"instruction": "a", "answer": "x"}) + "\n" + '{"instruction": "a", "answer": \n'
    )
    json.dump({"instruction": ["a", "b", "c"], "answer": ["x", 5, "z"]}, open(d / "number.json", "w"))
    (d / "lackkey.jsonl").write_text(
        json.dumps({"instruction": "a", "answer": "x"}) + "\n" + json.dumps({"instruction": "a"}) + "\n"
    )
    (d / "null.json").write_text(json.dumps({"instruction": ["a", None], "answer": ["x", "y"]}))
    (d / "zero_bytes.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n  \n")
    (d / "latin1.json").write_bytes(b'{"instruction": ["caf\xe9"], "answer": ["x"]}')
    return {
        "badline.jsonl": ["line 2, column", "not valid JSON"],
        "number.json": ["record 1 (counting from 0)", "'answer'", "int"],
        "lackkey.jsonl": ["record 1 (counting from 0)", "'answer' is missing"],
        "null.json": ["record 1 (counting from 0)", "'instruction' is missing"],
        "zero_bytes.jsonl": ["no records"],
        "blank.jsonl": ["only whitespace"],
        "latin1.json": ["not UTF-8"],
    }


def test_more_malformed_data_files_are_named_precisely(tmp_path):
    for name, expected in _variants(tmp_path).items():
        with pytest.raises(UserInputError) as err:
            load_raw_datasets(train_file=str(tmp_path / name))
        message = str(err.value)
        assert "\n" not in message and str(tmp_path / name) in message, message
        for text in expected:
            assert text in message, (name, message)


# ---- argument checks the CLI makes before loading anything (same function, in process) ----


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--noise_multiplier", "1", "--clip_norm", "0"], "--clip_norm 0.0: must be > 0 (or -1 for non-private"),
        (["--target_epsilon", "0"], "--target_epsilon 0.0: must be positive"),
        (["--noise_multiplier", "1", "--delta", "0"], "--delta 0.0: must be in (0, 1)"),
        (["--noise_multiplier", "1", "--num_train_epochs", "-1"], "--num_train_epochs -1.0: must be >= 0"),
        (["--noise_multiplier", "1", "--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0"),
        (["--noise_multiplier", "1", "--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
        (["--noise_multiplier", "1", "--clip_norm", "-1"], "non-private mode needs both"),
        ([], "give --noise_multiplier or --target_epsilon"),
    ],
)
def test_argument_checks(extra, expected):
    with pytest.raises(UserInputError, match=re.escape(expected)):
        train_clm.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--train_file", "t", *extra])
