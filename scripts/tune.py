"""Hyperparameter tuning whose privacy cost is accounted: random search with a random number of trials.

    python -m scripts.tune --search_space space.json --mean_trials 3 --output_dir out/tuned \\
        --train_file data.jsonl --model_name_or_path MODEL --target_epsilon 8 --delta 1e-7 ...

Choosing settings by looking at several runs on private data is itself a release. Papernot and
Steinke (ICLR 2022, "Hyperparameter tuning with Renyi differential privacy") bound it: draw the
number of trials K at random (Poisson, or a truncated negative binomial such as the geometric),
draw each trial's settings at random from a fixed search space (no adaptive search), score each
trial by a DP output of its own, and release only the best; the whole procedure then costs a small
multiple of one trial's epsilon instead of K times it. dp-accounting composes it
(`RepeatAndSelectDpEvent`, with its RDP accountant).

What this script keeps to, so that one event describes every trial:
  * the sampling rate, steps and noise are the same in every trial (the search space may change
    only settings that leave them alone: learning rate, LoRA shape, schedule, clipping norm, ...);
  * K is drawn with the operating system's secure generator and appears nowhere in the release
    (report, ledger totals, file names); losing trials run in the work folder, without a tracker,
    and are deleted; only the best trial's adapter and reports reach --output_dir;
  * a trial is scored by its private training loss (the mean of its last quarter of released
    losses) or, with --score validation, by its private validation loss (--validation_noise_multiplier);
  * the procedure is one invocation on the privacy ledger, written before the first trial runs (and
    one on the validation units when scored there), so an interrupted procedure is charged in full;
    the trials' own steps are on the ledger too, covered by it.

privacy_report.json of the release then gives `epsilon` = `procedure_epsilon` (the procedure's RDP
bound, add/remove), `trial_epsilon` (one trial, PLD) and `naive_epsilon_at_mean` (the mean number of
trials composed as if each were released, with the same RDP accountant as the procedure), and the
ledger's figures with the procedure counted. Trials run one at a time, in this process.
"""

import argparse
import json
import math
import os
import secrets
import shutil
import tempfile

import train_clm
from utils.cli import UserInputError, cli_flags, run_cli
from utils.data_utils import load_raw_datasets, privacy_units, unit_keys
from utils.io_utils import write_json
from utils.privacy.accounting import composed_epsilon, compute_epsilon_rdp, noise_multiplier_for_procedure
from utils.privacy.ledger import PrivacyLedger, Session, new_id
from utils.privacy.plan import make_privacy_plan
from utils.privacy.sampling import make_sampler
from utils.privacy.validation import planned_evaluations

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# settings a trial may draw: none of them changes the sampling rate, the steps or the noise
SEARCHABLE = {
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "num_warmup_steps",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "optimizer",
    "adam_epsilon",
    "adam_beta1",
    "adam_beta2",
    "clip_norm",
    "seed",
}
OWN = ("--output_dir", "--work_dir", "--with_tracking", "--resume_from_checkpoint", "--checkpointing_steps")
SHAPES = {"poisson": math.inf, "geometric": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="Unknown arguments go to every trial's train_clm.py."
    )
    p.add_argument("--search_space", required=True, help='JSON: {"learning_rate": [1e-3, 1e-2], "lora_r": [2, 8]}')
    p.add_argument("--mean_trials", type=float, default=3.0, help="the mean of the number of trials K")
    p.add_argument(
        "--trial_distribution",
        choices=sorted(SHAPES),
        default="geometric",
        help="K's distribution: geometric (K >= 1; a truncated negative binomial of shape 1) or poisson "
        "(K = 0 possible: then nothing is released, and the procedure is still charged)",
    )
    p.add_argument("--score", choices=["train_loss", "validation"], default="train_loss")
    p.add_argument(
        "--target_procedure_epsilon",
        type=float,
        default=None,
        help="the whole procedure's epsilon: the trials' noise is solved for it (instead of each trial's "
        "--target_epsilon or --noise_multiplier)",
    )
    p.add_argument("--output_dir", required=True, help="the release: the best trial's adapter and reports")
    args, trial_args = p.parse_known_args(argv)
    for own in (*OWN, "--insecure_dp_seed", "--ledger_procedure", "--ledger_validation_procedure"):
        if any(a == own or a.startswith(own + "=") for a in trial_args):
            raise UserInputError(f"{own}: set by the tuning procedure, or not allowed in it")
    if args.target_procedure_epsilon is not None:
        for own in ("--target_epsilon", "--noise_multiplier"):
            if any(a == own or a.startswith(own + "=") for a in trial_args):
                raise UserInputError(f"{own}: not with --target_procedure_epsilon, which sets the trials' noise")
    if not args.mean_trials >= 1:
        raise UserInputError(f"--mean_trials {args.mean_trials}: must be at least 1")
    args.space = read_search_space(args.search_space)
    args.trial_args = trial_args
    return args


