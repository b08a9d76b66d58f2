"""Two CPU processes (gloo) give the same adapter as one process for the same logical batch, Poisson
draw and noise seed, with noise on; with FSDP the frozen base is sharded and the LoRA parameters are
not (docs/DESIGN.md 2.4, 2.5, 2.9, 5). The launches use the README's configs in accelerate_configs/."""

import json
import os
import sys

import pytest
import torch
from helpers import ROOT, cli_flags, process_env, relative_difference, run_ok, write_records
from safetensors.torch import load_file

from utils.dist_utils import accelerate_launch_command, torchrun_command

# the same logical batch B = 8: one process 4 x 2 micro-batches, two processes 2 x 2 each
COMMON = [
    *cli_flags(block_size=64, clip_norm=0.5, noise_multiplier=0.7, max_train_steps=3, delta=1e-3, seed=3),
    *cli_flags(insecure_dp_seed=11, gradient_accumulation_steps=2, sampling="poisson", learning_rate=1e-2),
    *cli_flags(lr_scheduler_type="constant"),
]
WORKER = os.path.join("tests", "fsdp_worker.py")
# launcher overrides that run a GPU config as two CPU processes
TWO_CPU_PROCESSES = cli_flags(num_processes=2, mixed_precision="no", main_process_port=0)
TOLERANCE = 1e-5


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def report(folder, name="privacy_report.json"):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def run_setup(tiny_llama, text_records, tmp_path_factory):
    """Data and the one-process reference run (per-device 4 x accumulation 2)."""
    folder = tmp_path_factory.mktemp("distributed")
    train = write_records(folder / "train.jsonl", text_records[:40], jsonl=True)
    val = write_records(folder / "val.jsonl", text_records[40:52], jsonl=True)
    data = cli_flags(train_file=train, validation_file=val, validation_is_public=True, model_name_or_path=tiny_llama)
    one = str(folder / "one")
    args = [*data, *COMMON, *cli_flags(per_device_train_batch_size=4, output_dir=one)]
    run_ok([sys.executable, "train_clm.py", *args], process_env(2))
    assert report(one)["num_processes"] == 1
    return {"folder": folder, "data": data, "one": one}


def two_process_args(run_setup, out, **options):
    """train_clm.py's arguments for each of two processes (2 records each) writing to `out`."""
    flags = cli_flags(per_device_train_batch_size=2, output_dir=out, debug_sync_check=1, **options)
    return [*run_setup["data"], *COMMON, *flags]


