"""Sharded loading (utils/model/sharded_loading.py, docs/DESIGN.md 2.9): under FSDP the base is built on
the meta device and every process reads only its own shards from the safetensors files; the
adapter equals the unsharded run's, the LoRA initialisation is the same on every process, broken
checkpoints are refused in one line naming the file. Also the two-machine FSDP config, run as two
"machines" of one process each on localhost."""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from helpers import ROOT, cli_flags, process_env, relative_difference, run_ok, write_records

from utils.dist_utils import accelerate_launch_command, free_port, torchrun_command

COMMON = [
    *cli_flags(block_size=64, clip_norm=0.5, noise_multiplier=0.7, max_train_steps=2, delta=1e-3, seed=5),
    *cli_flags(insecure_dp_seed=13, gradient_accumulation_steps=2, sampling="poisson", learning_rate=1e-2),
    *cli_flags(lr_scheduler_type="constant"),
]
WORKER = os.path.join("tests", "fsdp_worker.py")
TIMEOUT = 300


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def report(folder, name="privacy_report.json"):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _reports(folder):
    reports = [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2], reports  # really two processes
    return reports


def save_sharded(source, folder, max_shard_size="120KB"):
    """The model of `source` re-saved as several safetensors shards with an index, tokenizer beside."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(source).save_pretrained(folder, max_shard_size=max_shard_size)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(source, name), folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, text_records, tmp_path_factory):
    """A sharded checkpoint and data."""
    folder = tmp_path_factory.mktemp("sharded")
    model = save_sharded(tiny_llama, folder / "model")
    with open(os.path.join(model, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) >= 3  # really several shards
    train = write_records(folder / "train.jsonl", text_records[:40], jsonl=True)
    val = write_records(folder / "val.jsonl", text_records[40:48], jsonl=True)
    data = cli_flags(train_file=train, validation_file=val, validation_is_public=True, model_name_or_path=model)
    return {"folder": folder, "model": model, "data": data}


@pytest.fixture(scope="module")
def setup(checkpoint):
    """... and the unsharded one-process reference run (4 records per step)."""
    import train_clm

    one = str(checkpoint["folder"] / "one")
    train_clm.main([*checkpoint["data"], *COMMON, *cli_flags(per_device_train_batch_size=4, output_dir=one)])
    return {**checkpoint, "one": one}


def two_process_args(setup, out, **options):
    """train_clm.py's arguments for each of two processes (2 records each) writing to `out`."""
    return [*setup["data"], *COMMON, *cli_flags(per_device_train_batch_size=2, output_dir=out, **options)]


def _unsharded_lora_checksum(model_dir):
    from transformers import AutoModelForCausalLM

    from utils.lora_utils import add_lora
    from utils.model.fsdp_utils import replica_checksum

    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir), 16, 16, seed=5)
    return replica_checksum([p for p in model.parameters() if p.requires_grad]).tolist()


@pytest.mark.multiprocess
def test_two_processes_read_only_their_shards_and_equal_the_unsharded_run(setup):
    out, reports = str(setup["folder"] / "two"), str(setup["folder"] / "two_reports")
    args = two_process_args(setup, out, fsdp=True, gradient_ckpt=True, debug_sync_check=1)
    run_ok(torchrun_command(2, WORKER, *args), process_env(FSDP_WORKER_REPORT=reports), TIMEOUT)
    ranks = _reports(reports)
    total = ranks[0]["loaded"]["checkpoint_bytes"]
    for rank in ranks:
        # no process ever held a whole base weight: all were meta until FSDP allocated the shards
        assert rank["base_meta_at_wrap"], rank
        wrap = rank["after_wrap"]
        assert wrap["base_sharded"] == wrap["base_params"] and wrap["lora_sharded"] == 0, wrap
        # and it read its own rows only (an odd row count gives process 0 one row more)
        assert rank["loaded"]["bytes_read"] <= total // 2 + 64 * 1024, rank["loaded"]
        print(f"rank {rank['rank']}: read {rank['loaded']['bytes_read']} of {total} bytes")
    assert sum(r["loaded"]["bytes_read"] for r in ranks) == total  # every byte once
    # the same LoRA initialisation on every process, and the one an unsharded model gets
    assert ranks[0]["lora_init_checksum"] == ranks[1]["lora_init_checksum"] == _unsharded_lora_checksum(setup["model"])
    a, b = adapter(out), adapter(setup["one"])
    assert report(out)["num_processes"] == 2
    diff = relative_difference(a, b)
    print(f"adapter vs unsharded one-process run: relative difference {diff:.3g}")
    assert diff < 1e-6 and relative_difference(a, b, "lora_B") < 1e-6


