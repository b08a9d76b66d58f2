"""Time one full LoRA training step (forward, backward, per-example work, optimizer step):
non-private, this project's DP step, and Opacus 1.6 (`hooks`, `ghost`) as an optional peer.

    python -m scripts.benchmark --preset cpu-small
    python -m scripts.benchmark --preset cpu-medium --json out.json
    python -m scripts.benchmark --preset smollm2              # needs: python -m scripts.prepare_model
    python -m scripts.benchmark --preset gpu-7b --layers 8    # on a GPU machine

Every variant runs on the same PEFT LoRA model (same adapter, same frozen weights), the same
micro-batch and the same per-record loss (utils.dp_utils.per_record_loss: each record's mean over
its own label tokens); `--check` verifies that the three DP variants hand their optimizer the same
clipped gradient. Rounds run every variant once, in an order that rotates every round, after
warm-up rounds; a variant's time is its median over rounds. Before its timed step a variant is
installed on the model (ours: DPGradient's layer forwards; Opacus: its GradSampleModule hooks) and
removed after it, untimed, so no variant pays for another's hooks.

Peak memory: on GPU, torch.cuda.max_memory_allocated during a step minus what was allocated before
it. On CPU (no allocator statistics; Linux /proc) each variant runs in a fresh subprocess, with
every allocation over 64 KiB mmap-ed (freed tensors leave the resident set at once): the peak
resident set (VmHWM, reset through /proc/self/clear_refs) over its first steps minus the resident
set before them (model, data and variant built), so one-time allocations such as optimizer state
count. (Measuring in the timing process after the timing was tried: malloc's cached memory made
the second variant's growth look near zero.)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from utils.cli import run_cli
from utils.dp_randomness import DPRandomness
from utils.dp_utils import DPGradient, per_record_loss
from utils.io_utils import write_json
from utils.lora_utils import add_lora
from utils.model.memory_model import Shape
from utils.tiny_models import random_llama, randomise_lora_b

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config: vocab, hidden, intermediate, layers, heads, kv heads (random Llama built in-process)
PRESETS = {
    "cpu-small": dict(config=(2048, 128, 256, 2, 4, 2), batch=8, block=128, repeats=40, warmup=5),
    "cpu-medium": dict(config=(8192, 512, 1536, 12, 8, 8), batch=8, block=128, repeats=11, warmup=2),
    "smollm2": dict(
        path=os.path.join(REPO_ROOT, "models", "SmolLM2-135M-Instruct"), batch=8, block=128, repeats=7, warmup=1
    ),
    "gpu-7b": dict(
        config=(32000, 4096, 11008, 32, 32, 32),
        batch=8,
        block=512,
        repeats=10,
        warmup=3,
        device="cuda",
        dtype="bfloat16",
    ),
}
VARIANTS = ("nonprivate", "dp", "dp_secure", "opacus_hooks", "opacus_ghost")
CLIP_NORM, SIGMA, LR = 1.0, 1.0, 1e-4
MEMORY_STEPS = 3
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--repeats", type=int, help="timed rounds (default: per preset)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default: per preset)")
    p.add_argument("--batch_size", type=int, help="records per micro-batch (default: per preset)")
    p.add_argument("--block_size", type=int, help="tokens per record (default: per preset)")
    p.add_argument("--layers", type=int, help="number of decoder layers (random-model presets)")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list; nonprivate and dp always run")
    p.add_argument("--device", help="override the preset's device (e.g. cpu for a tiny gpu-7b --layers 1 run)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="the frozen base's dtype, bfloat16 under autocast (default: per preset; LoRA stays float32)",
    )
    p.add_argument("--check", action="store_true", help="first check that the DP variants give the same gradient")
    p.add_argument("--no_memory", action="store_true", help="skip the CPU peak-memory measurement")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--memory_child", help=argparse.SUPPRESS)  # internal: measure one variant's memory
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, name in (("repeats", "repeats"), ("warmup", "warmup"), ("batch_size", "batch"), ("block_size", "block")):
        if getattr(args, key) is None:
            setattr(args, key, preset[name])
    args.variants = [v for v in VARIANTS if v in {"nonprivate", "dp", *args.variants.split(",")}]
    args.device = args.device or preset.get("device", "cpu")
    args.dtype = getattr(torch, args.dtype or preset.get("dtype", "float32"))
    return args


# ---- model and data ---------------------------------------------------------------------------


def build_model(args):
    """PEFT LoRA (r, alpha = r, on q/k/v/o) on a random Llama built here, or on the prepared SmolLM2."""
    from transformers import AutoModelForCausalLM

    preset = PRESETS[args.preset]
    if "path" in preset:
        model = AutoModelForCausalLM.from_pretrained(preset["path"], dtype=args.dtype)
    else:
        shape = Shape(*preset["config"]).llama_config()
        shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
        context = max(args.block_size, 128)
        model = random_llama(args.dtype, args.device, max_position_embeddings=context, **shape)
    model.config.use_cache = False
    model = add_lora(model, r=args.lora_r, alpha=args.lora_r, seed=0)  # adapters stay float32 (PEFT)
    return randomise_lora_b(model, std=0.02).to(args.device).train()


def build_batch(args, vocab_size):
    """Right-padded records of 60-100% of block_size tokens, the first tokens masked as a prompt."""
    gen = torch.Generator().manual_seed(1)
    n, t = args.batch_size, args.block_size
    ids = torch.randint(3, vocab_size, (n, t), generator=gen)
    lengths = torch.randint(int(0.6 * t), t + 1, (n,), generator=gen)
    positions = torch.arange(t)[None, :]
    mask = (positions < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100).masked_fill(positions < min(8, t // 4), -100)
    return {k: v.to(args.device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def logits_of(module, batch, args):
    with torch.autocast(torch.device(args.device).type, dtype=args.dtype, enabled=args.dtype != torch.float32):
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---- variants: install (untimed), step (timed), remove (untimed) --------------------------------


class NonPrivate:
    """Plain autograd on the same adapter and loss (sum of per-record losses), AdamW step."""

    def __init__(self, model, args, sigma=SIGMA, lr=LR, clip=CLIP_NORM):
        self.model, self.args, self.sigma, self.clip = model, args, sigma, clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)

    def install(self):
        pass

    def gradient(self, batch, step):
        """Everything before the optimizer: param.grad then holds what the optimizer uses."""
        losses, _ = per_record_loss(logits_of(self.model, batch, self.args), batch["labels"])
        losses.sum().backward()

    def step(self, batch, step):
        self.gradient(batch, step)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def remove(self):
        pass


class Ours(NonPrivate):
    """DPGradient: per-example gradients, joint clipping, one noise draw, (S + Z) / B; AdamW step."""

    def __init__(self, model, args, **kw):
        super().__init__(model, args, **kw)
        self.randomness, self.dp = DPRandomness(), None

    secure_noise = False

    def install(self):
        self.dp = DPGradient(
            self.model, self.clip, self.sigma, self.args.batch_size, self.randomness, secure_noise=self.secure_noise
        )

    def gradient(self, batch, step):
        losses, counts = per_record_loss(logits_of(self.model, batch, self.args), batch["labels"])
        self.dp.logical_step([(losses, counts)], step)

    def remove(self):
        self.dp.detach()


class OursSecure(Ours):
    """The same with --secure_noise: noise from os.urandom, each value a sum of four draws."""

    secure_noise = True


class OpacusHooks(NonPrivate):
    """Opacus GradSampleModule (hooks) + DPOptimizer in Opacus' usual 'mean' mode: the loss is the
    batch mean of our per-record losses, Opacus scales the per-sample gradients back by the batch
    size and divides the noisy clipped sum by the expected batch size: our gradient exactly."""

    def __init__(self, model, args, **kw):
        from opacus.optimizers import DPOptimizer

        super().__init__(model, args, **kw)
        self.dp_opt = self.wrap_optimizer(DPOptimizer)

    def wrap_optimizer(self, cls):
        """Opacus' DP optimizer around our AdamW with the same sigma, C and expected batch size."""
        return cls(
            self.opt,
            noise_multiplier=self.sigma,
            max_grad_norm=self.clip,
            expected_batch_size=self.args.batch_size,
            loss_reduction="mean",
        )

    def install(self):
        from opacus import GradSampleModule

        self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="mean")

    def gradient(self, batch, step):
        losses, _ = per_record_loss(logits_of(self.gsm, batch, self.args), batch["labels"])
        losses.mean().backward()
        self.dp_opt.pre_step()  # clip, sum, noise, divide by B: the first half of DPOptimizer.step

    def step(self, batch, step):
        self.gradient(batch, step)
        self.opt.step()
        self.dp_opt.zero_grad(set_to_none=True)

    def remove(self):
        self.gsm._close()


