"""Time one full training step (forward, backward, per-example work, optimizer step) of LoRA
fine-tuning: non-private, this project's DP step, and Opacus 1.6 (`hooks`, `ghost`) as a peer.

    python scripts/benchmark.py --preset cpu-small
    python scripts/benchmark.py --preset cpu-medium --json out.json
    python scripts/benchmark.py --preset smollm2              # needs: python scripts/prepare_model.py
    python scripts/benchmark.py --preset gpu-7b --layers 8    # on a GPU machine

Every variant runs on the same PEFT LoRA model (same adapter, same frozen base weights), the same
micro-batch and the same loss: the sum over records of each record's mean token loss
(utils.dp_utils.per_record_loss), so each record's gradient is exactly its own. The variants are
interleaved round by round (the order rotates every round) after a warm-up, so machine drift hits
them alike; each reported time is the median over rounds. Before each timed step the variant is
installed on the model (ours: DPGradient's layer forwards; Opacus: its GradSampleModule hooks)
and removed after it, untimed, so no variant pays for another's hooks.

Peak memory: on GPU, torch.cuda.max_memory_allocated during a step minus the memory allocated
before it (max over rounds). On CPU there is no allocator statistic, so each variant runs in a
fresh subprocess: the peak resident set (VmHWM, reset through /proc/self/clear_refs) during its
first two steps, minus the resident set before them (model, data and variant built).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.dp_utils import DPGradient, DPRandomness, per_record_loss  # noqa: E402
from utils.lora_utils import add_lora  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(REPO_ROOT, "models", "SmolLM2-135M-Instruct")

# vocab, hidden, intermediate, layers, heads, kv heads
PRESETS = {
    "cpu-small": dict(config=(2048, 128, 256, 2, 4, 2), batch=8, block=128, repeats=40, warmup=5),
    "cpu-medium": dict(config=(8192, 512, 1536, 12, 8, 8), batch=8, block=128, repeats=9, warmup=2),
    "smollm2": dict(path=SMOLLM2, batch=8, block=128, repeats=7, warmup=1),
    "gpu-7b": dict(config=(32000, 4096, 11008, 32, 32, 32), batch=8, block=512, repeats=10, warmup=3,
                   device="cuda", dtype="bfloat16"),
}
VARIANTS = ("nonprivate", "dp", "opacus_hooks", "opacus_ghost")
CLIP_NORM, SIGMA, LR = 1.0, 1.0, 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--repeats", type=int, help="timed rounds (default: per preset)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default: per preset)")
    p.add_argument("--batch_size", type=int, help="records per micro-batch (default: per preset)")
    p.add_argument("--block_size", type=int, help="tokens per record (default: per preset)")
    p.add_argument("--layers", type=int, help="override the number of decoder layers (random presets)")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list out of {','.join(VARIANTS)}")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--check", action="store_true",
                   help="first check that every DP variant hands the optimizer the same gradient (no noise)")
    p.add_argument("--device", help="override the preset's device (e.g. cpu for a tiny gpu-7b --layers run)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--memory_child", help=argparse.SUPPRESS)  # internal: measure one variant's memory
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("repeats", "warmup", "batch_size", "block_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[{"batch_size": "batch", "block_size": "block"}.get(key, key)])
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or "nonprivate" not in args.variants or "dp" not in args.variants:
        p.error(f"--variants: must include nonprivate and dp, out of {VARIANTS} (got {args.variants})")
    args.device = args.device or preset.get("device", "cpu")
    args.dtype = getattr(torch, preset.get("dtype", "float32"))
    return args


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------


def build_model(args):
    """PEFT LoRA (r, alpha=r, q/k/v/o) on a random Llama built here, or on the prepared SmolLM2."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    if "path" in preset:
        model = AutoModelForCausalLM.from_pretrained(preset["path"], dtype=args.dtype)
    else:
        vocab, hidden, inter, layers, heads, kv = preset["config"]
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                             num_hidden_layers=args.layers or layers, num_attention_heads=heads,
                             num_key_value_heads=kv, max_position_embeddings=max(args.block_size, 128),
                             tie_word_embeddings=False)
        with torch.device(args.device):
            model = LlamaForCausalLM._from_config(config, dtype=args.dtype)
    model.config.use_cache = False
    model = add_lora(model, r=args.lora_r, alpha=args.lora_r, seed=0)  # adapters float32 (PEFT upcasts)
    with torch.no_grad():  # B starts at zero; give it values so the A gradients are not all zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.to(args.device).train()
    return model


