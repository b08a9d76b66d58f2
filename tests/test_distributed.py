"""Two CPU processes (gloo) give the same adapter as one process for the same logical batch, Poisson
draw and noise seed, with noise on; with FSDP the frozen base is sharded and the LoRA parameters are
not (docs/DESIGN.md 2.4, 2.5, 2.9, 5). The launches use the README's configs in accelerate_configs/."""

import glob
import json
import os
import re
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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
def test_fsdp_under_torchrun_shards_the_base_and_equals_unsharded(run_setup):
    """torch FSDP2 on CPU with gloo, with activation checkpointing (a 7B run uses both) and a
    resumable checkpoint saved mid-run."""
    out, reports = str(run_setup["folder"] / "fsdp"), str(run_setup["folder"] / "fsdp_reports")
    args = two_process_args(run_setup, out, fsdp=True, gradient_ckpt=True, checkpointing_steps=2)
    run_ok(torchrun_command(2, WORKER, *args), process_env(1, FSDP_WORKER_REPORT=reports))
    _check_fsdp_reports(reports)
    assert_same_as_one_process(out, run_setup["one"])
    assert os.path.isdir(os.path.join(out + ".work", "checkpoints", "step_2"))  # accelerate's save_state works sharded


@pytest.mark.multiprocess
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


CONFIG_PAGES = ["README.md", "docs/distributed.md"]  # each has a table: config | what it starts | edit
NUMBERS = {"one": 1, "two": 2}


def documented_configs():
    """(where, config, what the docs say it starts, what they say to edit): a row of each config
    table, or a sentence `accelerate_configs/X.cfg runs ...:` elsewhere in docs/. A row that says
    "the same ..." says what the row above it says, then the rest."""
    found = []
    for page in CONFIG_PAGES:
        above = ""
        with open(os.path.join(ROOT, page)) as f:
            for line in f:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                name = re.fullmatch(r"`accelerate_configs/([\w.]+\.cfg)`", cells[0]) if len(cells) == 3 else None
                if name:
                    says = f"{above} {cells[1]}" if cells[1].startswith("the same") else cells[1]
                    found.append((page, name[1], says, cells[2]))
                    above = says
    for page in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        text = " ".join(open(page).read().split())
        for m in re.finditer(r"`accelerate_configs/([\w.]+\.cfg)` runs ([^:.]*)", text):
            found.append((os.path.relpath(page, ROOT), m[1], m[2], ""))
    return found


def config_mismatches(cfg, raw, says, edit):
    """What `says` and `edit` claim of a config that its file contradicts (cfg: as accelerate loads
    it, defaults filled in; raw: the keys the file itself sets)."""
    text, wrong = says.lower(), []

    def expect(key, value, why):
        if cfg.get(key) != value:
            wrong.append(f"{why}: {key} is {cfg.get(key)!r}, not {value!r}")

    cpu = re.search(r"\b(\d+|one|two) cpu process(?:es)?\b", text)
    if cpu:
        count = int(NUMBERS.get(cpu[1], cpu[1]))
        expect("num_processes", count, cpu[0])
        expect("use_cpu", True, cpu[0])
        # one process: no launcher; several: torchrun's (MULTI_CPU without mpirun runs ONE process)
        expect("distributed_type", "NO" if count == 1 else "MULTI_GPU", cpu[0])
        if "bf16" not in text:  # docs/performance.md: float32 stays the default of every CPU config
            expect("mixed_precision", "no", "a CPU config that does not say bf16")
    if "process per gpu" in text or "gpus" in text:
        expect("use_cpu", False, "GPUs")
        if cfg["distributed_type"] not in ("FSDP", "MULTI_GPU"):
            wrong.append(f"GPUs: distributed_type is {cfg['distributed_type']!r}")
    machines = re.search(r"(\d+) machines x (\d+) gpus", text)
    if machines:
        expect("num_machines", int(machines[1]), machines[0])
        expect("num_processes", int(machines[1]) * int(machines[2]), machines[0])
    for m in re.finditer(r"\((\d+) processes\)|\((\d+) as shipped\)", f"{text} {edit}"):
        expect("num_processes", int(m[1] or m[2]), m[0])
    if "fsdp" in text:
        expect("distributed_type", "FSDP", "FSDP")
        fsdp = cfg.get("fsdp_config") or {}
        if "fsdp2" in text and fsdp.get("fsdp_version") != 2:
            wrong.append(f"FSDP2: fsdp_version is {fsdp.get('fsdp_version')!r}")
        if "fully sharded" in text and fsdp.get("fsdp_reshard_after_forward") is not True:
            wrong.append("fully sharded: fsdp_reshard_after_forward is not true")
        # loaded shard by shard by train_clm.py itself: accelerate's own loading must stay off
        if fsdp.get("fsdp_cpu_ram_efficient_loading"):
            wrong.append("fsdp_cpu_ram_efficient_loading is on")
    else:
        if cfg["distributed_type"] == "FSDP":
            wrong.append("FSDP, which the docs do not say")
    if "data parallel" in text:
        expect("distributed_type", "MULTI_GPU", "data parallel")
    if "bf16" in text:
        expect("mixed_precision", "bf16", "bf16")
    for key in re.findall(r"`(\w+)`", edit):
        if key not in raw:
            wrong.append(f"the docs say to edit {key}, which the file does not set")
    return wrong


def test_configs_say_what_the_readme_says():
    """README.md and docs/ say, for each config in accelerate_configs/, how many processes it
    starts, on CPU or GPU, with FSDP or not and in which precision: the .cfg files must agree."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    documented = documented_configs()
    shipped = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "accelerate_configs", "*.cfg")))
    assert sorted({name for _, name, _, _ in documented}) == shipped  # each config is described, none missing
    tables = {page: sorted(name for where, name, _, _ in documented if where == page) for page in CONFIG_PAGES}
    assert len(tables["README.md"]) == 5 and tables["README.md"] == tables["docs/distributed.md"]
    wrong = []
    for page, name, says, edit in documented:
        path = os.path.join(ROOT, "accelerate_configs", name)
        with open(path) as f:
            raw = yaml.safe_load(f)
        cfg = load_config_from_file(path).to_dict()
        wrong += [f"{page}, {name} ({says}): {w}" for w in config_mismatches(cfg, raw, says, edit)]
    # sentences such as "`cpu_2proc.cfg` says `distributed_type: MULTI_GPU`" quote a setting
    quoted = r"`(?:accelerate_configs/)?([\w.]+\.cfg)` (?:says|with) `(\w+): ([^`]+)`"
    checked = 0
    for page in ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        text = " ".join(open(os.path.join(ROOT, page)).read().split())
        for name, key, value in re.findall(quoted, text):
            cfg = load_config_from_file(os.path.join(ROOT, "accelerate_configs", name)).to_dict()
            checked += 1
            if cfg.get(key) != yaml.safe_load(value):
                wrong.append(f"{page}: {name} says {key}: {value}, the file {cfg.get(key)!r}")
    assert checked >= 2 and not wrong, "\n".join(wrong)


@pytest.mark.multiprocess
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