@pytest.mark.multiprocess
def test_two_machine_config_runs_as_two_one_process_machines(setup):
    """accelerate_configs/fsdp_2machines_8gpus.cfg with num_processes and the address overridden,
    exactly as the steps of docs/distributed.md do on real machines; each 'machine' starts one process."""
    out, reports, port = str(setup["folder"] / "machines"), str(setup["folder"] / "machine_reports"), free_port()
    config = os.path.join("accelerate_configs", "fsdp_2machines_8gpus.cfg")
    overrides = cli_flags(num_processes=2, main_process_ip="127.0.0.1", main_process_port=port, mixed_precision="no")
    script = [WORKER, *two_process_args(setup, out)]
    env = process_env(FSDP_WORKER_REPORT=reports)
    machines = [
        subprocess.Popen(
            accelerate_launch_command(config, *overrides, *cli_flags(machine_rank=rank), *script),
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [m.communicate(timeout=TIMEOUT)[0] for m in machines]
    finally:
        for m in machines:
            m.kill()
    assert [m.returncode for m in machines] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert all(r["sharded"] and r["base_meta_at_wrap"] for r in _reports(reports))
    assert report(out)["num_processes"] == 2
    assert relative_difference(adapter(out), adapter(setup["one"])) < 1e-6


def test_two_machine_config_says_what_the_readme_says():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(os.path.join(ROOT, "accelerate_configs", "fsdp_2machines_8gpus.cfg")).to_dict()
    assert cfg["distributed_type"] == "FSDP" and cfg["mixed_precision"] == "bf16"
    assert cfg["num_machines"] == 2 and cfg["num_processes"] == 16 and cfg["machine_rank"] == 0
    assert cfg["rdzv_backend"] == "static" and cfg["same_network"] is True
    assert cfg["fsdp_config"]["fsdp_version"] == 2 and cfg["fsdp_config"]["fsdp_reshard_after_forward"] is True


# ---- broken checkpoints: refused before anything is loaded, one line naming the file ----


def _broken(checkpoint, tmp_path, damage):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoint["model"], folder)
    with open(folder / "model.safetensors.index.json") as f:
        index = json.load(f)
    shard = sorted(set(index["weight_map"].values()))[1]
    return folder, shard, damage(folder, shard, index)


def _missing(folder, shard, index):
    os.remove(folder / shard)


def _mismatched(folder, shard, index):
    """A shard holding a tensor of another shape under the same name (files of another model)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / shard)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return name


def _truncated(folder, shard, index):
    with open(folder / shard, "r+b") as f:
        f.truncate(os.path.getsize(folder / shard) - 100)


def _stale_index(folder, shard, index):
    """The index names a tensor the shard does not hold."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / shard)
    name = sorted(tensors)[0]
    del tensors[name]
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize(
    "damage, message",
    [
        (_missing, "safetensors shard missing"),
        (_mismatched, "has shape"),
        (_truncated, "truncated"),
        (_stale_index, "does not hold"),
    ],
)
def test_broken_checkpoint_is_refused_naming_the_shard(checkpoint, tmp_path, damage, message):
    from utils.cli import UserInputError
    from utils.model.sharded_loading import empty_model

    folder, shard, name = _broken(checkpoint, tmp_path, damage)
    with pytest.raises(UserInputError, match=message) as err:
        empty_model(str(folder), torch.float32)
    text = str(err.value)
    assert shard in text and "\n" not in text, text
    assert name is None or name in text, text


def test_broken_shard_under_torchrun_exits_2_with_one_line(checkpoint, tmp_path):
    folder, shard, _ = _broken(checkpoint, tmp_path, _missing)
    data = [str(folder) if x == checkpoint["model"] else x for x in checkpoint["data"]]
    cmd = torchrun_command(1, "train_clm.py", *data, *COMMON, *cli_flags(output_dir=tmp_path / "out", fsdp=True))
    result = subprocess.run(cmd, cwd=ROOT, env=process_env(), capture_output=True, text=True, timeout=TIMEOUT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and shard in errors[0], result.stderr[-3000:]
    # the worker exited 2 without a traceback of its own (torchrun adds its own report of the exit)
    assert re.search(r"exitcode\s*:\s*2\b", result.stderr), result.stderr[-3000:]
    assert 'train_clm.py", line' not in result.stderr and "utils/" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_bin_only_checkpoint_is_refused(tiny_llama, tmp_path):
    from utils.cli import UserInputError
    from utils.model.sharded_loading import open_checkpoint

    with pytest.raises(UserInputError, match="safetensors checkpoints only"):
        open_checkpoint(str(tmp_path))


def test_stand_ins_leave_the_meta_model_as_it_was(checkpoint):
    """LoRA added through the CPU stand-ins: base weights back on meta and frozen, tied weights
    still tied, adapters real and float32 (as on a bf16 model loaded for real)."""
    from utils.lora_utils import add_lora
    from utils.model.sharded_loading import cpu_stand_ins, empty_model

    model, _ = empty_model(checkpoint["model"], torch.bfloat16)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    with cpu_stand_ins(model):
        peft_model = add_lora(model, 4, 4, seed=1)
    base = [p for p in peft_model.parameters() if not p.requires_grad]
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    assert base and all(p.is_meta for p in base)
    assert lora and all(not p.is_meta and p.dtype == torch.float32 for p in lora)
    hf = peft_model.get_base_model()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight


def test_tied_embeddings_stay_tied_on_the_meta_device(tiny_gpt2):
    """GPT-2 ties its output layer to the input embeddings and saves the matrix once: the meta
    model must share the one parameter, or the checkpoint would lack lm_head.weight."""
    from utils.model.fsdp_utils import _own_groups
    from utils.model.sharded_loading import empty_model

    model, entries = empty_model(tiny_gpt2, torch.float32)
    assert model.lm_head.weight is model.transformer.wte.weight and "lm_head.weight" not in entries
    assert _own_groups(model) == []  # a shared weight cannot sit in two FSDP groups