class OpacusGhost(OpacusHooks):
    """Opacus ghost clipping: per-sample norms from a first backward, then a second backward of the
    clip-weighted loss. A plain CrossEntropyLoss(ignore_index=-100) called with shape=(n, T, V):
    Opacus' 'mean' reduction then averages each record over its own label tokens (our loss)."""

    def __init__(self, model, args, **kw):
        from opacus.optimizers import DPOptimizerFastGradientClipping

        NonPrivate.__init__(self, model, args, **kw)
        self.dp_opt = self.wrap_optimizer(DPOptimizerFastGradientClipping)

    def install(self):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        self.gsm = GradSampleModuleFastGradientClipping(
            self.model, batch_first=True, loss_reduction="mean", max_grad_norm=self.clip, use_ghost_clipping=True
        )
        criterion = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="mean")
        self.criterion = DPLossFastGradientClipping(self.gsm, self.dp_opt, criterion, loss_reduction="mean")

    def gradient(self, batch, step):
        logits = logits_of(self.gsm, batch, self.args)[:, :-1, :].float()
        labels = batch["labels"][:, 1:]
        self.criterion(logits.flatten(0, 1), labels.flatten(), shape=logits.shape).backward()  # two passes
        self.dp_opt.pre_step()


CLASSES = {
    "nonprivate": NonPrivate,
    "dp": Ours,
    "dp_secure": OursSecure,
    "opacus_hooks": OpacusHooks,
    "opacus_ghost": OpacusGhost,
}


