"""Empirical privacy audit of train_clm.py with one training run (Steinke, Nasr & Jagielski 2023,
"Privacy Auditing with One (1) Training Run", arXiv:2305.08846).

    python -m scripts.audit_privacy --output_dir audit_dp --target_epsilon 4      # DP on
    python -m scripts.audit_privacy --output_dir audit_off --non_private          # DP off
    python -m scripts.audit_privacy --output_dir audit_rel --attack release        # the logs, not the adapter

`--attack release` audits what the run publishes beside the adapter (scripts/audit_release.py);
the default `--attack adapter` is the one-run audit of the trained adapter described here.

1. m canary records (random vocabulary tokens as the answer, an empty instruction) are drawn;
   each joins the training set independently with probability 1/2, beside the population records.
2. train_clm.main() trains on that set: the audited code is the project's own training code.
   Every argument this script does not know is passed on to it (overriding this script's defaults).
3. Each canary's score is its loss drop: loss under the base model (the initial adapter: LoRA B is
   zero, so it is the base model) minus loss under the trained adapter.
4. The auditor guesses "included" for the k+ highest scores and "excluded" for the k- lowest, and
   abstains on the rest; k+ and k- are fixed before looking at the scores (--num_guesses).
5. For an (epsilon, delta)-DP run, the number of correct guesses is stochastically at most a
   Binomial(r, e^eps / (1 + e^eps)), plus a delta term (the paper's main result, computed as in
   its Appendix D). The largest epsilon whose p-value for the observed count is below
   1 - confidence is the empirical lower bound: with that confidence, the run is not
   (eps, delta)-DP for any smaller eps.
6. The number of training steps is fixed from the expected data set size before the canaries are
   drawn in (the sampling rate q = B/N still follows the realised size, as in any run).

The result (claimed epsilon from the run's privacy_report.json beside the empirical lower bound)
is printed and written to output_dir/audit.json. Without --model_name_or_path a tiny random Llama
(2 layers, hidden 64, a byte-level BPE tokenizer trained on local text) is built, so the audit
runs on CPU in a few minutes. A lower bound is evidence, not a guarantee: a bound below the claim
says this attack found no violation, a bound above it at high confidence means a bug.
"""

import argparse
import json
import math
import os
import random
import shutil

import torch
from scipy import stats

import train_clm
from scripts.audit_release import release_audit
from utils.cli import UserInputError, run_cli
from utils.data_utils import Collator, tokenize_record
from utils.dp_utils import per_record_loss
from utils.io_utils import write_json, write_text
from utils.lora_utils import load_adapter
from utils.model.model_utils import load_model, load_tokenizer
from utils.privacy.ledger import LEDGER_ENV
from utils.tiny_models import build_tiny_model, local_sentences

TINY_TARGETS = "q_proj,k_proj,v_proj,o_proj,lm_head"  # a random model's output layer must adapt to memorise


# ----------------------------------------------------------------------------------------------
# The one-run bound (Steinke, Nasr & Jagielski 2023, Appendix D)
# ----------------------------------------------------------------------------------------------


def audit_p_value(m, r, v, eps, delta):
    """Upper bound on P[at least v of r guesses correct] for an (eps, delta)-DP run with m canaries.

    Under eps-DP each guess is right with probability at most p = e^eps / (1 + e^eps), so the count
    is dominated by Binomial(r, p); delta adds at most 2 m delta * max_i P[v-i <= Bin < v] / i."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    p = 1 / (1 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta > 0 and v > 0:
        below, alpha = 0.0, 0.0
        for i in range(1, v + 1):
            below += float(stats.binom.pmf(v - i, r, p))
            alpha = max(alpha, below / i)
        tail += alpha * delta * 2 * m
    return min(tail, 1.0)


def epsilon_lower_bound(m, r, v, delta=0.0, confidence=0.95):
    """The largest eps (to 1e-6) that the observation rejects at this confidence; 0 if none."""
    beta = 1 - confidence
    if audit_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) < beta:  # ends: at eps -> inf, P[Bin(r, 1) >= v] = 1
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if audit_p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


def guess_and_count(scores, included, num_guesses):
    """Top k+ scores guessed in, bottom k- guessed out (k+ = ceil(r/2)); returns (r, correct)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    k_plus = (num_guesses + 1) // 2
    k_minus = num_guesses - k_plus
    guessed_in, guessed_out = order[:k_plus], order[len(order) - k_minus :] if k_minus else []
    correct = sum(included[i] for i in guessed_in) + sum(not included[i] for i in guessed_out)
    return k_plus, k_minus, correct