def build_batch(args, vocab_size):
    """Right-padded records of 60-100% of block_size tokens, the first 8 tokens masked as prompt."""
    gen = torch.Generator().manual_seed(1)
    n, t = args.batch_size, args.block_size
    ids = torch.randint(3, vocab_size, (n, t), generator=gen)
    lengths = torch.randint(int(0.6 * t), t + 1, (n,), generator=gen)
    positions = torch.arange(t)[None, :]
    mask = (positions < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100).masked_fill(positions < min(8, t // 4), -100)
    return {k: v.to(args.device) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def autocast(args):
    enabled = args.dtype != torch.float32
    return torch.autocast(torch.device(args.device).type, dtype=args.dtype, enabled=enabled)


def logits_of(module, batch, args):
    with autocast(args):
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ----------------------------------------------------------------------------------------------
# Variants: install (untimed), step (timed), remove (untimed)
# ----------------------------------------------------------------------------------------------


class NonPrivate:
    """Plain autograd on the same adapter and loss, then the optimizer step."""

    def __init__(self, model, args, sigma=SIGMA, lr=LR, clip=CLIP_NORM):
        self.model, self.args, self.sigma, self.clip = model, args, sigma, clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)

    def install(self):
        pass

    def gradient(self, batch, step):
        """Everything up to the optimizer: param.grad holds what the optimizer will use."""
        losses, _ = per_record_loss(logits_of(self.model, batch, self.args), batch["labels"])
        losses.sum().backward()

    def step(self, batch, step):
        self.gradient(batch, step)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def remove(self):
        pass


class Ours(NonPrivate):
    """DPGradient: per-example gradients, joint clipping, one noise draw, divide by B; optimizer step."""

    def __init__(self, model, args, **kw):
        super().__init__(model, args, **kw)
        self.randomness = DPRandomness()
        self.dp = None

    def install(self):
        self.dp = DPGradient(self.model, self.clip, self.sigma, self.args.batch_size, self.randomness)

    def gradient(self, batch, step):
        losses, _ = per_record_loss(logits_of(self.model, batch, self.args), batch["labels"])
        losses.sum().backward()
        self.dp.accumulate_micro_batch()
        self.dp.finish_step(step)

    def remove(self):
        self.dp.detach()
        self.dp = None


class OpacusHooks(NonPrivate):
    """Opacus GradSampleModule (hooks) + DPOptimizer in Opacus' usual 'mean' mode: the loss is the
    mean over the micro-batch of our per-record losses, Opacus rescales each per-sample gradient by
    the batch size and the optimizer divides (S + Z) by the expected batch size: the same gradient
    as ours (checked by --check)."""

    def __init__(self, model, args, **kw):
        from opacus.optimizers import DPOptimizer

        super().__init__(model, args, **kw)
        self.dp_opt = DPOptimizer(self.opt, noise_multiplier=self.sigma, max_grad_norm=self.clip,
                                  expected_batch_size=args.batch_size, loss_reduction="mean")
        self.gsm = None

    def install(self):
        from opacus import GradSampleModule

        self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="mean")

    def gradient(self, batch, step):
        losses, _ = per_record_loss(logits_of(self.gsm, batch, self.args), batch["labels"])
        losses.mean().backward()
        self.dp_opt.pre_step()  # clip, sum, noise, divide by B (what DPOptimizer.step does first)

    def step(self, batch, step):
        self.gradient(batch, step)
        self.opt.step()
        self.dp_opt.zero_grad(set_to_none=True)

    def remove(self):
        self.gsm._close()
        self.gsm = None


class OpacusGhost(OpacusHooks):
    """Opacus ghost clipping (GradSampleModuleFastGradientClipping): per-sample norms from a first
    backward, then a second backward of the clip-weighted loss. The criterion is a plain
    CrossEntropyLoss(ignore_index=-100) called with shape=(n, T): Opacus' 'mean' reduction then
    averages each record over its own label tokens, which is our per-record loss."""

    def __init__(self, model, args, **kw):
        from opacus.optimizers import DPOptimizerFastGradientClipping

        NonPrivate.__init__(self, model, args, **kw)
        self.dp_opt = DPOptimizerFastGradientClipping(
            self.opt, noise_multiplier=self.sigma, max_grad_norm=self.clip,
            expected_batch_size=args.batch_size, loss_reduction="mean")
        self.gsm = self.criterion = None

    def install(self):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        self.gsm = GradSampleModuleFastGradientClipping(
            self.model, batch_first=True, loss_reduction="mean", max_grad_norm=self.clip, use_ghost_clipping=True)
        criterion = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="mean")
        self.criterion = DPLossFastGradientClipping(self.gsm, self.dp_opt, criterion, loss_reduction="mean")

    def gradient(self, batch, step):
        logits = logits_of(self.gsm, batch, self.args)[:, :-1, :].float()
        labels = batch["labels"][:, 1:]
        loss = self.criterion(logits.flatten(0, 1), labels.flatten(), shape=logits.shape)
        loss.backward()  # two backward passes
        self.dp_opt.pre_step()

    def remove(self):
        self.gsm._close()
        self.gsm = self.criterion = None