def note_failure(notes, what, err):
    notes.append(f"{what}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}")


def make_variants(model, args, notes):
    variants = {}
    for name in args.variants:
        try:
            variants[name] = CLASSES[name](model, args)
        except ImportError as err:
            note_failure(notes, f"{name} skipped (pip install opacus==1.6.0)", err)
    return variants


def check_same_gradient(model, batch, args, notes):
    """One noiseless step of each DP variant at lr 0, the clip norm at the median of our per-example
    norms (clipping binds for half the records): max |g - ours| / max |ours| per peer."""
    ours = Ours(model, args, sigma=0.0, lr=0.0)
    ours.install()
    ours.gradient(batch, 0)
    clip = float(ours.dp.last_norms.median())
    ours.remove()
    grads = {}
    for name in args.variants[1:]:
        try:
            variant = CLASSES[name](model, args, sigma=0.0, lr=0.0, clip=clip)
            variant.install()
            variant.gradient(batch, 0)
            grads[name] = torch.cat([p.grad.detach().float().flatten() for p in variant.params])
            variant.remove()
        except Exception as err:
            note_failure(notes, f"check of {name} failed", err)
        model.zero_grad(set_to_none=True)
    ref = grads.pop("dp")
    return {name: ((g - ref).abs().max() / ref.abs().max()).item() for name, g in grads.items()}


# ---- timing and memory ------------------------------------------------------------------------


def time_variants(variants, batch, args, notes):
    """Warm-up rounds, then timed rounds (rotating order); step times and CUDA peaks per variant."""
    cuda = args.device == "cuda"
    times, peaks, step = {name: [] for name in variants}, {name: 0.0 for name in variants}, 0
    for rnd in range(args.warmup + args.repeats):
        names = list(variants)
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            variant = variants[name]
            try:
                variant.install()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                variant.step(batch, step)
                if cuda:
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated() - before) / 2**20)
                elapsed = time.perf_counter() - start
                variant.remove()
            except Exception as err:  # an optional peer that fails must not sink the benchmark
                if name in ("nonprivate", "dp"):
                    raise
                note_failure(notes, f"{name} skipped, it failed", err)
                del variants[name], times[name], peaks[name]
                try:
                    variant.remove()  # its hooks must not stay on the model
                except Exception:
                    pass
                continue
            step += 1
            if rnd >= args.warmup:
                times[name].append(elapsed)
    return times, ({k: round(v, 1) for k, v in peaks.items()} if cuda else None)


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_peak_growth_mb(variant, batch):
    variant.install()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_kb("VmRSS")
    for step in range(MEMORY_STEPS):
        variant.step(batch, step)
    peak = _proc_status_kb("VmHWM")
    variant.remove()
    return round((peak - before) / 1024, 1)


