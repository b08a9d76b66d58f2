"""Kill a training run after a checkpoint, resume it, and get the uninterrupted result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, train_args, write_records
from safetensors.torch import load_file

import train_clm

STEPS = 24


def args_for(model, data, out, *extra):
    sizes = dict(block_size=48, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=STEPS)
    privacy = dict(clip_norm=0.5, noise_multiplier=0.8, delta=1e-3, insecure_dp_seed=4)
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
    first = out / "checkpoints" / "step_3"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never reached its first checkpoint"
    if (out / "adapter_model.safetensors").exists():
        pytest.skip("the run finished before it could be killed")  # not expected: 24 steps take seconds
    # a torn save (scratch folder) must never be taken for a checkpoint
    os.makedirs(out / "checkpoints" / ".incomplete_step_99", exist_ok=True)

    train_clm.main(args_for(tiny_llama, data, out, "--resume_from_checkpoint", "latest"))
    resumed_adapter, resumed_report = outputs(out)
    assert resumed_report["steps"] == whole_report["steps"] == STEPS
    assert resumed_report["epsilon"] == whole_report["epsilon"]
    assert set(resumed_adapter) == set(whole_adapter)
    for k in whole_adapter:
        assert torch.allclose(resumed_adapter[k], whole_adapter[k], rtol=1e-5, atol=1e-7), k
    log = json.loads(open(out / "training_log.json").read())
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))


def reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_resume_refuses_a_checkpoint_of_a_different_run(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    out = tmp_path / "run"
    train_clm.main(args_for(tiny_llama, data, out))
    other = write_records(tmp_path / "other.json", text_records[:40])
    copied = tmp_path / "unfinished" / "checkpoints" / "step_3"  # outside the finished run's folder
    shutil.copytree(out / "checkpoints" / "step_3", copied)
    reset_accelerate()
    with pytest.raises(Exception, match="different run|dataset_size"):
        train_clm.main(args_for(tiny_llama, other, tmp_path / "unfinished", "--resume_from_checkpoint", str(copied)))


def test_a_finished_run_is_final(tiny_llama, text_records, tmp_path):
    """Resuming a finished run would release a second adapter under the same reported epsilon."""
    data = write_records(tmp_path / "d.json", text_records[:64])
    out = tmp_path / "run"
    train_clm.main(args_for(tiny_llama, data, out))
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if os.path.isfile(out / name)}
    for resume in ["latest", str(out / "checkpoints" / "step_21")]:
        for output_dir in [out, tmp_path / "elsewhere"] if resume != "latest" else [out]:
            reset_accelerate()
            args = args_for(tiny_llama, data, output_dir, "--resume_from_checkpoint", resume)
            cmd = [sys.executable, os.path.join(ROOT, "train_clm.py"), *args]
            result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert result.returncode == 2, result.stderr
            assert "finished run" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    after = {name: (out / name).read_bytes() for name in os.listdir(out) if os.path.isfile(out / name)}
    assert after == before
