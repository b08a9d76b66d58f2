"""A run's whole life: kill and resume, forks of a checkpoint, a discarded branch whose figures reached
the tracker, and checkpoints whose saved state the private data cannot move (docs/DESIGN.md 2.14)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, train_args, write_records
from safetensors.torch import load_file

import train_clm
from utils.privacy.accounting import composed_epsilon, compute_epsilon

STEPS = 24


def args_for(model, data, out, *extra, seeded=True, steps=STEPS, block_size=48):
    sizes = dict(block_size=block_size, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    sizes["max_train_steps"] = steps
    privacy = dict(clip_norm=0.5, noise_multiplier=0.8, delta=1e-3, insecure_dp_seed=4 if seeded else None)
    return [*train_args(model, data, out, **sizes, **privacy, checkpointing_steps=3), *extra]


def outputs(folder):
    report = json.loads(open(os.path.join(folder, "privacy_report.json")).read())
    return load_file(os.path.join(folder, "adapter_model.safetensors")), report


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    train_clm.main(args_for(tiny_llama, data, tmp_path / "whole"))
    whole_adapter, whole_report = outputs(tmp_path / "whole")

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_clm.py"), *args_for(tiny_llama, data, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    first = tmp_path / "killed.work" / "checkpoints" / "step_3"  # working state, beside the release
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never reached its first checkpoint"
    if (out / "adapter_model.safetensors").exists():
        pytest.skip("the run finished before it could be killed")  # not expected: 24 steps take seconds
    assert not out.exists(), "an unfinished run without a tracker has released nothing"
    # a torn save (scratch folder) must never be taken for a checkpoint
    os.makedirs(first.parent / ".incomplete_step_99", exist_ok=True)

    train_clm.main(args_for(tiny_llama, data, out, "--resume_from_checkpoint", "latest"))
    resumed_adapter, resumed_report = outputs(out)
    assert resumed_report["steps"] == whole_report["steps"] == STEPS
    assert resumed_report["epsilon_if_seed_secret"] == whole_report["epsilon_if_seed_secret"]
    assert set(resumed_adapter) == set(whole_adapter)
    for k in whole_adapter:
        assert torch.allclose(resumed_adapter[k], whole_adapter[k], rtol=1e-5, atol=1e-7), k
    log = json.loads(open(out / "training_log.json").read())
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    # the killed branch ran past step 3 on the data: the ledger counts it, the release did not see it
    assert resumed_report["released_steps"] == STEPS
    assert resumed_report["ledger_steps"] > STEPS and resumed_report["ledger_epsilon"] is None  # a known seed
    assert "checkpoints" not in os.listdir(out)


def reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_resume_refuses_a_checkpoint_of_a_different_run(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    out = tmp_path / "run"
    train_clm.main(args_for(tiny_llama, data, out, steps=6))
    checkpoint = str(tmp_path / "run.work" / "checkpoints" / "step_3")
    for other, message in [(text_records[:40], "dataset_size"), (text_records[1:65], "trained on other data")]:
        reset_accelerate()
        data = write_records(tmp_path / "other.json", other)
        with pytest.raises(Exception, match=message):
            resume = ("--resume_from_checkpoint", checkpoint)
            train_clm.main(args_for(tiny_llama, data, tmp_path / "fork", *resume, steps=6))


def test_forks_of_a_checkpoint_are_all_counted_and_a_release_is_final(tiny_llama, text_records, tmp_path):
    """Every fork of a checkpoint is a run of its own (its epsilon counts its own adapter's steps), and
    every step of every fork is on the ledger; a finished release is never continued."""
    data = write_records(tmp_path / "d.json", text_records[:64])
    out = tmp_path / "run"
    train_clm.main(args_for(tiny_llama, data, out, seeded=False, steps=8))
    _, report = outputs(out)
    q, sigma = report["sampling_rate"], report["effective_noise_multiplier"]
    assert report["ledger_steps"] == 8 and report["ledger_epsilon"] == pytest.approx(report["epsilon"], rel=1e-9)

    before = {name: (out / name).read_bytes() for name in os.listdir(out) if os.path.isfile(out / name)}
    cmd = [sys.executable, os.path.join(ROOT, "train_clm.py")]
    result = subprocess.run(
        cmd + args_for(tiny_llama, data, out, "--resume_from_checkpoint", "latest", seeded=False, steps=8),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2 and "finished run" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if os.path.isfile(out / n)} == before

    checkpoint = str(tmp_path / "run.work" / "checkpoints" / "step_3")
    for k, fork in enumerate(["fork_a", "fork_b"], start=1):
        reset_accelerate()
        resume = ("--resume_from_checkpoint", checkpoint)
        train_clm.main(args_for(tiny_llama, data, tmp_path / fork, *resume, seeded=False, steps=8))
        _, forked = outputs(tmp_path / fork)
        assert forked["steps"] == forked["released_steps"] == 8
        assert forked["epsilon"] == pytest.approx(report["epsilon"], rel=1e-12)  # its own adapter: 8 steps
        assert forked["ledger_steps"] == 8 + 5 * k  # the data has seen them all
        assert forked["ledger_epsilon"] == pytest.approx(composed_epsilon({(q, sigma): 8 + 5 * k}, 1e-3), rel=1e-9)


def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        values += [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []
    return values


def test_steps_a_discarded_branch_released_count_in_the_resumed_release(
    tiny_llama, text_records, tmp_path, monkeypatch
):
    """A run that crashes at step 6 after a checkpoint at 3 has sent steps 4-5 to the tracker; resumed
    from step 3, those figures stay in the release beside the new steps 4-5: epsilon counts both."""
    data = write_records(tmp_path / "d.json", text_records[:64])
    out = tmp_path / "run"
    real_step = train_clm.train_logical_step

    def crash_at_step_6(*args):
        if args[-1] == 5:
            for tracker in args[4].trackers:  # the worst case: every row before the crash reached the disk
                tracker.writer.flush()
            raise RuntimeError("simulated crash")
        return real_step(*args)

    monkeypatch.setattr(train_clm, "train_logical_step", crash_at_step_6)
    tracked = ("--with_tracking", "--eval_freq", "1", "--validation_file", data.replace("d.json", "v.json"))
    write_records(tmp_path / "v.json", text_records[64:72])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_clm.main(args_for(tiny_llama, data, out, *tracked, "--validation_is_public", seeded=False, steps=8))
    monkeypatch.setattr(train_clm, "train_logical_step", real_step)
    reset_accelerate()
    resume = ("--resume_from_checkpoint", "latest", "--validation_is_public")
    train_clm.main(args_for(tiny_llama, data, out, *tracked, *resume, seeded=False, steps=8))
    _, report = outputs(out)
    losses = tensorboard_scalars(out / "tracker", "train_loss")
    assert len(losses) == 5 + 8 - 3  # steps 1-5 of the crashed run, 4-8 of the resumed one
    # steps 4, 5 and 6 of the crashed run were on the data (6 crashed after it was ledgered)
    assert report["steps"] == 8 and report["released_steps"] == 8 + 3
    assert len(losses) <= report["released_steps"]
    q, sigma = report["sampling_rate"], report["effective_noise_multiplier"]
    assert report["epsilon"] == pytest.approx(compute_epsilon(sigma, q, 11, 1e-3), rel=1e-12)
    assert report["ledger_steps"] == 11 and report["ledger_epsilon"] == pytest.approx(report["epsilon"], rel=1e-9)
    assert len(tensorboard_scalars(out / "tracker", "eval_loss")) == 5 + 4 + 1  # steps 1-5 and 4-7, and the final one
    assert (
        "insecure_dp_seed" not in open(glob.glob(str(out / "tracker" / "**" / "hparams.yml"), recursive=True)[0]).read()
    )


@pytest.fixture(scope="module")
def llama_with_attention_dropout(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dropout_llama")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.2}))
    return str(folder)


@pytest.mark.parametrize("dropout", ["lora", "base"])
def test_saved_random_state_is_the_same_whatever_the_records_lengths(
    dropout, llama_with_attention_dropout, text_records, tmp_path
):
    """Dropout draws as many numbers as its tensors hold: without reseeding, the generator state a
    checkpoint saves tells two data sets of the same size apart by their records' lengths."""
    short = [(i, a[:20]) for i, a in text_records[:64]]
    long = [(i, (a * 4)[:200]) for i, a in text_records[:64]]
    flags = ("--lora_dropout", "0.2") if dropout == "lora" else ("--keep_base_dropout",)
    states = {}
    for name, records in (("short", short), ("long", long)):
        reset_accelerate()
        data = write_records(tmp_path / f"{name}.json", records)
        train_clm.main(args_for(llama_with_attention_dropout, data, tmp_path / name, *flags, steps=7, block_size=64))
        states[name] = {
            step: (tmp_path / f"{name}.work" / "checkpoints" / f"step_{step}" / "random_states_0.pkl").read_bytes()
            for step in (3, 6)
        }
    assert states["short"] == states["long"]
    reset_accelerate()  # and after a resume: step 6 saved by the resumed run is the same again
    checkpoint = str(tmp_path / "long.work" / "checkpoints" / "step_3")
    data = str(tmp_path / "long.json")
    resume = ("--resume_from_checkpoint", checkpoint)
    train_clm.main(args_for(llama_with_attention_dropout, data, tmp_path / "fork", *flags, *resume, steps=7))
    assert (tmp_path / "fork.work" / "checkpoints" / "step_6" / "random_states_0.pkl").read_bytes() == states["long"][6]
