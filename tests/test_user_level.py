"""User-level privacy (docs/DESIGN.md 2.13): one privacy unit = one person, however many records.

Through the command line on a tiny Llama: a unit's update is the clipped mean of its records'
one-record gradients, at most k records per unit, one clip per unit across micro-batches, exact
equality with the record-level run when every record is its own unit, epsilon over units, 1 vs 2
processes, and one-line errors for bad unit ids."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, cli_flags, process_env, relative_difference, run_ok, torchrun_command, train_args, write_units
from prv_accountant import Accountant
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_clm
from utils.data_utils import Collator, tokenize_record
from utils.dp_utils import per_record_loss
from utils.lora_utils import load_adapter

TEXTS = [
    "a short sentence about the weather",
    "another record, somewhat longer than the first one was",
    "three words here",
    "the fourth record of this unit",
    "and a fifth, the last of them",
]
TARGETS = "q_proj,v_proj,lm_head"
ONE_STEP = dict(max_train_steps=1, per_device_train_batch_size=1)
SGD = cli_flags(optimizer="sgd", learning_rate=0.5, lr_scheduler_type="constant", noise_multiplier=0, block_size=32)
SGD += cli_flags(seed=3, insecure_dp_seed=5, lora_target_modules=TARGETS)


def train(model, data, out, *extra, **options):
    """One run with 'user' as the privacy unit; `options` are more flags as in cli_flags (they win)."""
    options = {"privacy_unit_key": "user", "delta": 0.1} | options
    train_clm.main([*train_args(model, data, out, **options), *extra])
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def one_record_gradients(model_path, adapter_dir, texts):
    """Each record's gradient over the adapter, from a backward pass on that record alone."""
    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_path), adapter_dir, is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = []
    for text in texts:
        batch = Collator([tokenize_record(tokenizer, "", text, 32)], tokenizer.eos_token_id)([0])
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_record_loss(logits, batch["labels"])[0].sum().backward()
        grads.append(torch.cat([dict(model.named_parameters())[n].grad.flatten().double() for n in names]))
    return names, torch.stack(grads)


def clipped(g, clip):
    return g * min(1.0, clip / (float(g.norm()) + 1e-6))


def update(before, after, names, lr=0.5):
    """-(after - before) / lr in the gradient's parameter order (saved names lack PEFT's '.default')."""
    keys = [n.replace(".default.weight", ".weight") for n in names]
    return torch.cat([(before[k].double() - after[k].double()).flatten() / lr for k in keys])


@pytest.fixture(scope="module")
def initial(tiny_llama, tmp_path_factory):
    """The seeded initial adapter (step 0) with B randomised by one non-private step, so that A has gradients."""
    folder = tmp_path_factory.mktemp("initial")
    data = write_units(folder / "warm.jsonl", {"w": TEXTS})
    no_dp = dict(clip_norm=-1, noise_multiplier=-1, max_train_steps=0)
    train_clm.main(
        train_args(tiny_llama, data, folder / "out", **no_dp, seed=3, lora_target_modules=TARGETS, block_size=32)
    )
    return str(folder / "out")


def test_a_unit_moves_the_adapter_by_the_clipped_mean_of_its_records(tiny_llama, initial, tmp_path):
    names, grads = one_record_gradients(tiny_llama, initial, TEXTS[:3])
    before = load_file(os.path.join(initial, "adapter_model.safetensors"))
    mean = grads.mean(0)
    clip = float(mean.norm()) / 3  # the unit's gradient is clipped
    data = write_units(tmp_path / "d.jsonl", {"alice": TEXTS[:3]})  # U = 1, q = 1: the unit is always sampled
    after = train(tiny_llama, data, tmp_path / "out", *SGD, clip_norm=clip, **ONE_STEP, max_records_per_unit=4)
    got = update(before, after, names)
    assert torch.allclose(got, clipped(mean, clip), rtol=1e-4, atol=1e-6 * float(mean.abs().max()))
    # not what clipping each record separately would give
    assert not torch.allclose(got, torch.stack([clipped(g, clip) for g in grads]).mean(0), rtol=1e-2)


def test_a_unit_contributes_at_most_k_records(tiny_llama, initial, tmp_path):
    names, grads = one_record_gradients(tiny_llama, initial, TEXTS)
    before = load_file(os.path.join(initial, "adapter_model.safetensors"))
    data = write_units(tmp_path / "d.jsonl", {"bob": TEXTS})
    after = train(tiny_llama, data, tmp_path / "out", *SGD, clip_norm=100, **ONE_STEP, max_records_per_unit=2)
    got = update(before, after, names)
    matches = [
        pair
        for pair in itertools.combinations(range(5), 2)
        if torch.allclose(got, grads[list(pair)].mean(0), rtol=1e-4, atol=1e-7)
    ]
    assert len(matches) == 1, matches  # exactly two of the five records, averaged