CLASSES = {"nonprivate": NonPrivate, "dp": Ours, "opacus_hooks": OpacusHooks, "opacus_ghost": OpacusGhost}


def make_variants(model, args, notes):
    variants = {}
    for name in args.variants:
        try:
            variants[name] = CLASSES[name](model, args)
        except ImportError as err:
            notes.append(f"{name} skipped: opacus not importable ({err}); pip install opacus==1.6.0")
    return variants


def check_same_gradient(model, batch, args, notes):
    """One noiseless step of every DP variant (lr 0), with the clip norm at the median of our
    per-example norms so that clipping binds for half the records: max |g - ours| / max |ours|
    over the gradient each hands to its optimizer. Float-error size means the same loss, clipping and B."""
    ours = Ours(model, args, sigma=0.0, lr=0.0)
    ours.install()
    ours.gradient(batch, 0)
    clip = float(ours.dp.last_norms.median())
    ours.remove()
    model.zero_grad(set_to_none=True)
    grads = {}
    for name in [v for v in args.variants if v != "nonprivate"]:
        try:
            variant = CLASSES[name](model, args, sigma=0.0, lr=0.0, clip=clip)
            variant.install()
            variant.gradient(batch, 0)
            grads[name] = torch.cat([p.grad.detach().float().flatten() for p in variant.params])
            model.zero_grad(set_to_none=True)
            variant.remove()
        except Exception as err:  # reported by the timing loop too
            notes.append(f"check of {name} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            model.zero_grad(set_to_none=True)
    scale = grads["dp"].abs().max().item()
    return {name: (g - grads["dp"]).abs().max().item() / scale for name, g in grads.items() if name != "dp"}


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def time_variants(variants, batch, args, notes):
    """Warm-up, then interleaved rounds (rotating order); per-variant step times and GPU peaks."""
    times = {name: [] for name in variants}
    gpu_peak = {name: 0.0 for name in variants}
    names = list(variants)
    step = 0
    for rnd in range(args.warmup + args.repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            if name not in variants:
                continue  # dropped after an error
            variant = variants[name]
            try:
                variant.install()
                sync(args)
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                variant.step(batch, step)
                sync(args)
                elapsed = time.perf_counter() - start
                if args.device == "cuda":
                    gpu_peak[name] = max(gpu_peak[name], (torch.cuda.max_memory_allocated() - before) / 2**20)
                variant.remove()
            except Exception as err:  # an optional peer that fails must not sink the benchmark
                if name in ("nonprivate", "dp"):
                    raise
                notes.append(f"{name} skipped: failed with {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                del variants[name], times[name]
                try:
                    variant.remove()
                except Exception:
                    pass
                continue
            step += 1
            if rnd >= args.warmup:
                times[name].append(elapsed)
    return times, (gpu_peak if args.device == "cuda" else None)


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


MEMORY_STEPS = 3
# every allocation over 64 KiB gets its own mmap, returned to the system when freed: the resident
# set then follows the live tensors instead of what malloc keeps cached
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def memory_child(args):
    """In a fresh process: peak RSS growth over the first steps of one variant (MiB)."""
    model = build_model(args)
    batch = build_batch(args, model.config.vocab_size)
    variant = CLASSES[args.memory_child](model, args)
    variant.install()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    for step in range(MEMORY_STEPS):
        variant.step(batch, step)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"peak_growth_mb": (peak - before) / 1024, "rss_before_mb": before / 1024}))