# ----------------------------------------------------------------------------------------------
# Canaries, population data and the tiny default model
# ----------------------------------------------------------------------------------------------


def make_canaries(tokenizer, m, length, rng):
    """m texts of `length` tokens drawn uniformly from the vocabulary (tokens that decode to printable
    text and encode back to themselves). Under any model that has not seen it, such a text costs
    about log(vocabulary) nats per token, so a loss drop can only come from memorisation."""
    special = set(tokenizer.all_special_ids)
    valid = {}

    def ok(i):
        if i not in valid:
            text = tokenizer.decode([i])
            valid[i] = (
                i not in special
                and text.strip() != ""
                and text.isprintable()
                and "\ufffd" not in text
                and tokenizer(text, add_special_tokens=False)["input_ids"] == [i]
            )
        return valid[i]

    canaries = []
    for _ in range(m):
        ids = []
        for _ in range(100 * length):
            if len(ids) == length:
                break
            i = rng.randrange(len(tokenizer))
            if ok(i):
                ids.append(i)
        if len(ids) < length:
            raise UserInputError("the tokenizer has too few printable tokens to draw canaries from")
        canaries.append(tokenizer.decode(ids))
    return canaries


def read_population(path):
    from utils.data_utils import load_records_file

    ds = load_records_file(path)
    return list(zip(ds["instruction"], ds["answer"]))


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def canary_losses(model, tokenizer, canaries, block_size, batch_size=16):
    """Per-canary mean answer-token loss: (with the trained adapter, with the adapter disabled)."""
    rows = [tokenize_record(tokenizer, "", c, block_size) for c in canaries]
    collator = Collator(rows, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    trained, base = [], []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collator(range(start, min(start + batch_size, len(rows)))).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        trained += per_record_loss(model(**inputs).logits, batch["labels"])[0].tolist()
        with model.disable_adapter():
            base += per_record_loss(model(**inputs).logits, batch["labels"])[0].tolist()
    return trained, base


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Unknown arguments go to train_clm.py (e.g. --learning_rate 1e-2 --lora_r 32).",
    )
    p.add_argument("--output_dir", required=True, help="canary data, the training run, audit.json")
    p.add_argument(
        "--attack",
        choices=["adapter", "release"],
        default="adapter",
        help="adapter: one-run canary audit of the trained adapter; release: the output folder's "
        "logged numbers over many runs of neighbouring data sets (audit_release.json)",
    )
    p.add_argument("--num_runs", type=int, default=100, help="release attack: runs per world")
    p.add_argument("--calibration_runs", type=int, default=30, help="release attack: runs that fix the threshold")
    p.add_argument("--model_name_or_path", default=None, help="default: build a tiny random Llama in output_dir")
    p.add_argument(
        "--population_file",
        default=None,
        help="records always in the training set (JSON / JSON Lines); default: local English sentences",
    )
    p.add_argument("--num_population", type=int, default=64, help="sentences used without --population_file")
    p.add_argument("--num_canaries", type=int, default=256, help="m")
    p.add_argument("--canary_tokens", type=int, default=8, help="random vocabulary tokens per canary")
    p.add_argument(
        "--unit_records",
        type=int,
        default=1,
        help="records per canary: above 1, each canary is a privacy unit of that many records "
        "(train_clm.py --privacy_unit_key), audited at unit level",
    )
    p.add_argument(
        "--num_guesses", type=int, default=None, help="r = k+ + k-, the rest abstained on (default: min(m, 100))"
    )
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument(
        "--num_train_epochs",
        type=float,
        default=20,
        help="steps = epochs x (population + m/2) / batch, fixed before the canaries are drawn in",
    )
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the training run and of the bound")
    privacy = p.add_mutually_exclusive_group()
    privacy.add_argument(
        "--target_epsilon",
        type=float,
        default=None,
        help="DP run (default 4, or 0.1 with --attack release, unless --noise_multiplier is passed on)",
    )
    privacy.add_argument("--non_private", action="store_true", help="train without clipping or noise")
    p.add_argument("--audit_seed", type=int, default=0, help="canaries and their inclusion (not the DP noise)")
    args, train_args = p.parse_known_args(argv)
    if args.num_canaries < 2:
        raise UserInputError(f"--num_canaries {args.num_canaries}: must be at least 2")
    if args.canary_tokens < 1:
        raise UserInputError(f"--canary_tokens {args.canary_tokens}: must be at least 1")
    if args.unit_records < 1:
        raise UserInputError(f"--unit_records {args.unit_records}: must be at least 1")
    args.num_guesses = min(args.num_canaries, 100) if args.num_guesses is None else args.num_guesses
    if not 1 <= args.num_guesses <= args.num_canaries:
        raise UserInputError(f"--num_guesses {args.num_guesses}: must be in [1, --num_canaries {args.num_canaries}]")
    if not 0 < args.confidence < 1:
        raise UserInputError(f"--confidence {args.confidence}: must be in (0, 1)")
    if not args.num_train_epochs > 0:
        raise UserInputError(f"--num_train_epochs {args.num_train_epochs}: must be positive")
    if args.num_population < 0:
        raise UserInputError(f"--num_population {args.num_population}: must be >= 0")
    if not 0 < args.delta < 1:
        raise UserInputError(f"--delta {args.delta}: must be in (0, 1)")
    if args.num_runs < 1 or args.calibration_runs < 1:
        raise UserInputError("--num_runs and --calibration_runs: must be at least 1")
    for own in ("--train_file", "--validation_file", "--dataset_name", "--output_dir", "--model_name_or_path"):
        if any(a == own or a.startswith(own + "=") for a in train_args):
            raise UserInputError(f"{own} is set by the audit; use this script's own options")
    if args.non_private and any(a.split("=")[0] in ("--noise_multiplier", "--clip_norm") for a in train_args):
        raise UserInputError("--non_private sets --clip_norm and --noise_multiplier itself")
    return args, train_args