def test_units_in_separate_micro_batches_are_each_clipped_once(tiny_llama, initial, tmp_path):
    names, grads = one_record_gradients(tiny_llama, initial, TEXTS)
    before = load_file(os.path.join(initial, "adapter_model.safetensors"))
    units = {"carol": [0, 1, 2], "dave": [3, 4]}
    clip = float(grads[:3].mean(0).norm()) / 2
    data = write_units(tmp_path / "d.jsonl", {u: [TEXTS[i] for i in ix] for u, ix in units.items()})
    # one unit per micro-batch, two micro-batches per step, U = 2 = B: both units every step
    after = train(tiny_llama, data, tmp_path / "out", *SGD, clip_norm=clip, **ONE_STEP, gradient_accumulation_steps=2)
    expected = sum(clipped(grads[ix].mean(0), clip) for ix in units.values()) / 2
    assert torch.allclose(update(before, after, names), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_every_record_its_own_unit_equals_the_record_level_run(tiny_llama, text_records, tmp_path):
    records = [{"instruction": i, "answer": a, "user": k} for k, (i, a) in enumerate(text_records[:48])]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    sizes = dict(block_size=48, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=4)
    common = dict(**sizes, delta=1e-3, noise_multiplier=0.8, insecure_dp_seed=9)
    train_clm.main(train_args(tiny_llama, str(data), tmp_path / "records", **common))
    train_clm.main(train_args(tiny_llama, str(data), tmp_path / "units", **common, privacy_unit_key="user"))
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("records", "units"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / name / "privacy_report.json").read_text()) for name in ("records", "units"))
    assert (
        ra["epsilon_if_seed_secret"] == rb["epsilon_if_seed_secret"]
        and rb["privacy_unit"] == "user"
        and rb["num_units"] == 48
    )


def test_epsilon_is_accounted_over_units(tiny_llama, tmp_path):
    units = {f"u{k}": TEXTS[: 1 + k % 4] for k in range(20)}  # 20 units, 50 records
    data = write_units(tmp_path / "d.jsonl", units)
    sizes = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=10, block_size=32)
    dp = dict(noise_multiplier="1.0", train_loss="off", clip_norm=1, delta=1e-2)
    train(tiny_llama, data, tmp_path / "out", **dp, **sizes)
    report = json.loads((tmp_path / "out" / "privacy_report.json").read_text())
    assert report["num_units"] == report["dataset_size"] == 20 and report["sampling_rate"] == pytest.approx(
        4 / 20, rel=1e-15
    )
    assert report["max_records_per_unit"] == 4 and report["privacy_unit"] == "user"
    _, estimate, _ = Accountant(
        noise_multiplier=1.0, sampling_probability=0.2, delta=1e-2, eps_error=0.005, max_compositions=10
    ).compute_epsilon(num_compositions=10)
    assert estimate * 0.995 <= report["epsilon"] <= estimate * 1.03


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_equal_one_for_units(tiny_llama, tmp_path):
    units = {f"u{k}": [f"{t} (unit {k})" for t in TEXTS[: 1 + k % 5]] for k in range(16)}
    data = write_units(tmp_path / "d.jsonl", units)
    unit = dict(privacy_unit_key="user", max_records_per_unit=3)
    dp = dict(clip_norm=0.5, noise_multiplier=0.7, delta=1e-2, insecure_dp_seed=11, seed=3)
    common = dict(**unit, **dp, block_size=32, max_train_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")

    def args(out, batch):
        return train_args(tiny_llama, data, out, **common, per_device_train_batch_size=batch)

    run_ok([sys.executable, "train_clm.py", *args(one, 4)], process_env(2))
    run_ok(torchrun_command(2, "train_clm.py", *args(two, 2)), process_env(1))
    assert json.loads(open(os.path.join(two, "privacy_report.json")).read())["num_processes"] == 2
    a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (one, two))
    assert relative_difference(b, a) < 1e-5 and relative_difference(a, {k: 0 * v for k, v in a.items()}, "lora_B") > 0


@pytest.mark.parametrize("value, problem", [(None, "missing or null"), (1.5, "of type float"), ([1], "of type list")])
def test_a_bad_unit_id_is_one_line_naming_the_record(tiny_llama, tmp_path, value, problem):
    lines = [{"instruction": "", "answer": t, "user": "ann"} for t in TEXTS]
    lines[3] = {"instruction": "", "answer": TEXTS[3], **({"user": value} if value is not None else {})}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = train_args(
        tiny_llama, str(data), tmp_path / "out", privacy_unit_key="user", block_size=32, noise_multiplier=1, delta=0.1
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train_clm.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # progress bars may come first
    err = lines[-1]
    assert (
        err.startswith("error: ") and sum("error" in line for line in lines) == 1 and "Traceback" not in result.stderr
    )
    assert str(data) in err and "record 3" in err and problem in err and "'user'" in err, err
    assert not (tmp_path / "out").exists()
