"""Audit of everything a run publishes except the adapter: `audit_privacy.py --attack release`.

A distinguishing game between two neighbouring training sets of the same size N: world 0 holds N
ordinary records, world 1 the same records with one replaced by a canary (random vocabulary
tokens, whose loss stays high under a model that has learnt the ordinary records). Each run trains
with train_clm.main() in a fresh folder, with a tracker and checkpoints; the attacker reads every
file the run leaves but the adapter: the release (training log, results, report, the tracker's
TensorBoard events) and the work folder beside it (the checkpoints' logged history, curator-only
files), and takes the largest training loss logged anywhere. A threshold fixed on calibration runs
of world 0 (their largest statistic) flags a run as "canary in"; then fresh runs of both worlds
give a true and a false positive rate, and with Clopper-Pearson bounds at the given confidence the
empirical epsilon lower bound

    eps >= log((TPR_low - delta) / FPR_high)   (and the same for the complementary rates)

holds for any (eps, delta)-DP release (Kairouz et al. 2015). With exact per-step losses the canary's
step stands out and the bound exceeds the claimed epsilon; with the private loss estimate
(`--train_loss private`, the default) it stays at chance.
"""

import json
import math
import os
import random
import shutil

import torch
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_clm
from utils.io_utils import write_text
from utils.lora_utils import load_adapter
from utils.model.model_utils import load_model, load_tokenizer
from utils.tiny_models import local_sentences

PRETRAIN_STEPS = 150


def logged_losses(*folders):
    """Every training loss a run wrote anywhere in these folders: JSON files, the tracker's
    TensorBoard events, and the history rows its checkpoints keep."""
    values = []
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                if name.endswith(".json"):
                    with open(path) as f:
                        values += _row_losses(json.load(f))
                elif name.startswith("custom_checkpoint_"):
                    values += _row_losses(torch.load(path, weights_only=False)["history"])
                elif name.startswith("events.out.tfevents."):
                    events = EventAccumulator(path)
                    events.Reload()
                    tags = [t for t in events.Tags()["scalars"] if t.endswith("train_loss")]
                    values += [e.value for tag in tags for e in events.Scalars(tag)]
    return values


def _row_losses(data):
    values = []
    for row in data if isinstance(data, list) else [data]:
        values += [v for k, v in row.items() if k.endswith("train_loss") and isinstance(v, (int, float))]
    return values


