"""Demo: DP LoRA fine-tuning of a real small LLM on real PubMed abstracts, on a CPU, offline.

    python -m scripts.demo                        # about 7 minutes on 2 CPU cores
    python -m scripts.demo --compare_nonprivate   # also non-private LoRA, same data and steps (+4 minutes)

Every stage is a real command of this repository, printed before it runs:

  1. build data/pubmed_dataset and models/SmolLM2-135M-Instruct if absent
     (scripts/prepare_pubmed.py, scripts/prepare_model.py);
  2. write the training set (default: the whole train split) and a validation subset (JSON Lines,
     prompt "Abstract:") into --output_dir (git-ignored outputs/demo by default: PubMed text is
     never committed);
  3. validation perplexity of the base model: train_clm.py --max_train_steps 0 (LoRA B starts at
     zero, so the initial adapter is the base model);
  4. DP LoRA training at --target_epsilon (train_clm.py), which evaluates the same validation subset;
  5. (--compare_nonprivate) the same data and steps without clipping or noise, at the non-private
     learning rate and momentum (clean gradients want a smaller step);
  6. a few synthetic abstracts from the DP adapter (inference_generation_dataset.py);
  7. a summary (summary.txt, summary.json) and a plot of training loss and epsilon (training.png).
"""

import argparse
import json
import math
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import time