def read_search_space(path):
    try:
        with open(path) as f:
            space = json.load(f)
    except (OSError, ValueError) as err:
        raise UserInputError(f"--search_space {path}: not a readable JSON file ({err})") from None
    if not isinstance(space, dict) or not space:
        raise UserInputError(f"--search_space {path}: expected a JSON object of setting -> list of values")
    for key, values in space.items():
        if key not in SEARCHABLE:
            raise UserInputError(
                f"--search_space {path}: '{key}' cannot be searched (it would change the sampling rate, the steps "
                f"or the noise, or is not a setting); searchable: {', '.join(sorted(SEARCHABLE))}"
            )
        if not isinstance(values, list) or not values:
            raise UserInputError(f"--search_space {path}: '{key}' must list at least one value")
    return space


def draw_trials(mean: float, distribution: str, rng=None) -> int:
    """K from the OS's secure generator: Poisson(mean), or geometric on {1, 2, ...} with this mean."""
    rng = rng or secrets.SystemRandom()
    if distribution == "poisson":  # inversion: count arrivals of rate `mean` in unit time
        k, total = 0, rng.expovariate(mean)
        while total < 1.0:
            k, total = k + 1, total + rng.expovariate(mean)
        return k
    k = 1
    while rng.random() >= 1 / mean:
        k += 1
    return k


def draw_settings(space: dict, rng=None) -> dict:
    rng = rng or secrets.SystemRandom()
    return {key: rng.choice(values) for key, values in space.items()}


def trial_arguments(trial_args):
    return train_clm.parse_args([*trial_args, "--output_dir", "unused"])


def trial_data(args):
    privacy = args.privacy
    return load_raw_datasets(
        args.dataset_name, args.train_file, args.validation_file, args.dataset_dir, privacy.privacy_unit_key
    )


def trial_plan(args, raw):
    """Every trial's privacy plan (sampling rate, noise and steps), from the trials' arguments and data."""
    privacy = args.privacy
    units = privacy_units(raw["train"], privacy.privacy_unit_key, "train") if privacy.privacy_unit_key else None
    sampler = make_sampler(
        privacy.sampling,
        len(raw["train"]),
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        1,
        0,
        None,
        units=units,
        max_records_per_unit=privacy.max_records_per_unit,
    )
    planned = sampler.steps_for(args.max_train_steps, args.num_train_epochs)
    plan = make_privacy_plan(privacy, sampler, planned, 1.0, say=lambda *_: None)
    if not plan.guaranteed:
        raise UserInputError("tuning needs private trials: clipping, noise above zero and a secret DP seed")
    return plan


def noise_for_procedure(args, plan):
    """The trials' --noise_multiplier at which the whole procedure costs --target_procedure_epsilon,
    from their plan at noise multiplier 1. The accounted noise is the gradient's and the released
    loss's together, a fixed multiple of the gradient's, so it is solved for once and scaled back."""
    try:
        effective = noise_multiplier_for_procedure(
            args.target_procedure_epsilon,
            plan.sampling_rate,
            plan.steps,
            plan.settings.delta,
            args.mean_trials,
            SHAPES[args.trial_distribution],
        )
    except ValueError as err:
        raise UserInputError(str(err)) from None
    return effective / plan.effective_noise_multiplier