def main(argv=None):
    args, passed_on = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    # the audit's canary data sets are its own: their runs go on a ledger of their own too
    os.environ.setdefault(LEDGER_ENV, os.path.join(os.path.abspath(args.output_dir), "ledger"))
    model_path, tiny = audited_model(args)
    privacy = privacy_flags(args, passed_on)
    if args.attack == "release":
        return report_release_audit(args, release_audit(args, privacy + passed_on, model_path, make_canaries))

    tokenizer = load_tokenizer(model_path)
    canaries, included, population, data_file = write_training_set(args, tokenizer)
    run_dir = os.path.join(args.output_dir, "run")
    for folder in (run_dir, run_dir + ".work"):  # this audit's own run of an earlier time
        shutil.rmtree(folder, ignore_errors=True)
    train_argv = training_arguments(args, data_file, model_path, run_dir, tiny, len(population), privacy + passed_on)
    print("training: train_clm.py " + " ".join(train_argv), flush=True)
    train_clm.main(train_argv)
    with open(os.path.join(run_dir, "privacy_report.json")) as f:
        report = json.load(f)
    block_size = train_clm.parse_args(train_argv).block_size
    scores = canary_scores(model_path, run_dir, tokenizer, canaries, block_size, args.unit_records)
    result = audit_result(args, report, canaries, included, scores, train_argv)
    write_json(os.path.join(args.output_dir, "audit.json"), result)
    print_audit(result)
    return result