def cpu_memory(args, names, notes, jobs=2):
    """Run the memory children, `jobs` at a time (each measures only its own process)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--batch_size", str(args.batch_size),
           "--block_size", str(args.block_size), "--lora_r", str(args.lora_r), "--device", args.device]
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    peaks, running, pending = {}, {}, list(names)
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            running[name] = subprocess.Popen(cmd + ["--memory_child", name], stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, env={**os.environ, **MEMORY_ENV})
        name = next(iter(running))
        out, err = running.pop(name).communicate()
        try:
            peaks[name] = round(json.loads(out.strip().splitlines()[-1])["peak_growth_mb"], 1)
        except (IndexError, ValueError, KeyError):
            notes.append(f"memory of {name} not measured: {(err.strip().splitlines() or ['?'])[-1][:200]}")
    return {name: peaks[name] for name in names if name in peaks}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if "path" in preset and not os.path.exists(os.path.join(preset["path"], "config.json")):
        print(f"preset {args.preset}: {preset['path']} is missing; build it with\n"
              f"    python scripts/prepare_model.py\nskipped.")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": args.preset, "skipped": "model folder missing"}, f, indent=2)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"preset {args.preset} needs a CUDA GPU; none found. skipped.")
        return 0
    if args.memory_child:
        memory_child(args)
        return 0

    notes = []
    load_before = os.getloadavg()[0]
    model = build_model(args)
    batch = build_batch(args, model.config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    check = check_same_gradient(model, batch, args, notes) if args.check else None
    variants = make_variants(model, args, notes)
    times, gpu_peak = time_variants(variants, batch, args, notes)
    med = {name: statistics.median(t) for name, t in times.items()}
    load = max(load_before, os.getloadavg()[0])
    if load > 0.5 * (os.cpu_count() or 1) or any(busy(t) for t in times.values()):
        notes.append(f"machine busy (load average {load:.1f} on {os.cpu_count()} cores, or step times spread over "
                     "1.5x between quartiles): medians are unreliable; compare the *_min_s figures or rerun idle")
    if gpu_peak is not None:
        peak_mem, mem_method = {k: round(v, 1) for k, v in gpu_peak.items() if k in med}, \
            "CUDA max_memory_allocated during a step minus allocated before it (max over rounds)"
    elif args.no_memory:
        peak_mem, mem_method = {}, "not measured (--no_memory)"
    else:
        del model, variants
        peak_mem = cpu_memory(args, list(med), notes)
        mem_method = (f"CPU: peak RSS growth (VmHWM, reset through /proc/self/clear_refs) over the first "
                      f"{MEMORY_STEPS} steps in a fresh subprocess per variant (malloc mmap threshold 64 KiB), "
                      "above the RSS with model, data and variant built")

    def ratio(a, b):
        return med[a] / med[b] if a in med and b in med else None

    result = {
        "preset": args.preset, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": args.device, "dtype": str(args.dtype).replace("torch.", ""),
        "params": n_params, "trainable_params": n_trainable, "batch_size": args.batch_size,
        "block_size": args.block_size, "lora_r": args.lora_r, "layers": args.layers,
        "repeats": args.repeats, "warmup": args.warmup,
        "nonprivate_s": med.get("nonprivate"), "dp_s": med.get("dp"),
        "dp_over_nonprivate": ratio("dp", "nonprivate"),
        "dp_over_nonprivate_paired": statistics.median(d / n for d, n in zip(times["dp"], times["nonprivate"])),
        "opacus_hooks_s": med.get("opacus_hooks"), "opacus_hooks_over_dp": ratio("opacus_hooks", "dp"),
        "opacus_ghost_s": med.get("opacus_ghost"), "opacus_ghost_over_dp": ratio("opacus_ghost", "dp"),
        "peak_mem_mb": peak_mem, "peak_mem_method": mem_method,
        "dp_peak_mem_over_nonprivate": (peak_mem["dp"] / peak_mem["nonprivate"]
                                        if peak_mem.get("dp") and peak_mem.get("nonprivate") else None),
        "check_max_rel_diff": check,
        "min_s": {k: min(v) for k, v in times.items()},
        "dp_over_nonprivate_min": min(times["dp"]) / min(times["nonprivate"]),
        "load_average": round(load, 2),
        "times_s": {k: [round(x, 5) for x in v] for k, v in times.items()}, "notes": notes,
    }
    print_table(result, med)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def busy(times):
    if len(times) < 4:
        return False
    q1, _, q3 = statistics.quantiles(times, n=4)
    return q3 > 1.5 * q1


def print_table(result, med):
    print(f"preset {result['preset']}: {result['params'] / 1e6:.2f}M params ({result['trainable_params'] / 1e6:.3f}M "
          f"LoRA r={result['lora_r']}), batch {result['batch_size']} x {result['block_size']} tokens, "
          f"{result['dtype']} on {result['device']}, torch {result['torch']}, {result['threads']} threads, "
          f"median of {result['repeats']} interleaved rounds after {result['warmup']} warm-up")
    base = med["nonprivate"]
    print(f"{'variant':<14}{'median s':>10}{'x nonprivate':>14}{'x ours':>9}{'min s':>10}{'peak MiB':>10}")
    for name in med:
        mem = result["peak_mem_mb"].get(name)
        print(f"{name:<14}{med[name]:>10.4f}{med[name] / base:>14.3f}{med[name] / med['dp']:>9.3f}"
              f"{result['min_s'][name]:>10.4f}{(f'{mem:.1f}' if mem is not None else '-'):>10}")
    print(f"dp / nonprivate: {result['dp_over_nonprivate']:.3f} (median of per-round ratios "
          f"{result['dp_over_nonprivate_paired']:.3f}, ratio of minima {result['dp_over_nonprivate_min']:.3f}; "
          f"load average {result['load_average']})")
    print(f"memory: {result['peak_mem_method']}")
    if result["check_max_rel_diff"] is not None:
        print("same gradient as ours (max rel. difference, no noise): " + ", ".join(
            f"{k} {v:.1e}" for k, v in result["check_max_rel_diff"].items()))
    for note in result["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