def score(folder, by):
    """The trial's DP output it is judged by: lower is better."""
    if by == "validation":
        with open(os.path.join(folder, "all_results.json")) as f:
            return json.load(f)["eval_loss"]
    with open(os.path.join(folder, "training_log.json")) as f:
        losses = [row["train_loss"] for row in json.load(f) if "train_loss" in row]
    last = losses[-max(1, len(losses) // 4) :]
    return sum(last) / len(last)


def admit_procedure(ledger, train, release, keys, mechanism, steps, args):
    """The procedure's one invocation on the ledger, before any trial: (q, sigma) for `steps` steps,
    repeated a random number of times, the best released."""
    session = Session(
        session=new_id(),
        run=new_id(),
        parent=None,
        release=release,
        tracked=False,
        sampling_rate=mechanism[0],
        noise_multiplier=mechanism[1],
        relation=train.privacy.neighboring_relation,
        planned=1,
        budget=[train.privacy.ledger_budget_epsilon, train.privacy.delta]
        if train.privacy.ledger_budget_epsilon
        else None,
        purpose="procedure",
        select=[steps, args.mean_trials, SHAPES[args.trial_distribution]],
    )
    admitted = ledger.admit(session, ledger.unit_hashes(keys))
    admitted.record_step(1)
    return admitted


def run_trials(args, train, flags, work):
    """K trials, each scored; the best one's folder (None when K = 0). Losing trials are deleted."""
    best = None
    for _ in range(draw_trials(args.mean_trials, args.trial_distribution)):
        settings = draw_settings(args.space)
        folder = os.path.join(work, new_id())
        print(f"tuning: a trial with {settings}", flush=True)  # console only
        reset_accelerate()
        train_clm.main([*args.trial_args, *cli_flags(**settings), *flags, "--output_dir", folder])
        shutil.rmtree(folder + ".work", ignore_errors=True)
        value = score(folder, args.score)
        if best is None or value < best[0]:
            if best:
                shutil.rmtree(best[1])
            best = (value, folder, settings)
        else:
            shutil.rmtree(folder)
    return best


def procedure_report(report, procedure, validation, args, mechanism, steps, settings):
    """The best trial's report, with the procedure's guarantee: it, not one trial, covers the release."""
    q, sigma = mechanism
    delta, shape = report["delta"], SHAPES[args.trial_distribution]
    tuned = composed_epsilon({(q, sigma, steps, args.mean_trials, shape): 1}, delta)
    report.update(
        epsilon=tuned,
        epsilon_replace_one=None,  # dp-accounting composes the procedure with RDP, add/remove only
        procedure_epsilon=tuned,
        trial_epsilon=report["epsilon"],
        # the same RDP accountant as the procedure's, so the two compare
        naive_epsilon_at_mean=compute_epsilon_rdp(sigma, q, math.ceil(args.mean_trials) * steps, delta),
        tuning={
            "trial_distribution": args.trial_distribution,
            "mean_trials": args.mean_trials,
            "search_space": args.space,
            "score": args.score,
            "target_procedure_epsilon": args.target_procedure_epsilon,
            "chosen": settings,
        },
        note="the adapter is the best of a random number of trials (scripts/tune.py): epsilon is the "
        "procedure's (Papernot and Steinke 2022), trial_epsilon one trial's",
        **procedure.totals(delta),
    )
    if validation:
        v = validation.session
        report["validation_epsilon"] = composed_epsilon({(1.0, v.noise_multiplier, *v.select): 1}, delta)
        report["validation_epsilon_replace_one"] = None
        report["validation_ledger_epsilon"] = validation.totals(delta)["ledger_epsilon"]
    return report


def publish(best, release, report):
    os.makedirs(release, exist_ok=True)
    write_json(os.path.join(best, "privacy_report.json"), report)
    results_path = os.path.join(best, "all_results.json")
    with open(results_path) as f:
        results = json.load(f)
    results.update(epsilon=report["epsilon"], epsilon_replace_one=None, note=report["note"])
    write_json(results_path, results)
    for name in sorted(os.listdir(best)):
        os.replace(os.path.join(best, name), os.path.join(release, name))


def reset_accelerate():
    """Each trial builds its own Accelerator in this process."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def main(argv=None):
    args = parse_args(argv)
    release = os.path.abspath(args.output_dir)
    if os.path.exists(release) and os.listdir(release):
        raise UserInputError(f"{args.output_dir}: already holds a release; choose a new --output_dir")
    solve_noise = args.target_procedure_epsilon is not None
    train = trial_arguments([*args.trial_args, *(["--noise_multiplier", "1"] if solve_noise else [])])
    raw = trial_data(train)
    plan = trial_plan(train, raw)
    if solve_noise:
        args.trial_args += ["--noise_multiplier", repr(noise_for_procedure(args, plan))]
        train = trial_arguments(args.trial_args)
        plan = trial_plan(train, raw)
    if args.score == "validation" and (train.validation_noise_multiplier is None or "validation" not in raw):
        raise UserInputError("--score validation needs validation data and --validation_noise_multiplier")
    if args.score == "train_loss" and plan.train_loss != "private":
        raise UserInputError("--score train_loss needs the private training loss (--train_loss private)")
    mechanism, steps = (plan.sampling_rate, plan.effective_noise_multiplier), plan.steps
    ledger = PrivacyLedger(train.privacy.ledger_dir)
    os.makedirs(os.path.dirname(release), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".tuning-", dir=os.path.dirname(release))  # same file system as the release
    try:
        keys = unit_keys(raw["train"], train.privacy.privacy_unit_key)
        procedure = admit_procedure(ledger, train, release, keys, mechanism, steps, args)
        flags = ["--ledger_dir", ledger.folder, "--ledger_procedure", procedure.session.session]
        validation = None
        if args.score == "validation":
            evaluations = planned_evaluations(0, steps, train.eval_freq)
            keys = unit_keys(raw["validation"], train.privacy.privacy_unit_key)
            gaussian = (1.0, train.validation_noise_multiplier)
            validation = admit_procedure(ledger, train, release, keys, gaussian, evaluations, args)
            flags += ["--ledger_validation_procedure", validation.session.session]
        best = run_trials(args, train, flags, work)
        if best is None:
            print("tuning: no trial was drawn (K = 0 under the Poisson distribution): nothing released")
            return None
        with open(os.path.join(best[1], "privacy_report.json")) as f:
            report = procedure_report(json.load(f), procedure, validation, args, mechanism, steps, best[2])
        publish(best[1], release, report)
        print(f"tuning: released the best trial to {args.output_dir}: procedure epsilon {report['epsilon']:.4g}")
        return report
    finally:
        ledger.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