def audited_model(args):
    """The model to audit: (its path, whether it is the tiny random Llama built in output_dir)."""
    if args.model_name_or_path is not None:
        return args.model_name_or_path, False
    # a 64-wide model gains nothing from threads, and loses many times over when cores are shared
    torch.set_num_threads(1)
    model_path = os.path.join(args.output_dir, "tiny_llama")
    if not os.path.exists(os.path.join(model_path, "config.json")):
        build_tiny_model(model_path)
    return model_path, True


def privacy_flags(args, passed_on):
    """train_clm.py's privacy arguments: none, clipping and noise, or a target epsilon."""
    if args.non_private:
        return ["--clip_norm", "-1", "--noise_multiplier", "-1"]
    if any(a.split("=")[0] == "--noise_multiplier" for a in passed_on):
        return []
    return ["--target_epsilon", str(args.target_epsilon or (0.1 if args.attack == "release" else 4.0))]


def canary_scores(model_path, run_dir, tokenizer, canaries, block_size, per_unit):
    """Each canary unit's loss drop from the base model (= the initial adapter) to the trained adapter."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_adapter(load_model(model_path), run_dir).eval().to(device)
    texts = [text for unit in canaries for text in unit]
    trained, base = canary_losses(model, tokenizer, texts, block_size)
    return [
        sum(base[i : i + per_unit]) / per_unit - sum(trained[i : i + per_unit]) / per_unit
        for i in range(0, len(texts), per_unit)
    ]


def audit_result(args, report, canaries, included, scores, train_argv):
    """The guesses, their count and the bound, beside the run's own claim (audit.json)."""
    k_plus, k_minus, correct = guess_and_count(scores, included, args.num_guesses)
    m, r = args.num_canaries, args.num_guesses
    bound = epsilon_lower_bound(m, r, correct, args.delta, args.confidence)
    # a known DP seed (--insecure_dp_seed, for repeatable audits) is not the attacker's: the figure with a secret one
    claimed = report.get("epsilon_if_seed_secret", report.get("epsilon"))
    return {
        "claimed_epsilon": claimed,  # null: non-private (infinite)
        "empirical_epsilon_lower_bound": bound,
        "confidence": args.confidence,
        "delta": args.delta,
        "num_canaries": m,
        "num_included": sum(included),
        "num_guesses": r,
        "k_plus": k_plus,
        "k_minus": k_minus,
        "records_per_canary": args.unit_records,
        "privacy_unit": report.get("privacy_unit"),
        "correct_guesses": correct,
        "mean_score_included": _mean([s for s, i in zip(scores, included) if i]),
        "mean_score_excluded": _mean([s for s, i in zip(scores, included) if not i]),
        "dataset_size": report.get("dataset_size"),
        "steps": report.get("steps"),
        "noise_multiplier": report.get("noise_multiplier"),
        "clip_norm": report.get("clip_norm"),
        "sampling_rate": report.get("sampling_rate"),
        "method": "one-run audit, Steinke, Nasr & Jagielski 2023 (Appendix D bound, delta term included)",
        "note": (
            "steps fixed from the expected data set size; the sampling rate q = B/N follows the realised "
            "size (canaries drawn in included); the claimed epsilon is the run's own report"
        ),
        "train_args": train_argv,
        "canaries": [{"texts": unit, "included": inc, "score": s} for unit, inc, s in zip(canaries, included, scores)],
    }


def print_audit(result):
    """The audit's verdict on the console."""
    claimed, bound = result["claimed_epsilon"], result["empirical_epsilon_lower_bound"]
    per_unit = result["records_per_canary"]
    shown = "inf (non-private)" if claimed is None else f"{claimed:.3f}"
    unit = f" of {per_unit} records each" if per_unit > 1 else ""
    print(
        f"audit: {result['correct_guesses']} of {result['num_guesses']} guesses correct "
        f"({result['num_canaries']} canaries{unit}, {result['num_included']} included)"
    )
    print(f"claimed epsilon: {shown} at delta {result['delta']:g}")
    print(f"empirical epsilon lower bound: {bound:.3f} at {100 * result['confidence']:g}% confidence")
    if claimed is not None and bound > claimed:
        print("WARNING: the empirical lower bound exceeds the claimed epsilon: the privacy claim is violated")


