"""GPU checks for one GPU (run by scripts/gpu_check.sh; under 10 minutes on one H100/H200 class GPU).

    python -m scripts.gpu_check --notes GPU_NOTES.md      # on a GPU machine
    python -m scripts.gpu_check --smoke                   # CPU rehearsal on tiny shapes (no notes file)

Sections (each reports PASS/FAIL and its figures; one failing does not stop the others):
  1. exactness   per-example LoRA gradients on the GPU vs one-record backward passes, bf16 autocast
                 on a bf16 base (and float32 for reference), on a 2-layer model of the 7B width;
  2. throughput  bf16 training steps of a random Llama with the Llama-2-7B shape (32 layers, hidden
                 4096, vocab 32000; --layers to shrink): tokens/s and peak memory, non-private vs DP;
  3. fsdp        the same model wrapped by utils.model.fsdp_utils.shard_frozen_base in a one-process group
                 (the function multi-GPU runs use): base weights become DTensors, LoRA weights stay
                 plain; the DP gradient of a fixed batch equals the unwrapped one; DP tokens/s;
  4. end_to_end  train_clm.py through accelerate_configs/accelerate_config.cfg (FSDP, bf16, one
                 process) vs a plain one-process bf16 run: same adapter;
  5. sharded     sharded loading: peak GPU and host memory of one process, base sharded vs whole,
                 against utils.model.memory_model (scripts/gpu_check_large.py; --large_layers layers of
                 the 7B width saved to disk);
  6. qlora       the same checkpoint in 4 bits: per-example gradient exactness with float32 LoRA,
                 DP vs non-private tokens/s (SKIPPED without bitsandbytes).
Figures go to --notes (Markdown) and to stdout.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from scripts import gpu_check_large
from scripts.gpu_check_common import Skip, lora, losses_of, make_batch, relative, sync, time_variant
from scripts.gpu_check_common import same_batch_exactness as same_batch_exactness  # re-exported (tests/test_qlora.py)
from utils import tiny_models
from utils.cli import UserInputError, cli_flags, run_cli
from utils.dist_utils import accelerate_launch_command, free_port
from utils.dp_randomness import DPRandomness
from utils.dp_utils import DPGradient
from utils.io_utils import write_text
from utils.model.fsdp_utils import shard_frozen_base, shard_summary
from utils.model.memory_model import LLAMA_2, Shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE_7B = LLAMA_2["Llama 2 7B"].llama_config()
SHAPE_SMOKE = Shape(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2).llama_config()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal on tiny shapes")
    p.add_argument("--notes", default=None, help="Markdown file for the figures (GPU_NOTES.md)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the throughput model (default 32)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 3 warm-up steps)")
    p.add_argument("--budget_s", type=float, default=480, help="skip sections that would start after this")
    p.add_argument("--sections", default="exactness,throughput,fsdp,end_to_end,sharded,qlora")
    p.add_argument(
        "--large_layers",
        type=int,
        default=None,
        help="decoder layers of the saved model of sections sharded and qlora (default 8)",
    )
    args = p.parse_args()
    if args.smoke:
        args.shape, args.device, args.block_size, args.batch_size = SHAPE_SMOKE, torch.device("cpu"), 32, 4
    else:
        if not torch.cuda.is_available():
            raise UserInputError("no CUDA GPU visible (use --smoke for the CPU rehearsal)")
        args.shape, args.device = SHAPE_7B, torch.device("cuda", 0)
        torch.cuda.set_device(0)
    args.layers = args.layers or args.shape["num_hidden_layers"]
    args.large_layers = args.large_layers or (2 if args.smoke else 8)
    return args


# ----------------------------------------------------------------------------------------------


def random_llama(shape, layers, device, dtype):
    tokens, shape = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1), {**shape, "num_hidden_layers": layers}
    return tiny_models.random_llama(dtype, device, max_position_embeddings=4096, use_cache=False, **tokens, **shape)


# ----------------------------------------------------------------------------------------------


def check_exactness(args, notes):
    """Per-example gradients vs one-record backward passes, in bf16 and in float32."""
    out = {}
    for label, base_dtype, autocast, tol in [
        ("bf16", torch.bfloat16, torch.bfloat16, 3e-2),
        ("fp32", torch.float32, None, 1e-4),
    ]:
        model = lora(random_llama(args.shape, 2, args.device, base_dtype), random_b=True)
        batch = make_batch(4, min(args.block_size, 256), args.shape["vocab_size"], args.device, ragged=True)
        dp = DPGradient(model, 1.0, 0.0, 4)
        losses_of(model, batch, autocast).sum().backward()
        ours = [dp.store.grads[p].detach().double().clone() for p in dp.params]
        assert all(dp.store.grads[p].dtype == torch.float32 for p in dp.params), "products must be float32"
        dp.store.clear()
        dp.detach()
        reference = [[] for _ in dp.params]
        for i in range(4):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            losses_of(model, one, autocast).sum().backward()
            for slot, p in zip(reference, dp.params):
                slot.append(p.grad.detach().double().clone())
        reference = [torch.stack(r) for r in reference]
        per_record = [relative([g[i] for g in ours], [r[i] for r in reference]) for i in range(4)]
        out[label] = max(per_record)
        notes.append(
            f"exactness {label}: max over 4 records of ||g_i - g_i(one record)|| / ||g_i(one record)|| "
            f"= {out[label]:.3g} (tolerance {tol:g})"
        )
        del model, dp
        if out[label] >= tol:
            raise AssertionError(f"{label} per-example gradients differ from one-record backward: {out[label]:.3g}")
    return out


def dp_gradient_of(model, batch, autocast):
    """The DP gradient (clip 1, no noise) of one fixed batch, as param.grad after finish_step."""
    dp = DPGradient(model, 1.0, 0.0, batch["input_ids"].shape[0])
    dp.logical_step([(losses_of(model, batch, autocast), None)], 0)
    grads = [p.grad.detach().double().clone() for p in dp.params]
    model.zero_grad(set_to_none=True)
    dp.detach()
    return grads


def check_throughput_and_fsdp(args, notes, results, run_fsdp):
    autocast = torch.bfloat16
    start = time.perf_counter()
    model = lora(random_llama(args.shape, args.layers, args.device, torch.bfloat16))
    sync(args.device)
    notes.append(
        f"model: random Llama, {args.layers} layers, hidden {args.shape['hidden_size']}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters in bf16, LoRA r=16 on "
        f"q,k,v,o ({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable); "
        f"built in {time.perf_counter() - start:.0f} s"
    )
    batch = make_batch(args.batch_size, args.block_size, args.shape["vocab_size"], args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    out = {}
    for label, clip, sigma in [("non-private", None, 0.0), ("DP", 1.0, 1.0)]:
        dp = DPGradient(model, clip, sigma, args.batch_size, DPRandomness(insecure_seed=0))
        out[label] = time_variant(model, dp, optimizer, batch, args, autocast, label, notes)
        dp.detach()
    out["dp_over_nonprivate_time"] = out["DP"]["step_s"] / out["non-private"]["step_s"]
    notes.append(f"throughput: DP step time / non-private step time = {out['dp_over_nonprivate_time']:.2f}")
    results["throughput"] = out
    if not run_fsdp:
        return
    # FSDP with one process: the wrapping multi-GPU runs use, on the same model
    small = make_batch(
        min(args.batch_size, 4), min(args.block_size, 128), args.shape["vocab_size"], args.device, ragged=True, seed=1
    )
    before = dp_gradient_of(model, small, autocast)
    shard_frozen_base(model, args.device)
    from torch.distributed.tensor import DTensor

    summary = shard_summary(model)
    summary["base_dtensors"] = sum(isinstance(p, DTensor) for p in model.parameters() if not p.requires_grad)
    summary["lora_dtensors"] = sum(isinstance(p, DTensor) for p in params)
    after = dp_gradient_of(model, small, autocast)
    diff = relative(after, before)
    notes.append(
        f"fsdp (1 process): {summary['base_dtensors']} of {summary['base_params']} base parameters are "
        f"FSDP DTensors, {summary['lora_dtensors']} of {summary['lora_params']} LoRA parameters; "
        f"DP gradient of a fixed batch, wrapped vs unwrapped: relative difference {diff:.3g}"
    )
    fsdp = {"summary": summary, "gradient_relative_difference": diff}
    dp = DPGradient(model, 1.0, 1.0, args.batch_size, DPRandomness(insecure_seed=0))
    fsdp["DP"] = time_variant(model, dp, optimizer, batch, args, autocast, "DP with FSDP (1 process)", notes)
    dp.detach()
    results["fsdp"] = fsdp
    if summary["base_dtensors"] != summary["base_params"] or summary["lora_dtensors"] or summary["lora_sharded"]:
        raise AssertionError(f"unexpected FSDP wrapping: {summary}")
    if diff > 1e-2:
        raise AssertionError(f"FSDP changes the DP gradient: relative difference {diff:.3g}")


def check_end_to_end(args, notes):
    """train_clm.py: the FSDP accelerate config with one process vs a plain one-process run (bf16)."""
    from safetensors.torch import load_file

    from scripts.sharded_memory import write_data
    from utils.tiny_models import build_tiny_model

    folder = tempfile.mkdtemp(prefix="gpu_check_")
    model = build_tiny_model(os.path.join(folder, "model"))
    data = write_data(folder)
    common = cli_flags(
        train_file=data["train"], validation_file=data["validation"], validation_is_public=True,
        model_name_or_path=model, block_size=64, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, clip_norm=0.5, noise_multiplier=0.7, max_train_steps=3, delta=1e-3,
        insecure_dp_seed=7, learning_rate=1e-2, lr_scheduler_type="constant",
    )  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="4", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    env["DP_LEDGER_DIR"] = os.path.join(folder, "ledger")  # its random data's own privacy ledger
    fsdp_out, plain_out = os.path.join(folder, "fsdp"), os.path.join(folder, "plain")
    train_clm = os.path.join(ROOT, "train_clm.py")
    launcher = cli_flags(num_processes=1, main_process_port=free_port())
    fsdp_config = os.path.join(ROOT, "accelerate_configs", "accelerate_config.cfg")
    runs = {
        "fsdp": accelerate_launch_command(
            fsdp_config, *launcher, train_clm, *common, *cli_flags(output_dir=fsdp_out, fsdp=True, debug_sync_check=1)
        ),
        "plain": [sys.executable, train_clm, *common, "--output_dir", plain_out],
    }
    for name, cmd in runs.items():
        start = time.perf_counter()
        result = subprocess.run(
            cmd, cwd=ROOT, env=dict(env, ACCELERATE_MIXED_PRECISION="bf16"), capture_output=True, text=True, timeout=240
        )
        if result.returncode != 0:
            raise RuntimeError(f"train_clm.py ({name}) failed:\n{result.stderr[-3000:]}")
        notes.append(f"end_to_end {name}: train_clm.py finished in {time.perf_counter() - start:.0f} s")
    a, b = (
        load_file(os.path.join(fsdp_out, "adapter_model.safetensors")),
        load_file(os.path.join(plain_out, "adapter_model.safetensors")),
    )
    keys = sorted(k for k in a if "lora_B" in k)
    diff = relative([a[k] for k in keys], [b[k] for k in keys])
    report = json.load(open(os.path.join(fsdp_out, "privacy_report.json")))
    notes.append(
        f"end_to_end: adapter update (lora_B) FSDP config vs plain run, bf16: relative difference "
        f"{diff:.3g}; privacy_report num_processes {report['num_processes']}, epsilon (if its test seed were secret) "
        f"{report['epsilon_if_seed_secret']:.3g}"
    )
    if diff > 1e-2:
        raise AssertionError(f"FSDP-config adapter differs from the plain run: {diff:.3g}")
    return {"lora_B_relative_difference": diff}


def init_one_process_group(device):
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


class Sections:
    """Runs the sections one after another: each reports PASS, FAIL or SKIPPED and its figures (one
    failing does not stop the others); the notes file is rewritten after every section."""

    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.notes, self.results, self.status, self.printed = [], {}, {}, 0
        name = torch.cuda.get_device_name(0) if args.device.type == "cuda" else "CPU (smoke rehearsal)"
        self.header = (
            f"{time.strftime('%Y-%m-%d %H:%M')} | {name} | torch {torch.__version__} | "
            f"batch {args.batch_size} x {args.block_size} tokens"
        )

    def run(self, label, fn):
        if time.perf_counter() - self.start > self.args.budget_s:
            self.status[label] = "SKIPPED (time budget)"
            return
        t0 = time.perf_counter()
        try:
            value = fn()
            if value is not None:
                self.results[label] = value
            self.status[label] = "PASS"
        except Skip as why:  # cannot run here (e.g. no bitsandbytes): not a failure
            self.status[label] = f"SKIPPED: {why}"
        except Exception as err:  # keep going: the other sections still report
            traceback.print_exc()
            self.status[label] = f"FAIL: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        finally:
            if self.args.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[{label}] {self.status[label]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for line in self.notes[self.printed :]:
            print("   ", line, flush=True)
        self.printed = len(self.notes)
        if self.args.notes:  # after every section: a run cut short still leaves its figures
            self.write_notes(time.perf_counter() - self.start)

    def finish(self):
        """Prints the verdict (and writes the notes); True when no section failed."""
        total = time.perf_counter() - self.start
        ok = all(s == "PASS" or s.startswith("SKIPPED:") for s in self.status.values())
        print(f"gpu_check: {'all passed' if ok else 'FAILURES'} in {total:.0f} s", flush=True)
        if self.args.notes:
            self.write_notes(total)
            print(f"wrote {self.args.notes}", flush=True)
        return ok

    def write_notes(self, total):
        lines = [
            "# GPU notes",
            "",
            "Written by `scripts/gpu_check.sh` (do not edit by hand; rerun it on a GPU machine).",
            "",
            f"Run: {self.header}, {total:.0f} s in all.",
            "",
            "| section | result |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v} |" for k, v in self.status.items()]
        lines += ["", "## Figures", ""] + [f"- {line}" for line in self.notes]
        lines += ["", "## Raw", "", "```json", json.dumps(self.results, indent=2, default=str), "```", ""]
        write_text(self.args.notes, "\n".join(lines))


def main():
    args = parse_args()
    chosen = args.sections.split(",")
    sections = Sections(args)
    notes, results = sections.notes, sections.results
    print(sections.header, flush=True)
    if "exactness" in chosen:
        sections.run("exactness", lambda: check_exactness(args, notes))
    if "throughput" in chosen or "fsdp" in chosen:
        with_fsdp = "fsdp" in chosen
        if with_fsdp:
            init_one_process_group(args.device)
        label = "throughput + fsdp" if with_fsdp else "throughput"
        sections.run(label, lambda: check_throughput_and_fsdp(args, notes, results, with_fsdp))
    if "sharded" in chosen:
        sections.run("sharded", lambda: gpu_check_large.check_sharded(args, notes))
    if "qlora" in chosen:
        sections.run("qlora", lambda: gpu_check_large.check_qlora(args, notes))
    if "end_to_end" in chosen:
        sections.run("end_to_end", lambda: check_end_to_end(args, notes))
    if not sections.finish():
        sys.exit(1)  # the verdict, not an error: each failing section has reported why above


if __name__ == "__main__":
    run_cli(main)