def memory_child(args):
    """In a fresh process: peak RSS growth over the first steps of one variant (MiB), as JSON."""
    model = build_model(args)
    variant = CLASSES[args.memory_child](model, args)
    print(json.dumps({"peak_growth_mb": rss_peak_growth_mb(variant, build_batch(args, model.config.vocab_size))}))


def cpu_memory(args, names, notes, jobs=2):
    """One fresh subprocess per variant, `jobs` at a time (each measures only its own process)."""
    cmd = [
        sys.executable,
        "-m",
        "scripts.benchmark",
        "--preset",
        args.preset,
        "--batch_size",
        str(args.batch_size),
        "--block_size",
        str(args.block_size),
        "--lora_r",
        str(args.lora_r),
        "--device",
        args.device,
    ]
    cmd += (["--layers", str(args.layers)] if args.layers else []) + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    peaks, running, pending = {}, {}, list(names)
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            running[name] = subprocess.Popen(
                cmd + ["--memory_child", name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO_ROOT,
                env={**os.environ, **MEMORY_ENV},
            )
        name = next(iter(running))
        out, err = running.pop(name).communicate()
        try:
            peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_growth_mb"]
        except (IndexError, ValueError, KeyError):
            notes.append(f"memory of {name} not measured: {(err.strip().splitlines() or ['?'])[-1][:200]}")
    return {name: peaks[name] for name in names if name in peaks}


def busy_cpu_seconds():
    """CPU seconds the whole machine has spent busy (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_work_share(start, end):
    """Share of the machine's cores that other processes kept busy between two (machine, own, wall) samples."""
    if start[0] is None or end[0] is None:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, others / ((end[2] - start[2]) * (os.cpu_count() or 1)))


def spread_too_wide(times):
    if len(times) < 4:
        return False
    q1, _, q3 = statistics.quantiles(times, n=4)
    return q3 > 1.5 * q1


# ---- main -------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = skip_reason(args)
    if skip:
        print(f"preset {args.preset} skipped: {skip}")
        if args.json:
            write_json(args.json, {"preset": args.preset, "skipped": skip})
        return None
    if args.memory_child:
        memory_child(args)
        return None
    result, med = run_benchmark(args)
    print_table(result, med)
    if args.json:
        write_json(args.json, result)
    return result


def skip_reason(args):
    """Why the preset cannot run here (its model not built, no GPU), or None."""
    preset = PRESETS[args.preset]
    if "path" in preset and not os.path.exists(os.path.join(preset["path"], "config.json")):
        return f"{preset['path']} is missing; build it with: python -m scripts.prepare_model"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU; none found"
    return None


def run_benchmark(args):
    """Time every variant, then measure its peak memory; returns the result and the median times."""
    notes = []
    model = build_model(args)
    batch = build_batch(args, model.config.vocab_size)
    sizes = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad))
    check = check_same_gradient(model, batch, args, notes) if args.check else None
    variants = make_variants(model, args, notes)
    before = machine_sample()
    times, peak_mem = time_variants(variants, batch, args, notes)
    others = other_work_share(before, machine_sample())
    med = {name: statistics.median(t) for name, t in times.items()}
    if (others or 0) > 0.1 or any(spread_too_wide(t) for t in times.values()):
        notes.append(
            f"machine busy (other processes used {100 * (others or 0):.0f}% of the {os.cpu_count()} cores "
            "while timing, or step times spread over 1.5x between quartiles): medians are unreliable; "
            "compare min_s, or rerun on an idle machine"
        )
    del model, variants  # on CPU the memory is measured in fresh subprocesses, with this one's freed
    peak_mem, mem_method = peak_memory(args, peak_mem, list(med), notes)
    measured = dict(sizes=sizes, times=times, med=med, peak_mem=peak_mem, mem_method=mem_method)
    return result_record(args, **measured, check=check, others=others, notes=notes), med


def machine_sample():
    """(machine's busy CPU seconds, this process's CPU seconds, wall clock): for other_work_share."""
    return busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()