def assert_same_as_one_process(out, one):
    rep = report(out)
    assert rep["num_processes"] == 2, rep
    assert rep["expected_batch_size"] == report(one)["expected_batch_size"] == 8
    assert rep["epsilon_if_seed_secret"] == pytest.approx(report(one)["epsilon_if_seed_secret"])
    a, b = adapter(out), adapter(one)
    whole, update = relative_difference(a, b), relative_difference(a, b, "lora_B")  # B starts at 0: the update
    print(f"relative difference vs one process: adapter {whole:.3g}, lora_B (the trained update) {update:.3g}")
    assert whole < TOLERANCE and update < TOLERANCE, (whole, update)
    assert relative_difference(b, {k: torch.zeros_like(v) for k, v in b.items()}, "lora_B") > 0  # it trained
    res, ref = report(out, "all_results.json"), report(one, "all_results.json")
    assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert res["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)


def test_accelerate_launch_two_cpu_processes_equal_one_process(run_setup):
    out = str(run_setup["folder"] / "two")
    config = os.path.join("accelerate_configs", "cpu_2proc.cfg")
    run_ok(accelerate_launch_command(config, "train_clm.py", *two_process_args(run_setup, out)), process_env(1))
    assert_same_as_one_process(out, run_setup["one"])


def _check_fsdp_reports(folder):
    reports = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
    for rep in reports:
        assert rep["world_size"] == 2 and rep["sharded"], rep
        for stage in ("after_wrap", "after_training"):
            s = rep[stage]
            # every base weight is sharded: this process holds half of it
            assert s["base_sharded"] == s["base_params"] > 0, s
            assert s["base_local_numel"] < s["base_full_numel"], s
            assert s["base_local_numel"] <= s["base_full_numel"] // 2 + 1000, s
            ex = s["example"]
            assert ex["local_shape"][0] * 2 == ex["full_shape"][0] and ex["local_shape"][1:] == ex["full_shape"][1:]
            # LoRA parameters are plain, whole, replicated tensors
            assert s["lora_params"] > 0 and s["lora_sharded"] == 0, s
        print(
            f"rank {rep['rank']}: base {rep['after_wrap']['base_local_numel']} of "
            f"{rep['after_wrap']['base_full_numel']} elements held; {rep['after_wrap']['example']}"
        )
        assert rep["drift_detected"], "a one-ulp difference between replicas went unnoticed"
    assert reports[0]["after_wrap"]["lora_numel"] == reports[1]["after_wrap"]["lora_numel"]


def test_fsdp_under_torchrun_shards_the_base_and_equals_unsharded(run_setup):
    """torch FSDP2 on CPU with gloo, with activation checkpointing (a 7B run uses both) and a
    resumable checkpoint saved mid-run."""
    out, reports = str(run_setup["folder"] / "fsdp"), str(run_setup["folder"] / "fsdp_reports")
    args = two_process_args(run_setup, out, fsdp=True, gradient_ckpt=True, checkpointing_steps=2)
    run_ok(torchrun_command(2, WORKER, *args), process_env(1, FSDP_WORKER_REPORT=reports))
    _check_fsdp_reports(reports)
    assert_same_as_one_process(out, run_setup["one"])
    assert os.path.isdir(os.path.join(out + ".work", "checkpoints", "step_2"))  # accelerate's save_state works sharded


def test_fsdp_accelerate_config_on_cpu_shards_and_equals_unsharded(run_setup):
    """The README's FSDP config itself, on two CPU processes (fp32 here; bf16 is for GPUs)."""
    out, reports = str(run_setup["folder"] / "fsdp_cfg"), str(run_setup["folder"] / "fsdp_cfg_reports")
    config = os.path.join("accelerate_configs", "accelerate_config.cfg")
    cmd = accelerate_launch_command(config, *TWO_CPU_PROCESSES, WORKER, *two_process_args(run_setup, out))
    run_ok(cmd, process_env(1, FSDP_WORKER_REPORT=reports))
    _check_fsdp_reports(reports)
    assert_same_as_one_process(out, run_setup["one"])


def test_fsdp_flag_without_a_launcher_is_a_clear_error():
    from accelerate import Accelerator

    from utils.cli import UserInputError
    from utils.model.fsdp_utils import fsdp_requested

    accelerator = Accelerator(cpu=True)
    assert not fsdp_requested(False, accelerator)
    with pytest.raises(UserInputError, match="--fsdp needs a process group"):
        fsdp_requested(True, accelerator)


def test_replica_checksum_sees_one_ulp():
    from utils.model.fsdp_utils import replica_checksum

    params = [torch.randn(8, 4), torch.randn(3, 8)]
    before = replica_checksum(params)
    assert torch.equal(before, replica_checksum([p.clone() for p in params]))
    params[1].view(-1)[5] = torch.nextafter(params[1].view(-1)[5], torch.tensor(10.0))
    assert not torch.equal(before, replica_checksum(params))
    # swapping two values (same sum, same sum of |x|) is seen too
    swapped = [p.clone() for p in params]
    swapped[0].view(-1)[[0, 1]] = swapped[0].view(-1)[[1, 0]]
    assert not torch.equal(replica_checksum(params), replica_checksum(swapped))


def test_configs_say_what_the_readme_says():
    from accelerate.commands.config.config_args import load_config_from_file

    def load(name):
        return load_config_from_file(os.path.join(ROOT, "accelerate_configs", name)).to_dict()

    fsdp = load("accelerate_config.cfg")
    assert fsdp["distributed_type"] == "FSDP" and fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert not fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]  # every process loads the base
    ddp = load("accelerate_config_nofsdp.cfg")
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["mixed_precision"] == "bf16"
    one, two = load("cpu_1proc.cfg"), load("cpu_2proc.cfg")
    assert one["distributed_type"] == "NO" and one["num_processes"] == 1 and one["use_cpu"]
    # MULTI_CPU would silently run one process without mpirun (docs/DESIGN.md 5)
    assert two["distributed_type"] == "MULTI_GPU" and two["num_processes"] == 2


def test_data_parallel_gpu_config_starts_gloo_processes_on_cpu(tmp_path):
    """The multi-GPU config, launched on CPU with 2 processes, gives one 2-process gloo job."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, sys, torch\nfrom accelerate import Accelerator\n"
        "a = Accelerator(cpu=not torch.accelerator.is_available())\n"
        "import torch.distributed as dist\n"
        # one write per line: two processes share the pipe, and print() writes the newline apart
        "os.write(1, (json.dumps([a.process_index, a.num_processes, dist.get_backend()]) + '\\n').encode())\n"
    )
    config = os.path.join("accelerate_configs", "accelerate_config_nofsdp.cfg")
    out = run_ok(accelerate_launch_command(config, *TWO_CPU_PROCESSES, str(probe)), process_env(1), timeout=120).stdout
    seen = sorted(json.loads(line) for line in out.splitlines() if line.startswith("["))
    assert seen == [[0, 2, "gloo"], [1, 2, "gloo"]], out
