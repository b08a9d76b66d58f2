"""Peak memory per process of train_clm.py with the base whole, and sharded over 1, 2 and 4
processes (sharded loading, utils/model/sharded_loading.py), on a random Llama of about 1B parameters;
the adapters of the runs compared; the memory model's predictions beside the measurements.

    python -m scripts.sharded_memory build --output models/random-llama-1.1b   # once, 4.4 GB on disk
    python -m scripts.sharded_memory measure --model models/random-llama-1.1b --json sharded.json

`build` saves a random Llama with TinyLlama-1.1B's shape (vocab 32000, hidden 2048, 22 layers,
4 key-value heads) in float32 as 1 GB safetensors shards, with a small tokenizer trained on local
text. `measure` runs, one after another, on CPU (gloo): the unsharded one-process run; torchrun
with 1, 2 and 4 processes and --fsdp (RUNS); and the same one-process run on a 2-layer model, whose
peak is the process's fixed cost (interpreter, libraries, data) the memory model adds. Each
process reports its own peak resident set (VmHWM from /proc, Linux), which, unlike a time, does
not depend on what else the machine runs. The logical batch is the same in every run (4 records),
so the adapters must agree.

`worker` (used by `measure` and scripts/gpu_check.py) runs train_clm.main and writes the
process's peaks to $SHARDED_MEMORY_REPORT/rank<r>.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from utils.cli import cli_flags, run_cli
from utils.dist_utils import torchrun_command
from utils.io_utils import write_json, write_text
from utils.model.memory_model import Shape
from utils.tiny_models import build_tiny_model, local_sentences, random_llama, train_tokenizer

SHAPE_1B = Shape(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4).llama_config()
TRAIN_ARGS = [
    *cli_flags(block_size=64, clip_norm=1.0, noise_multiplier=1.0, max_train_steps=2, delta=1e-3, seed=7),
    *cli_flags(insecure_dp_seed=5, gradient_accumulation_steps=1, sampling="poisson", learning_rate=1e-3),
    *cli_flags(lr_scheduler_type="constant", lora_r=16, lora_alpha=16),
]
LOGICAL_BATCH = 4
# utils.model.memory_model's terms for a run with TRAIN_ARGS on a float32 base, whole batches of LOGICAL_BATCH records
PREDICT_OPTIONS = dict(
    base_dtype="float32", compute_bytes=4, micro_batch=LOGICAL_BATCH, block_size=64, lora_r=16, gradient_ckpt=False
)
# (label, output folder, processes, FSDP, OpenMP threads per process): the runs of `measure`
RUNS = [
    ("whole, 1 process", "whole", 1, False, 2),
    ("sharded, 1 process", "sharded1", 1, True, 2),
    ("sharded, 2 processes", "sharded2", 2, True, 1),
    ("sharded, 4 processes", "sharded4", 4, True, 1),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="save the random ~1.1B Llama")
    build.add_argument("--output", required=True)
    build.add_argument("--layers", type=int, default=SHAPE_1B["num_hidden_layers"])
    build.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    measure = sub.add_parser("measure", help="the runs, their peaks, adapters and predictions")
    measure.add_argument("--model", required=True)
    measure.add_argument("--json", default=None)
    measure.add_argument("--work_dir", default=None, help="default: a new temporary folder")
    measure.add_argument(
        "--malloc_mmap_threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="glibc's MALLOC_MMAP_THRESHOLD_ for every run (default: glibc's own, dynamic)",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------


def build_random_llama(folder, shape=SHAPE_1B, layers=None, dtype=torch.float32, max_shard_size="1GB", seed=0):
    """A random Llama of `shape` saved as safetensors shards with a small tokenizer; returns folder."""
    train_tokenizer(folder, add_bos=True)
    shape = {**shape, "num_hidden_layers": layers or shape["num_hidden_layers"]}
    tokens = dict(bos_token_id=0, eos_token_id=1, use_cache=False)
    model = random_llama(dtype, seed=seed, max_position_embeddings=2048, **tokens, **shape)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


# ----------------------------------------------------------------------------------------------
# worker: one launched process
# ----------------------------------------------------------------------------------------------


def peaks():
    """This process's peak resident set, and the accelerator's peak allocation where there is one."""
    out = {"peak_rss_bytes": None, "peak_gpu_bytes": None}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["peak_rss_bytes"] = int(line.split()[1]) * 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def worker(argv):
    import torch.distributed as dist

    import train_clm
    import utils.model.model_utils as model_utils

    loaded = {}
    real_load = model_utils.load_local_shards

    def load_and_note_peak(*args, **kwargs):  # the peak through sharded loading, before any training
        result = real_load(*args, **kwargs)
        loaded.update(result, peak_rss_after_loading_bytes=peaks()["peak_rss_bytes"])
        return result

    model_utils.load_local_shards = load_and_note_peak
    train_clm.main(argv)
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = {"rank": rank, "world_size": dist.get_world_size() if dist.is_initialized() else 1, **peaks(), **loaded}
    folder = os.environ["SHARDED_MEMORY_REPORT"]
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"rank{rank}.json"), report)


# ----------------------------------------------------------------------------------------------
# measure
# ----------------------------------------------------------------------------------------------


def write_data(folder):
    sentences = local_sentences()
    paths = {}
    for split, part in (("train", sentences[:64]), ("validation", sentences[64:72])):
        paths[split] = os.path.join(folder, f"{split}.jsonl")
        write_text(paths[split], "".join(json.dumps({"instruction": "", "answer": s}) + "\n" for s in part))
    return paths


def worker_command(model, data, out, processes, fsdp, **options):
    """The command of one train_clm.py run through `worker` on `data` (write_data's paths) into `out`:
    under torchrun with `processes` processes and --fsdp where `fsdp`, else one plain process.
    options: train_clm.py flags (as in cli_flags) after TRAIN_ARGS, so they override them."""
    data_flags = cli_flags(
        train_file=data["train"],
        validation_file=data["validation"],
        validation_is_public=True,
        model_name_or_path=model,
    )
    script = ["-m", "scripts.sharded_memory", "worker", *data_flags, *TRAIN_ARGS, *cli_flags(**options, output_dir=out)]
    return torchrun_command(processes, *script, "--fsdp") if fsdp else [sys.executable, *script]


def worker_env(reports, threads, **extra):
    """The environment of a worker run: its reports to the folder `reports`, `threads` OpenMP threads, offline."""
    offline = dict(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    # the measurement's random data set keeps its own privacy ledger, beside its runs
    ledger = dict(DP_LEDGER_DIR=os.path.join(os.path.dirname(os.path.abspath(reports)), "ledger"))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), SHARDED_MEMORY_REPORT=reports, **offline, **ledger)
    return {**env, **extra}


def launch(model, data, out, processes, fsdp, threads, extra_env=None):
    """One run of train_clm through the worker; returns the per-rank reports."""
    reports = out + "_reports"
    per_device = LOGICAL_BATCH // max(processes, 1)
    cmd = worker_command(model, data, out, processes, fsdp, per_device_train_batch_size=per_device)
    env = worker_env(reports, threads, **(extra_env or {}))
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env)
    found = sorted(os.listdir(reports))
    if len(found) != max(processes, 1):
        raise RuntimeError(f"{len(found)} reports from {processes} processes")
    return [json.load(open(os.path.join(reports, name))) for name in found]


def adapter_difference(a_dir, b_dir):
    from safetensors.torch import load_file

    a = load_file(os.path.join(a_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(b_dir, "adapter_model.safetensors"))
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    return float((num / sum((b[k].double() ** 2).sum() for k in b)).sqrt())


def predictions(model, fixed_bytes):
    from transformers import AutoConfig

    from utils.model.memory_model import predict, shape_of

    shape = shape_of(AutoConfig.from_pretrained(model))
    options = dict(PREDICT_OPTIONS, fixed_bytes=fixed_bytes)
    return {
        label: predict(shape, n, fsdp=fsdp, **{**options, "micro_batch": LOGICAL_BATCH // n})
        for label, _, n, fsdp, _ in RUNS
    }


def measure(args):
    work = args.work_dir or tempfile.mkdtemp(prefix="sharded_memory_")
    os.makedirs(work, exist_ok=True)
    data = write_data(work)
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {}
    tiny = build_tiny_model(os.path.join(work, "tiny"))
    baseline = launch(tiny, data, os.path.join(work, "fixed"), 1, False, 2, env)[0]["peak_rss_bytes"]
    runs = {
        label: launch(args.model, data, os.path.join(work, folder), n, fsdp, threads, env)
        for label, folder, n, fsdp, threads in RUNS
    }
    fixed = baseline - predict_tiny_model(tiny)
    predicted = predictions(args.model, fixed)
    whole = max(r["peak_rss_bytes"] for r in runs["whole, 1 process"])
    result = {
        "model": args.model,
        "fixed_bytes": fixed,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "runs": {},
    }
    for label, folder, *_ in RUNS:
        reports = runs[label]
        peak = max(r["peak_rss_bytes"] for r in reports)
        result["runs"][label] = {
            "peak_rss_gib_per_process": [round(r["peak_rss_bytes"] / 2**30, 3) for r in reports],
            "peak_rss_gib_through_loading": [
                round(r["peak_rss_after_loading_bytes"] / 2**30, 3)
                for r in reports
                if "peak_rss_after_loading_bytes" in r
            ],
            "bytes_read_per_process": [r.get("bytes_read") for r in reports],
            "over_whole_run": round(peak / whole, 3),
            "predicted_gib": round(predicted[label]["total"] / 2**30, 3),
            "predicted_over_measured": round(predicted[label]["total"] / peak, 3),
            "adapter_relative_difference_vs_whole": adapter_difference(
                os.path.join(work, folder), os.path.join(work, "whole")
            ),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


def predict_tiny_model(folder):
    """The model-dependent part of the tiny model's run (well under 1 MB), subtracted from its peak
    to leave the fixed cost."""
    from transformers import AutoConfig

    from utils.model.memory_model import predict, shape_of

    shape = shape_of(AutoConfig.from_pretrained(folder))
    return predict(shape, 1, fsdp=False, **PREDICT_OPTIONS)["total"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # train_clm.py's own arguments follow
        return worker(argv[1:])
    args = parse_args(argv)
    if args.command == "build":
        build_random_llama(args.output, layers=args.layers, dtype=getattr(torch, args.dtype))
        print(f"saved {args.output}")
    else:
        measure(args)


if __name__ == "__main__":
    run_cli(main)