def learned_base(model_path, records, folder, seed):
    """The tiny model after non-private LoRA training on the ordinary records, merged: a model that
    has learnt them, so that a canary's loss is far above theirs."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    data = os.path.join(folder + "_data.jsonl")
    write_jsonl(data, records)
    run = folder + "_run"
    train_clm.main(
        [
            "--train_file",
            data,
            "--model_name_or_path",
            model_path,
            "--output_dir",
            run,
            "--block_size",
            "64",
            "--per_device_train_batch_size",
            str(len(records)),
            "--lora_target_modules",
            "q_proj,k_proj,v_proj,o_proj,lm_head",
            "--lora_r",
            "16",
            "--learning_rate",
            "1e-2",
            "--max_train_steps",
            str(PRETRAIN_STEPS),
            "--seed",
            str(seed),
            "--clip_norm",
            "-1",
            "--noise_multiplier",
            "-1",
        ]
    )
    merged = load_adapter(load_model(model_path), run).merge_and_unload()
    merged.save_pretrained(folder)
    load_tokenizer(model_path).save_pretrained(folder)
    shutil.rmtree(run)
    shutil.rmtree(run + ".work", ignore_errors=True)
    return folder


def write_jsonl(path, records):
    write_text(path, "".join(json.dumps({"instruction": i, "answer": a}) + "\n" for i, a in records))


def clopper_pearson(k, n, confidence):
    alpha = 1 - confidence
    low = stats.beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    high = stats.beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def epsilon_from_rates(true_pos, false_pos, n, delta, confidence):
    """Empirical epsilon lower bound from n runs per world (both directions of the test)."""
    # each one-sided bound holds with probability 1 - (1 - confidence) / 2: both together at `confidence`
    tpr_low, _ = clopper_pearson(true_pos, n, confidence)
    _, fpr_high = clopper_pearson(false_pos, n, confidence)
    bounds = [0.0]
    if tpr_low - delta > 0:
        bounds.append(math.log((tpr_low - delta) / fpr_high))
    if 1 - fpr_high - delta > 0 and tpr_low < 1:
        bounds.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
    return max(bounds)


def release_audit(args, passed_on, model_path, make_canaries):
    """Run the game; returns the result written to output_dir/audit_release.json."""
    tokenizer = load_tokenizer(model_path)
    rng = random.Random(args.audit_seed)
    ordinary = [("", s) for s in local_sentences(args.num_population)]
    canary = ("", make_canaries(tokenizer, 1, args.canary_tokens, rng)[0])
    base = learned_base(model_path, ordinary, os.path.join(args.output_dir, "learned_base"), args.audit_seed)
    worlds = {0: ordinary, 1: ordinary[:-1] + [canary]}
    seeds = iter(range(args.audit_seed * 1_000_003 + 1, args.audit_seed * 1_000_003 + 10_000_000))

    def statistic(world):
        run_dir = os.path.join(args.output_dir, "runs", f"world{world}")
        work_dir = run_dir + ".work"
        for folder in (run_dir, work_dir):
            shutil.rmtree(folder, ignore_errors=True)
        data = os.path.join(args.output_dir, f"world{world}.jsonl")
        write_jsonl(data, worlds[world])
        train_clm.main(
            [
                "--train_file",
                data,
                "--model_name_or_path",
                base,
                "--output_dir",
                run_dir,
                "--block_size",
                "64",
                "--per_device_train_batch_size",
                "8",
                "--max_train_steps",
                "24",
                "--lora_target_modules",
                "q_proj,v_proj",
                "--learning_rate",
                "3e-3",
                "--delta",
                repr(args.delta),
                "--insecure_dp_seed",
                str(next(seeds)),
                "--with_tracking",
                "--checkpointing_steps",
                "8",
                *passed_on,
            ]
        )
        with open(os.path.join(run_dir, "privacy_report.json")) as f:
            report = json.load(f)
        value = max(logged_losses(run_dir, work_dir), default=-math.inf)
        for folder in (run_dir, work_dir):
            shutil.rmtree(folder)
        return value, report

    calibration = [statistic(0)[0] for _ in range(args.calibration_runs)]
    threshold = max(calibration)
    flagged, report = {0: 0, 1: 0}, None
    for _ in range(args.num_runs):
        for world in (0, 1):
            value, report = statistic(world)
            flagged[world] += value > threshold
    bound = epsilon_from_rates(flagged[1], flagged[0], args.num_runs, args.delta, args.confidence)
    return {
        "attack": "release: largest training loss logged in any file the run left, tracker events included "
        "(adapter not used)",
        # the runs' DP seeds are known (for repeatability), not to the attacker: the figure with a secret seed
        "claimed_epsilon": report.get("epsilon_if_seed_secret", report.get("epsilon")),
        "claimed_epsilon_replace_one": report.get(
            "epsilon_replace_one_if_seed_secret", report.get("epsilon_replace_one")
        ),
        "train_loss": report.get("train_loss"),
        "empirical_epsilon_lower_bound": bound,
        "confidence": args.confidence,
        "delta": args.delta,
        "dataset_size": report.get("dataset_size"),
        "steps": report.get("steps"),
        "noise_multiplier": report.get("noise_multiplier"),
        "sampling_rate": report.get("sampling_rate"),
        "calibration_runs": args.calibration_runs,
        "threshold": threshold,
        "runs_per_world": args.num_runs,
        "flagged_with_canary": flagged[1],
        "flagged_without_canary": flagged[0],
    }
