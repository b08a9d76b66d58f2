"""Which settings carry the most utility per epsilon in the demo's budget: a sweep of DP runs.

    python -m scripts.recipe_sweep                      # every setting, 3 DP runs each (hours on 2 cores)
    python -m scripts.recipe_sweep --only baseline,rank_2 --runs 1

Each setting is the demo's (scripts/demo.py: SmolLM2-135M, the whole PubMed train split, epsilon 8
at delta 1/(10 N)) with a few of its options changed, trained with train_clm.py at the same budget
of about 900 abstract-passes (expected batch x steps). Utility is the validation loss on 256
validation abstracts *outside* the 256 the demo reports (the next 256 of the same seeded shuffle),
so that choosing among settings does not tune to the demo's own figures; the base model's loss on
them is measured once. The noise comes from the operating system, so runs of one setting differ:
each runs --runs times and the table gives mean and standard deviation. `--nonprivate` adds the
same settings without clipping or noise (one run each), the denominator of the share of the
non-private gain that DP keeps.

Every finished run is kept in --output_dir/results (a rerun skips it), so the sweep can be stopped
and resumed; the table goes to --output_dir/table.md and table.json. The runs share a privacy
ledger in --output_dir, as runs on one data set should.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess

from scripts.demo import REPO_ROOT, train_command, write_subsets
from scripts.demo import parse_args as demo_args
from scripts.prepare_model import smollm2_dir
from utils.cli import run_cli
from utils.data_utils import DEFAULT_PUBMED_DIR, PUBMED_PROMPT
from utils.io_utils import write_json, write_text

# setting -> the demo's options it sets (budget: batch x steps about 896, the demo's 128 x 7).
# Round one varies one lever at a time around the demo's first recipe (learning rate 1e-2);
# round two varies the others around its winner (learning rate 2e-2); round three the optimiser's
# momentum, whose winner (3e-2 without momentum) is the demo's default now.
LR_BEFORE, LR_WINNER = {"learning_rate": 1e-2}, {"learning_rate": 2e-2}
# rounds one and two ran with AdamW's momentum, which the demo's default has since turned off
SWEPT_AROUND = {"adam_beta1": 0.9}
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SETTINGS = {
    "baseline": LR_BEFORE,
    "rank_2": {**LR_BEFORE, "lora_r": 2},
    "rank_2_qkvo": {**LR_BEFORE, "lora_r": 2, "lora_target_modules": "q_proj,k_proj,v_proj,o_proj"},
    "rank_32": {**LR_BEFORE, "lora_r": 32},
    "lr_2e-2": LR_WINNER,
    "lr_4e-2": {"learning_rate": 4e-2},
    "lr_5e-3": {"learning_rate": 5e-3},
    "constant_lr": {**LR_BEFORE, "lr_scheduler_type": "constant"},
    "batch_224_x_4": {**LR_BEFORE, "batch_size": 224, "steps": 4},
    "batch_448_x_2": {**LR_BEFORE, "batch_size": 448, "steps": 2},
    "adam_eps_3e-3": {**LR_BEFORE, "adam_epsilon": 3e-3},
    "lr_2e-2_constant": {**LR_WINNER, "lr_scheduler_type": "constant"},
    "lr_2e-2_clip_0.1": {**LR_WINNER, "clip_norm": 0.1},
    "lr_2e-2_qkvo": {**LR_WINNER, "lora_target_modules": "q_proj,k_proj,v_proj,o_proj"},
    "lr_2e-2_freeze_a": {**LR_WINNER, "lora_freeze_a": True},  # FFA-LoRA: B only, 184,320 of 460,800 noised
    # round three: more adapter parameters (rank 2 lost to rank 8), and fewer, larger steps whose
    # learning rate keeps the sum of the linear schedule's step sizes (7 x 2e-2 -> 4 x 3.2e-2)
    "lr_2e-2_all_linear": {**LR_WINNER, "lora_target_modules": ALL_LINEAR},
    "lr_3.2e-2_batch_224_x_4": {"learning_rate": 3.2e-2, "batch_size": 224, "steps": 4},
    # without momentum each step's noise enters the adapter once, and a constant schedule weights the
    # steps equally: the mean of 7 noisy gradients has the least noise when every weight is the same
    "lr_2e-2_beta1_0": {**LR_WINNER, "adam_beta1": 0.0},
    "lr_2e-2_beta1_0_constant": {**LR_WINNER, "adam_beta1": 0.0, "lr_scheduler_type": "constant"},
    # without momentum the same lr moves the adapter by the same signal with less noise: a larger lr
    "lr_3e-2_beta1_0": {"learning_rate": 3e-2, "adam_beta1": 0.0},
    "lr_4e-2_beta1_0": {"learning_rate": 4e-2, "adam_beta1": 0.0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "outputs", "recipe"))
    p.add_argument("--only", default=None, help="comma-separated settings (default: all)")
    p.add_argument("--runs", type=int, default=3, help="DP runs per setting")
    p.add_argument("--nonprivate", action="store_true", help="also one non-private run per setting")
    p.add_argument("--val_records", type=int, default=256, help="held-out validation abstracts")
    args = p.parse_args(argv)
    args.settings = args.only.split(",") if args.only else list(SETTINGS)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"--only: unknown settings {unknown} (known: {', '.join(SETTINGS)})")
    return args


def held_out_validation(dataset_dir, path, count, seed, skip):
    """Validation abstracts `skip`..`skip + count` of the demo's seeded shuffle: never the demo's own."""
    import datasets

    split = datasets.load_from_disk(dataset_dir)["validation"]
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    texts = split.select(order[skip : skip + count])["text"]
    records = ({"instruction": PUBMED_PROMPT, "answer": text} for text in texts)
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def run_once(args, name, options, private, k, model, paths, steps):
    """One train_clm.py run of a setting; its eval loss, kept in results/ so a rerun skips it."""
    label = f"{name}-{'dp' if private else 'nonprivate'}-{k}"
    result = os.path.join(args.output_dir, "results", f"{label}.json")
    if os.path.exists(result):
        with open(result) as f:
            return json.load(f)
    demo = argparse.Namespace(**{**vars(args.demo), **SWEPT_AROUND, **options, "seed": args.demo.seed + k})
    out = os.path.join(args.output_dir, "runs", label)
    for folder in (out, out + ".work"):  # an interrupted earlier attempt: its steps stay on the ledger
        shutil.rmtree(folder, ignore_errors=True)
    cmd = train_command(demo, model, paths, out, private, demo.steps if steps is None else steps)
    print(f"=== {label}", flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with open(os.path.join(out, "all_results.json")) as f:
        figures = json.load(f)
    with open(os.path.join(out, "privacy_report.json")) as f:
        report = json.load(f)
    kept = {"setting": name, "private": private, "run": k, "options": options, "eval_loss": figures["eval_loss"]}
    kept.update({key: report[key] for key in ("epsilon", "noise_multiplier", "sampling_rate", "steps")})
    os.makedirs(os.path.dirname(result), exist_ok=True)
    write_json(result, kept)
    for folder in (out, out + ".work"):
        shutil.rmtree(folder)
    return kept


def table(results, base_loss):
    rows, lines = {}, []
    for name in SETTINGS:
        dp = [r["eval_loss"] for r in results if r["setting"] == name and r["private"]]
        nonprivate = [r["eval_loss"] for r in results if r["setting"] == name and not r["private"]]
        if not dp:
            continue
        mean = statistics.mean(dp)
        row = {"dp_eval_loss_mean": mean, "dp_eval_loss_std": statistics.stdev(dp) if len(dp) > 1 else None}
        row.update(runs=len(dp), dp_eval_loss=dp, options=SETTINGS[name])
        if nonprivate:
            row["nonprivate_eval_loss"] = nonprivate[0]
            row["kept_share"] = (base_loss - mean) / (base_loss - nonprivate[0])
        rows[name] = row
    lines.append(f"base model validation loss (held-out 256): {base_loss:.4f}")
    lines.append("| setting | changes | DP validation loss (mean +- sd, runs) | non-private | kept share |")
    lines.append("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        spread = f" +- {row['dp_eval_loss_std']:.3f}" if row["dp_eval_loss_std"] is not None else ""
        np_loss = f"{row['nonprivate_eval_loss']:.3f}" if "nonprivate_eval_loss" in row else ""
        share = f"{row['kept_share']:.2f}" if "kept_share" in row else ""
        changes = ", ".join(f"{k} {v}" for k, v in row["options"].items()) or "the demo's"
        lines.append(
            f"| {name} | {changes} | {row['dp_eval_loss_mean']:.3f}{spread} ({row['runs']}) | {np_loss} | {share} |"
        )
    return rows, "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    args.demo = demo_args([])
    model = smollm2_dir()
    data = os.path.join(args.output_dir, "data")
    paths, records, _ = write_subsets(DEFAULT_PUBMED_DIR, data, None, 1, args.demo.seed)
    paths["validation"] = held_out_validation(
        DEFAULT_PUBMED_DIR, os.path.join(data, "held_out_validation.jsonl"), args.val_records, args.demo.seed, 256
    )
    args.demo.delta = min(1e-5, 1 / (10 * records))
    base = run_once(args, "base", {}, False, 0, model, paths, 0)["eval_loss"]
    results = []
    for k in range(args.runs):  # every setting once, then every setting again: partial tables are fair
        for name in args.settings:
            results.append(run_once(args, name, SETTINGS[name], True, k, model, paths, None))
    if args.nonprivate:
        for name in args.settings:
            results.append(run_once(args, name, SETTINGS[name], False, 0, model, paths, None))
    rows, text = table(results, base)
    write_json(os.path.join(args.output_dir, "table.json"), {"base_eval_loss": base, "settings": rows})
    write_text(os.path.join(args.output_dir, "table.md"), text + "\n")
    print(text)


if __name__ == "__main__":
    run_cli(main)