from scripts.prepare_model import is_complete, smollm2_dir
from utils.cli import DefaultsHelpFormatter, UserInputError, run_cli
from utils.data_utils import DEFAULT_PUBMED_DIR as DEFAULT_DATASET_DIR
from utils.data_utils import PUBMED_PROMPT as PROMPT
from utils.io_utils import write_json, write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "outputs", "demo"))
    p.add_argument("--target_epsilon", type=float, default=8.0)
    p.add_argument(
        "--privacy_unit",
        choices=["record", "author"],
        default="record",
        help="what epsilon protects: one abstract, or one first author with all their abstracts",
    )
    p.add_argument(
        "--max_records_per_unit", type=int, default=4, help="with --privacy_unit author: abstracts per author and step"
    )
    p.add_argument("--delta", type=float, default=None, help="default: min(1e-5, 1 / (10 x privacy units))")
    p.add_argument(
        "--train_records",
        type=int,
        default=None,
        help="training set size N, default: the whole train split (the privacy unit is one abstract; "
        "q = batch_size / N)",
    )
    p.add_argument("--val_records", type=int, default=256, help="validation subset for perplexity")
    p.add_argument("--steps", type=int, default=7, help="DP-SGD steps (logical batches)")
    p.add_argument("--batch_size", type=int, default=128, help="expected logical batch size B (Poisson sampling)")
    p.add_argument("--micro_batch_size", type=int, default=16, help="records per forward/backward pass")
    p.add_argument("--block_size", type=int, default=64, help="tokens per abstract (longer ones are truncated)")
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_target_modules", default="q_proj,v_proj")
    p.add_argument("--lora_freeze_a", action="store_true", help="train B only (FFA-LoRA); see train_clm.py")
    p.add_argument("--learning_rate", type=float, default=3e-2, help="chosen by scripts/recipe_sweep.py")
    p.add_argument("--lr_scheduler_type", default="linear", help="any transformers scheduler")
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument(
        "--adam_beta1",
        type=float,
        default=0.0,
        help="AdamW's momentum: off, so each of the few steps' noise reaches the adapter once "
        "(scripts/recipe_sweep.py)",
    )
    p.add_argument("--clip_norm", type=float, default=1.0)
    p.add_argument(
        "--nonprivate_learning_rate",
        type=float,
        default=1e-2,
        help="the non-private run's: clean gradients want a smaller step than noisy ones",
    )
    p.add_argument(
        "--nonprivate_adam_beta1",
        type=float,
        default=0.9,
        help="the non-private run's momentum (without noise, no momentum at 3e-2 diverges)",
    )
    p.add_argument(
        "--compare_nonprivate",
        action="store_true",
        help="also train non-private LoRA with the same data and steps (adds the training time again)",
    )
    p.add_argument("--num_samples", type=int, default=4, help="synthetic abstracts to generate")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument(
        "--seed", type=int, default=0, help="subset choice, adapter initialisation and sampling of generations"
    )
    p.add_argument("--model_name_or_path", default=None, help="default: models/SmolLM2-135M-Instruct (built if absent)")
    p.add_argument("--dataset_dir", default=None, help="default: data/pubmed_dataset (built if absent)")
    add_evaluate_args(p)
    args = p.parse_args(argv)
    args.compare_nonprivate = args.compare_nonprivate or args.evaluate  # --evaluate measures both adapters
    if args.batch_size % args.micro_batch_size:
        p.error(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size {args.micro_batch_size}")
    for name in (
        "train_records",
        "val_records",
        "steps",
        "num_samples",
        "eval_records",
        "eval_batch_size",
        "eval_seeds",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


# ---- --evaluate: synthetic sets from three models, measured by scripts/evaluate_synthetic.py -----

EVAL_SETS = ("base", "dp", "nonprivate")


def add_evaluate_args(p):
    g = p.add_argument_group("synthetic data evaluation")
    g.add_argument(
        "--evaluate",
        action="store_true",
        help="also train the non-private adapter, generate --eval_records abstracts each from the base "
        "model, the DP and the non-private adapter, and measure them (scripts/evaluate_synthetic.py)",
    )
    g.add_argument("--eval_records", type=int, default=512, help="synthetic abstracts per model")
    g.add_argument("--eval_batch_size", type=int, default=32, help="prompts per generate() call")
    g.add_argument("--eval_seeds", type=int, default=3, help="downstream trainings and MAUVE quantisations per set")


def evaluation_commands(args, model, paths, runs, dataset_dir, out):
    """(stage, command): one generation per model, then the evaluation. Texts are cut to --block_size
    tokens: the adapters learnt the first block_size tokens of an abstract and nothing beyond."""
    sets, commands = {}, []
    for label in EVAL_SETS:
        folder = os.path.join(out, "synthetic", label)
        cmd = [
            sys.executable,
            "inference_generation_dataset.py",
            "--model_name_or_path",
            model,
            "--validation_file",
            paths["validation"],
            "--prompts_are_public",  # the public "Abstract:"
            "--num_samples",
            str(args.eval_records),
            "--batch_size",
            str(args.eval_batch_size),
            "--max_new_tokens",
            str(args.block_size),
            "--seed",
            str(args.seed),
            "--output_dir",
            folder,
        ]
        if label != "base":
            cmd += ["--lora_weights_path", runs[label], "--merge_lora"]
        commands.append((f"generation: {label}", cmd))
        sets[label] = os.path.join(folder, "generations.jsonl")
    commands.append(
        (
            "evaluation",
            [
                sys.executable,
                "-m",
                "scripts.evaluate_synthetic",
                *[f"--synthetic={k}={v}" for k, v in sets.items()],
                "--model_name_or_path",
                model,
                "--train_file",
                paths["train"],
                "--dataset_dir",
                dataset_dir,
                "--max_tokens",
                str(args.block_size),
                "--seeds",
                str(args.eval_seeds),
                "--seed",
                str(args.seed),
                "--output_dir",
                os.path.join(out, "evaluation"),
            ],
        )
    )
    return commands


def run_evaluation(args, stages, model, paths, runs, dataset_dir, out):
    """Generate and measure; returns synthetic_report.json's content."""
    # generations of an earlier demo run would be reused as complete: they came from other adapters
    shutil.rmtree(os.path.join(out, "synthetic"), ignore_errors=True)
    env = stages.env
    for stage, cmd in evaluation_commands(args, model, paths, runs, dataset_dir, out):
        # decoding multiplies small matrices: a second OpenMP thread gains up to 1.5x on idle cores and
        # costs up to 25x when another process holds one (docs/performance.md, generation speed)
        stages.env = {"OMP_NUM_THREADS": "1", **env} if stage.startswith("generation") else env
        stages.run(stage, cmd)
    stages.env = env
    spent = {k: v[0] for k, v in stages.times.items() if k.startswith(("generation:", "evaluation"))}
    print("\ntime        " + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items()), flush=True)
    return read_json(os.path.join(out, "evaluation", "synthetic_report.json"))


class Stages:
    """Runs commands, printing each first, and keeps the wall and CPU time of every stage."""

    def __init__(self):
        self.times = {}
        self.env = dict(os.environ)
        for key, value in (
            ("HF_HUB_OFFLINE", "1"),
            ("TOKENIZERS_PARALLELISM", "false"),
            ("WANDB_MODE", "offline"),
            ("PYTHONUNBUFFERED", "1"),
        ):
            self.env.setdefault(key, value)

    def run(self, stage, cmd):
        shown = ["python"] + [_short(c) for c in cmd[1:]]
        print(f"\n=== {stage}\n$ {shlex.join(shown)}", flush=True)
        start, cpu = time.time(), _children_cpu()
        code = subprocess.call([sys.executable] + cmd[1:], cwd=REPO_ROOT, env=self.env)
        self.add(stage, time.time() - start, _children_cpu() - cpu)
        if code != 0:
            raise UserInputError(f"stage '{stage}' failed (exit status {code}); command: {shlex.join(shown)}")

    def add(self, stage, wall, cpu=0.0):
        old = self.times.get(stage, (0.0, 0.0))
        self.times[stage] = (old[0] + wall, old[1] + cpu)


def _short(path):
    """A path inside the repository, relative to it (commands are run from the repository root)."""
    if os.path.isabs(path) and path.startswith(REPO_ROOT + os.sep):
        return os.path.relpath(path, REPO_ROOT)
    return path


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_subsets(dataset_dir, folder, train_records, val_records, seed, by_author=False):
    """The first N (default: all) of a seeded shuffle of the train split, the first M of the validation split's.

    Records keep the data set's first author (when it has that column). With by_author, validation
    abstracts whose first author also has training abstracts are left out: published validation
    metrics must share no privacy unit with the training data. Returns the two files' paths, the
    number of training records and of their distinct first authors (console figures: an
    author-level release publishes only the latter)."""
    import datasets

    dd = datasets.load_from_disk(dataset_dir)
    os.makedirs(folder, exist_ok=True)
    paths, counts, training_authors = {}, {}, set()
    for split, count in (("train", train_records), ("validation", val_records)):
        if split not in dd:
            raise UserInputError(f"{dataset_dir} has no '{split}' split")
        order = list(range(len(dd[split])))
        random.Random(seed).shuffle(order)
        has_author = "author" in dd[split].column_names
        if split == "validation" and by_author and has_author:
            authors = dd[split]["author"]
            order = [i for i in order if authors[i] not in training_authors]
        count = len(order) if count is None else count
        if len(order) < count:
            what = " whose first author has no training abstract" if split == "validation" and by_author else ""
            flag = "train" if split == "train" else "val"
            raise UserInputError(
                f"demo: --{flag}_records {count}: the {split} split has only {len(order)} records{what}"
            )
        rows = dd[split].select(order[:count])
        authors = rows["author"] if has_author else [None] * count
        if split == "train":
            training_authors = set(authors)
        paths[split] = os.path.join(folder, f"{split}.jsonl")
        records = (
            {"instruction": PROMPT, "answer": text, **({"author": author} if author else {})}
            for text, author in zip(rows["text"], authors)
        )
        write_text(paths[split], "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        print(f"wrote {count} {split} records to {_short(paths[split])}")
        counts[split] = count
    return paths, counts["train"], len(training_authors)


def nonprivate_setting(args):
    """The non-private reference trains at the setting that suits clean gradients, so the share of its
    gain that DP keeps is not raised by a weak reference (docs/demo.md, Utility)."""
    return argparse.Namespace(
        **{**vars(args), "learning_rate": args.nonprivate_learning_rate, "adam_beta1": args.nonprivate_adam_beta1}
    )


def train_command(args, model, paths, out, private, steps):
    cmd = [
        sys.executable,
        "train_clm.py",
        "--model_name_or_path",
        model,
        "--train_file",
        paths["train"],
        "--validation_file",
        paths["validation"],
        "--output_dir",
        out,
        "--block_size",
        str(args.block_size),
        "--per_device_train_batch_size",
        str(args.micro_batch_size),
        "--gradient_accumulation_steps",
        str(args.batch_size // args.micro_batch_size),
        "--per_device_eval_batch_size",
        "16",
        "--lora_r",
        str(args.lora_r),
        "--lora_alpha",
        str(2 * args.lora_r),
        "--lora_target_modules",
        args.lora_target_modules,
        "--learning_rate",
        str(args.learning_rate),
        "--lr_scheduler_type",
        args.lr_scheduler_type,
        "--adam_epsilon",
        repr(args.adam_epsilon),
        "--adam_beta1",
        repr(args.adam_beta1),
        "--max_train_steps",
        str(steps),
        "--seed",
        str(args.seed),
        *(["--lora_freeze_a"] if args.lora_freeze_a else []),
        # PubMed abstracts are public: the demo only treats the training split as private
        "--validation_is_public",
        "--ledger_dir",
        ledger_dir(out),
    ]
    if private:
        cmd += [
            "--clip_norm",
            str(args.clip_norm),
            "--target_epsilon",
            f"{args.target_epsilon:g}",
            "--delta",
            f"{args.delta:g}",
        ]
        if args.privacy_unit == "author":  # the batch arguments then count authors
            cmd += ["--privacy_unit_key", "author", "--max_records_per_unit", str(args.max_records_per_unit)]
    else:
        cmd += ["--clip_norm", "-1", "--noise_multiplier", "-1"]
    return cmd


def ledger_dir(run_folder):
    """The demo's own privacy ledger, beside its runs (outputs/demo/ledger)."""
    return os.path.join(os.path.dirname(run_folder), "ledger")


def adapter_size(folder):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def plot(path, dp_log, report, base_loss, dp_loss, nonprivate=None):
    """Training loss (DP, and non-private if run) and epsilon spent against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from utils.privacy.accounting import compute_epsilon

    fig, (ax_loss, ax_eps) = plt.subplots(1, 2, figsize=(11, 4.8))
    steps = [r["step"] for r in dp_log]
    # the DP run's logged loss is its private estimate (clipped, noised, covered by epsilon)
    ax_loss.plot(
        steps,
        [r["train_loss"] for r in dp_log],
        "o-",
        color="C0",
        ms=3,
        label=f"DP LoRA, training loss (private estimate, eps {report['epsilon']:.2g})",
    )
    if nonprivate:
        np_log, np_loss = nonprivate
        ax_loss.plot(
            [r["step"] for r in np_log],
            [r["train_loss"] for r in np_log],
            "s-",
            color="C1",
            ms=3,
            label="non-private LoRA, training batch (exact)",
        )
        ax_loss.plot([steps[-1]], [np_loss], "D", color="C1", ms=8, label="non-private LoRA, validation")
    ax_loss.plot([0], [base_loss], "*", color="k", ms=12, label="base model, validation")
    ax_loss.plot([steps[-1]], [dp_loss], "D", color="C0", ms=8, label="DP LoRA, validation")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.set_title("Training loss")
    # below the axes: inside, it would hide the validation markers at the last step
    ax_loss.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax_loss.grid(alpha=0.3)

    sigma, q, delta = report["effective_noise_multiplier"], report["sampling_rate"], report["delta"]
    eps_steps = list(range(1, report["steps"] + 1))
    ax_eps.plot(
        [0] + eps_steps,
        [0.0] + [compute_epsilon(sigma, q, t, delta) for t in eps_steps],
        "o-",
        ms=3,
        color="C2",
        label=f"epsilon spent (delta {delta:.0e})",
    )
    if report.get("target_epsilon"):
        ax_eps.axhline(report["target_epsilon"], color="C3", ls="--", label=f"target {report['target_epsilon']:g}")
    ax_eps.set_xlabel("step")
    ax_eps.set_ylabel("epsilon")
    ax_eps.set_title(f"Privacy spent\n(effective sigma {sigma:.3g}, q {q:.2g}, PLD accountant)")
    ax_eps.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax_eps.grid(alpha=0.3)
    for ax in (ax_loss, ax_eps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ledger_text(epsilon):
    return "no guarantee" if epsilon is None else f"epsilon {epsilon:.3g}"


def units_text(s):
    """The training set as the release may describe it: its privacy units (an author-level release
    publishes how many authors, never how many abstracts)."""
    if s["privacy_unit"] == "author":
        return f"abstracts of {s['num_units']} first authors (the privacy unit)"
    return f"{s['num_units']} training"


def summary_text(s):
    lines = [
        "==================== DP fine-tuning demo: summary ====================",
        f"model       {s['model']} + LoRA r={s['lora_r']} on {s['lora_target_modules']} "
        f"({s['trainable_parameters']:,} trainable parameters)",
        f"data        {units_text(s)} / {s['val_records']} validation PubMed abstracts "
        f'(prompt "{PROMPT}", {s["block_size"]} tokens max)',
        f"privacy     epsilon {s['epsilon']:.3g} (replace-one {s['epsilon_replace_one']:.3g}) "
        f"at delta {s['delta']:.0e} ({s['sampling']} sampling, PLD accountant)",
        f"ledger      {ledger_text(s['ledger_epsilon'])} over every run of this demo on these abstracts so far "
        f"({s['ledger_steps']} steps; {s['ledger_dir']})",
        f"            noise multiplier {s['noise_multiplier']:.3g} (gradient), "
        f"{s['loss_noise_multiplier']:.3g} (training loss), {s['effective_noise_multiplier']:.3g} (effective), "
        f"clip norm {s['clip_norm']:g}, "
        f"sampling rate {s['sampling_rate']:.3g}, expected batch {s['expected_batch_size']}, {s['steps']} steps",
        f"optimiser   AdamW, learning rate {s['learning_rate']:g} ({s['lr_scheduler_type']}), "
        f"momentum (beta1) {s['adam_beta1']:g}",
        f"perplexity  base model {s['perplexity_base']:.2f} -> DP LoRA {s['perplexity_dp']:.2f} "
        f"(validation, {s['val_records']} abstracts)",
    ]
    if s.get("perplexity_nonprivate") is not None:
        lines.append(
            f"            non-private LoRA, same data and steps: {s['perplexity_nonprivate']:.2f} "
            f"(learning rate {s['nonprivate_learning_rate']:g}, momentum {s['nonprivate_adam_beta1']:g})"
        )
    lines.append(
        "time        "
        + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in s["time"].items())
        + f"; total {s['total_wall_s'] / 60:.1f} min"
    )
    lines.append(f"plot        {s['plot']}")
    lines.append(
        f"synthetic abstracts from the DP adapter (temperature 1, top-k 50, {s['max_new_tokens']} new tokens max):"
    )
    for i, text in enumerate(s["samples"], 1):
        lines.append(f"  [{i}] {PROMPT} {' '.join(text.split())}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    start, stages = time.time(), Stages()
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    dataset_dir, model = prepare_data_and_model(args, stages)
    paths, units = prepare_subsets(args, stages, dataset_dir, out)
    runs = fresh_run_folders(out)
    run_trainings(args, stages, model, paths, runs)
    stages.run("generation", generation_command(args, model, paths, runs))
    summary = summarise(args, stages, model, runs, units, out, start)
    publish_summary(out, summary)
    if args.evaluate:
        summary["evaluation"] = run_evaluation(args, stages, model, paths, runs, dataset_dir, out)
    return summary


def prepare_data_and_model(args, stages):
    """1. The data set and the model, each built only when absent; returns their paths."""
    dataset_dir = os.path.abspath(args.dataset_dir or DEFAULT_DATASET_DIR)
    if not os.path.isfile(os.path.join(dataset_dir, "dataset_dict.json")):
        if args.dataset_dir:
            raise UserInputError(f"--dataset_dir {args.dataset_dir}: no built data set there")
        stages.run("prepare data", [sys.executable, "-m", "scripts.prepare_pubmed"])
    model = args.model_name_or_path or smollm2_dir()
    if args.model_name_or_path is None and not is_complete(model):
        stages.run("prepare model", [sys.executable, "-m", "scripts.prepare_model"])
    return dataset_dir, model


def prepare_subsets(args, stages, dataset_dir, out):
    """2. The training and validation files; sets the default delta from the number of privacy
    units. Returns the files' paths and that number."""
    t = time.time()
    print(
        f"\n=== subsets: {args.train_records or 'all'} training and {args.val_records} validation abstracts", flush=True
    )
    by_author = args.privacy_unit == "author"
    paths, records, authors = write_subsets(
        dataset_dir, os.path.join(out, "data"), args.train_records, args.val_records, args.seed, by_author
    )
    units = authors if by_author else records
    if args.delta is None:
        args.delta = min(1e-5, 1 / (10 * units))
    stages.add("subsets", time.time() - t)
    return paths, units


def fresh_run_folders(out):
    """The runs' folders (base, dp, nonprivate, samples), emptied."""
    runs = {name: os.path.join(out, name) for name in ("base", "dp", "nonprivate", "samples")}
    # this demo's own outputs of an earlier run, and its ledger: each demo plays a first run on the
    # abstracts (a real data set keeps its ledger for ever; deleting it forgets what was spent)
    for folder in [*runs.values(), *(f"{run}.work" for run in runs.values()), ledger_dir(runs["dp"])]:
        shutil.rmtree(folder, ignore_errors=True)
    return runs


def run_trainings(args, stages, model, paths, runs):
    """3.-5. Base perplexity (no step: LoRA B starts at zero), DP training, non-private training."""
    stages.run("base model perplexity", train_command(args, model, paths, runs["base"], False, 0))
    stages.run("DP training", train_command(args, model, paths, runs["dp"], True, args.steps))
    if args.compare_nonprivate:
        reference = train_command(nonprivate_setting(args), model, paths, runs["nonprivate"], False, args.steps)
        stages.run("non-private training", reference)


def generation_command(args, model, paths, runs):
    """6. A few synthetic abstracts from the DP adapter."""
    return [
        sys.executable,
        "inference_generation_dataset.py",
        "--model_name_or_path",
        model,
        # the prompts are the fixed public string "Abstract:", copied into the released generations
        "--lora_weights_path",
        runs["dp"],
        "--validation_file",
        paths["validation"],
        "--prompts_are_public",
        "--num_samples",
        str(args.num_samples),
        "--batch_size",
        str(args.num_samples),
        "--max_new_tokens",
        str(args.max_new_tokens),
        "--seed",
        str(args.seed),
        "--output_dir",
        runs["samples"],
    ]


REPORT_KEYS = (
    "epsilon",
    "epsilon_replace_one",
    "delta",
    "noise_multiplier",
    "loss_noise_multiplier",
    "effective_noise_multiplier",
    "clip_norm",
    "sampling",
    "sampling_rate",
    "expected_batch_size",
    "steps",
    "accountant",
    "ledger_epsilon",
    "ledger_steps",
)


def run_outputs(args, runs):
    """What the runs wrote: all_results.json of each training run (non-private: None unless run), the
    training logs of the trained ones, the DP run's privacy report, the synthetic abstracts."""
    trained = ("base", "dp", "nonprivate") if args.compare_nonprivate else ("base", "dp")
    results = {name: read_json(os.path.join(runs[name], "all_results.json")) for name in trained}
    results.setdefault("nonprivate", None)
    logs = {name: read_json(os.path.join(runs[name], "training_log.json")) for name in trained if name != "base"}
    report = read_json(os.path.join(runs["dp"], "privacy_report.json"))
    with open(os.path.join(runs["samples"], "generations.jsonl")) as f:
        samples = [json.loads(line)["answer"] for line in f if line.strip()]
    return results, logs, report, samples


def summarise(args, stages, model, runs, units, out, start):
    """7. The plot (training.png) and the summary's figures."""
    t = time.time()
    results, logs, report, samples = run_outputs(args, runs)
    base, dp, nonprivate = results["base"], results["dp"], results["nonprivate"]
    plot_path = os.path.join(out, "training.png")
    nonprivate_curve = None if nonprivate is None else (logs["nonprivate"], nonprivate["eval_loss"])
    plot(plot_path, logs["dp"], report, base["eval_loss"], dp["eval_loss"], nonprivate_curve)
    stages.add("summary and plot", time.time() - t)
    return {
        "model": _short(model),
        "lora_r": args.lora_r,
        "lora_target_modules": args.lora_target_modules,
        "trainable_parameters": adapter_size(runs["dp"]),
        "val_records": args.val_records,
        "block_size": args.block_size,
        "privacy_unit": args.privacy_unit,
        "num_units": units,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": args.lr_scheduler_type,
        "adam_beta1": args.adam_beta1,
        **{k: report[k] for k in REPORT_KEYS},
        "ledger_dir": _short(ledger_dir(runs["dp"])),
        "perplexity_base": base["eval_perplexity"],
        "perplexity_dp": dp["eval_perplexity"],
        "perplexity_nonprivate": None if nonprivate is None else nonprivate["eval_perplexity"],
        "eval_loss_base": base["eval_loss"],
        "eval_loss_dp": dp["eval_loss"],
        "eval_loss_nonprivate": None if nonprivate is None else nonprivate["eval_loss"],
        "nonprivate_learning_rate": None if nonprivate is None else args.nonprivate_learning_rate,
        "nonprivate_adam_beta1": None if nonprivate is None else args.nonprivate_adam_beta1,
        "time": {k: {"wall_s": round(w, 1), "cpu_s": round(c, 1)} for k, (w, c) in stages.times.items()},
        "total_wall_s": round(time.time() - start, 1),
        "plot": _short(plot_path),
        "max_new_tokens": args.max_new_tokens,
        "samples": samples,
    }


def publish_summary(out, summary):
    """summary.json, summary.txt, and the summary's text on the console."""
    text = summary_text(summary)
    write_json(os.path.join(out, "summary.json"), summary)
    write_text(os.path.join(out, "summary.txt"), text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    run_cli(main)