def write_training_set(args, tokenizer):
    """Canary units (each of --unit_records random texts), each included independently with
    probability 1/2 (the audit's own randomness), beside the population; the training file."""
    rng = random.Random(args.audit_seed)
    texts = make_canaries(tokenizer, args.num_canaries * args.unit_records, args.canary_tokens, rng)
    canaries = [texts[i : i + args.unit_records] for i in range(0, len(texts), args.unit_records)]
    included = [rng.random() < 0.5 for _ in canaries]
    population = (
        read_population(args.population_file)
        if args.population_file
        else [("", s) for s in local_sentences(args.num_population)]
    )
    records = [(i, a, f"p{k}") for k, (i, a) in enumerate(population)]
    records += [("", text, f"c{k}") for k, (unit, inc) in enumerate(zip(canaries, included)) if inc for text in unit]
    rng.shuffle(records)
    data_file = os.path.join(args.output_dir, "train.jsonl")
    rows = ({"instruction": instruction, "answer": answer, "unit": unit} for instruction, answer, unit in records)
    write_text(data_file, "".join(json.dumps(row) + "\n" for row in rows))
    return canaries, included, population, data_file


def training_arguments(args, data_file, model_path, run_dir, tiny, population, passed_on):
    """train_clm.py's arguments: this audit's defaults, then those passed on (which override them)."""
    defaults = [
        "--block_size",
        "64",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "3e-3",
        "--lr_scheduler_type",
        "constant",
        "--seed",
        str(args.audit_seed),
    ]
    if tiny:
        defaults += ["--lora_target_modules", TINY_TARGETS]
    if args.unit_records > 1:  # a canary is a unit of several records, clipped and accounted as one
        defaults += ["--privacy_unit_key", "unit", "--max_records_per_unit", str(args.unit_records)]
    train_argv = [
        "--train_file",
        data_file,
        "--model_name_or_path",
        model_path,
        "--output_dir",
        run_dir,
        "--delta",
        repr(args.delta),
        *defaults,
        *passed_on,
    ]
    # the number of steps must not depend on which canaries were drawn in: fix it from the
    # expected number of units (the arguments are checked here too, before anything is trained)
    planned = train_clm.parse_args(train_argv)
    if planned.max_train_steps is None:
        expected_size = population + args.num_canaries / 2
        batch = planned.per_device_train_batch_size * planned.gradient_accumulation_steps
        train_argv += ["--max_train_steps", str(math.ceil(args.num_train_epochs * expected_size / batch))]
    return train_argv


def report_release_audit(args, result):
    write_json(os.path.join(args.output_dir, "audit_release.json"), result)
    claimed = result["claimed_epsilon_replace_one"]  # same-size neighbours: the replace-one relation
    print(
        f"release audit ({result['train_loss']} training loss): canary flagged in {result['flagged_with_canary']} "
        f"of {args.num_runs} runs, falsely in {result['flagged_without_canary']} of {args.num_runs}"
    )
    print(
        f"claimed epsilon: {'inf (non-private)' if claimed is None else f'{claimed:.3f}'} (replace-one) "
        f"at delta {args.delta:g}"
    )
    print(
        f"empirical epsilon lower bound: {result['empirical_epsilon_lower_bound']:.3f} at "
        f"{100 * args.confidence:g}% confidence"
    )
    if claimed is not None and result["empirical_epsilon_lower_bound"] > claimed:
        print("WARNING: the empirical lower bound exceeds the claimed epsilon: what the run publishes is not covered")
    return result


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    run_cli(main)