def peak_memory(args, cuda_peaks, names, notes):
    """Peak memory per variant (MiB) and how it was measured: CUDA's figures from the timing rounds,
    or on CPU one fresh subprocess per variant."""
    if cuda_peaks is not None:
        return cuda_peaks, "CUDA max_memory_allocated during a step minus allocated before it (max over rounds)"
    if args.no_memory:
        return {}, "not measured (--no_memory)"
    method = (
        f"peak RSS growth over the first {MEMORY_STEPS} steps in a fresh subprocess per variant "
        "(VmHWM reset through /proc/self/clear_refs; malloc mmap threshold 64 KiB)"
    )
    return cpu_memory(args, names, notes), method


def result_record(args, sizes, times, med, peak_mem, mem_method, check, others, notes):
    """The benchmark's result (--json), from the timing rounds and the memory figures."""

    def ratio(a, b, of=med):
        return of[a] / of[b] if a in of and b in of else None

    mins = {name: min(t) for name, t in times.items()}
    return {
        "preset": args.preset,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": str(args.dtype).replace("torch.", ""),
        "params": sizes[0],
        "trainable_params": sizes[1],
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "lora_r": args.lora_r,
        "layers": args.layers,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "nonprivate_s": med["nonprivate"],
        "dp_s": med["dp"],
        "dp_over_nonprivate": ratio("dp", "nonprivate"),
        "dp_secure_s": med.get("dp_secure"),
        "dp_secure_over_dp": ratio("dp_secure", "dp"),
        "opacus_hooks_s": med.get("opacus_hooks"),
        "opacus_hooks_over_dp": ratio("opacus_hooks", "dp"),
        "opacus_ghost_s": med.get("opacus_ghost"),
        "opacus_ghost_over_dp": ratio("opacus_ghost", "dp"),
        "dp_over_nonprivate_paired": statistics.median(d / n for d, n in zip(times["dp"], times["nonprivate"])),
        "min_s": mins,
        "dp_over_nonprivate_min": ratio("dp", "nonprivate", mins),
        "peak_mem_mb": peak_mem,
        "peak_mem_method": mem_method,
        "dp_peak_mem_over_nonprivate": ratio("dp", "nonprivate", peak_mem) if peak_mem.get("nonprivate") else None,
        "check_max_rel_diff": check,
        "other_work_cpu_share": None if others is None else round(others, 3),
        "times_s": {k: [round(x, 5) for x in v] for k, v in times.items()},
        "notes": notes,
    }


def other_work(r):
    share = r["other_work_cpu_share"]
    return "an unknown share" if share is None else f"{100 * share:.0f}%"


def print_table(r, med):
    print(
        f"preset {r['preset']}: {r['params'] / 1e6:.2f}M params ({r['trainable_params'] / 1e6:.3f}M LoRA "
        f"r={r['lora_r']}), batch {r['batch_size']} x {r['block_size']} tokens, {r['dtype']} on {r['device']}, "
        f"torch {r['torch']}, {r['threads']} threads; median of {r['repeats']} rounds after {r['warmup']} warm-up"
    )
    print(f"{'variant':<14}{'median s':>10}{'x nonprivate':>14}{'x ours':>9}{'min s':>10}{'peak MiB':>10}")
    for name, t in med.items():
        mem = r["peak_mem_mb"].get(name)
        print(
            f"{name:<14}{t:>10.4f}{t / med['nonprivate']:>14.3f}{t / med['dp']:>9.3f}{r['min_s'][name]:>10.4f}"
            f"{(f'{mem:.1f}' if mem is not None else '-'):>10}"
        )
    print(
        f"dp / nonprivate {r['dp_over_nonprivate']:.3f} (median of per-round ratios "
        f"{r['dp_over_nonprivate_paired']:.3f}, ratio of minima {r['dp_over_nonprivate_min']:.3f}); "
        f"other processes used {other_work(r)} of the CPU while timing"
    )
    print(f"memory: {r['peak_mem_method']}")
    if r["check_max_rel_diff"] is not None:
        print(
            "same gradient as ours (max rel. difference, no noise): "
            + ", ".join(f"{k} {v:.1e}" for k, v in r["check_max_rel_diff"].items())
        )
    for note in r["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    run_cli(main)
