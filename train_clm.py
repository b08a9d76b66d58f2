"""Fine-tune a causal LM with LoRA adapters under (epsilon, delta)-differential privacy.

    accelerate launch --config_file accelerate_configs/cpu_1proc.cfg train_clm.py \
        --train_file data.json --model_name_or_path <model> --output_dir out \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 64 \
        --clip_norm 1 --noise_multiplier 1.2 --num_train_epochs 5 --learning_rate 3e-4

The script reads top to bottom: arguments, setup (data, model, privacy plan, optimizer, resume),
the training loop, saving. Every privacy decision lives in utils/: utils/privacy/plan.py (the plan:
noise, accountant, budget, report), utils/dp_utils.py (per-example gradients, clipping, noise),
utils/privacy/sampling.py (which records each step uses); docs/DESIGN.md lists the rules and their tests.
"""

import argparse
import os
import time
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import SchedulerType

from utils.checkpoint_utils import (
    TrainingState,
    check_folders,
    check_same_file_system,
    default_work_dir,
    reseed_public_generators,
    resolve_checkpoint,
    save_checkpoint,
    tracker_dir,
)
from utils.cli import UserInputError, run_cli
from utils.data_utils import Collator, check_disjoint, load_raw_datasets, privacy_units, tokenize_dataset, unit_keys
from utils.dist_utils import end_process_group, on_main_process
from utils.dp_randomness import DPRandomness
from utils.dp_utils import DPGradient
from utils.io_utils import publish_outputs, write_json
from utils.lora_utils import save_adapter
from utils.model.fsdp_utils import assert_replicas_agree
from utils.model.model_utils import access_token, build_model, load_tokenizer, uniform_guess_loss
from utils.privacy.ledger import PrivacyLedger, ledger_line, new_id
from utils.privacy.plan import EXACT_LOG_FILE, add_privacy_args, make_privacy_plan, privacy_arguments
from utils.privacy.run_ledger import admit_to_ledger, ledger_report
from utils.privacy.sampling import make_sampler
from utils.privacy.validation import evaluate_private, private_validation
from utils.train_utils import StepLog, build_optimizer, evaluate, tracker_config, train_logical_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None, help="pubmed_generation: the built PubMed abstracts")
    data.add_argument("--dataset_dir", default=None, help="folder of the built PubMed data set")
    data.add_argument("--train_file", default=None, help="JSON {instruction: [...], answer: [...]} or JSON Lines")
    data.add_argument("--validation_file", default=None, help="same format; default: the data set's validation split")
    data.add_argument(
        "--validation_is_public",
        action="store_true",
        help="the validation file may be disclosed: its exact loss and perplexity are published "
        "(with --validation_file, this or --validation_noise_multiplier; the built PubMed splits are public)",
    )
    data.add_argument(
        "--validation_noise_multiplier",
        type=float,
        default=None,
        metavar="SIGMA",
        help="validation data that may not be disclosed: publish a private validation loss, each unit's "
        "loss clipped to [0, --loss_clip] plus Gaussian noise of SIGMA x L, accounted as validation_epsilon",
    )
    data.add_argument("--block_size", type=int, default=512, help="max tokens per record (longer ones are truncated)")
    model = p.add_argument_group("model and LoRA")
    model.add_argument("--model_name_or_path", required=True)
    model.add_argument("--access_token", default=None, help="hub token; prefer the HF_TOKEN environment variable")
    model.add_argument("--gradient_ckpt", action="store_true", help="activation checkpointing (less memory, slower)")
    model.add_argument(
        "--load_in_4bit",
        action="store_true",
        help="QLoRA: the frozen base in 4 bits (bitsandbytes NF4, bf16 products; LoRA stays float32); not with FSDP",
    )
    model.add_argument("--lora_r", type=int, default=16)
    model.add_argument("--lora_alpha", type=float, default=16)
    model.add_argument("--lora_dropout", type=float, default=0.0)
    model.add_argument(
        "--lora_freeze_a",
        action="store_true",
        help="train LoRA's B only, A fixed at its seeded random start (FFA-LoRA): fewer noised parameters",
    )
    model.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated names, one regex or all-linear; default: the attention linears",
    )
    model.add_argument("--keep_base_dropout", action="store_true", help="keep the base model's dropout (default: off)")
    train = p.add_argument_group("optimisation")
    train.add_argument("--per_device_train_batch_size", type=int, default=4)
    train.add_argument("--per_device_eval_batch_size", type=int, default=None)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--num_train_epochs", type=float, default=3)
    train.add_argument(
        "--max_train_steps", type=int, default=None, help="overrides epochs; 0 saves the initial adapter"
    )
    train.add_argument("--learning_rate", type=float, default=3e-4)
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    train.add_argument(
        "--adam_epsilon",
        type=float,
        default=1e-8,
        help="AdamW's epsilon: under DP, near the noise's per-coordinate scale (sigma C / B) it damps "
        "coordinates the noise dominates",
    )
    train.add_argument(
        "--adam_beta1",
        type=float,
        default=0.9,
        help="AdamW's momentum: under DP with few steps, momentum carries each step's noise into the "
        "later steps; 0 moves by every step's gradient once",
    )
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's second-moment decay")
    train.add_argument("--lr_scheduler_type", type=SchedulerType, default="linear", choices=list(SchedulerType))
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument(
        "--seed", type=int, default=42, help="adapter initialisation and data order of evaluation; never the DP noise"
    )
    add_privacy_args(p)
    multi = p.add_argument_group("multi-process (see docs/distributed.md)")
    multi.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the frozen base with FSDP (automatic under an FSDP "
        "accelerate config; this flag is for CPU tests under torchrun)",
    )
    multi.add_argument(
        "--debug_sync_check",
        type=int,
        default=0,
        metavar="N",
        help="every N steps check that all processes hold identical adapters (0: off)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output_dir", required=True, help="the release: the finished adapter and reports, and the tracker"
    )
    out.add_argument(
        "--work_dir",
        default=None,
        help="working state, never published: checkpoints, scratch, curator-only files "
        "(default: OUTPUT_DIR.work, beside it on the same file system)",
    )
    out.add_argument("--eval_freq", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    out.add_argument("--with_tracking", action="store_true")
    out.add_argument("--report_to", choices=["tensorboard", "wandb", "all"], default="tensorboard")
    out.add_argument("--checkpointing_steps", type=int, default=0, help="save a resumable checkpoint every N steps")
    out.add_argument(
        "--resume_from_checkpoint",
        default=None,
        metavar="PATH|latest",
        help="continue from WORK_DIR/checkpoints/step_N (latest: the newest one, if any); a checkpoint of "
        "another run forks it into this --output_dir",
    )
    args = p.parse_args(argv)
    # the privacy flags' one home: typed and checked together, then read from args.privacy only
    args.privacy = privacy_arguments(args)
    for name in vars(args.privacy):
        delattr(args, name)
    validate_args(args)
    args.work_dir = args.work_dir or default_work_dir(args.output_dir)
    return args


def validate_args(args):
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "block_size", "lora_r"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 0:
        raise UserInputError(f"--max_train_steps {args.max_train_steps}: must be >= 0")
    if not args.num_train_epochs >= 0:
        raise UserInputError(f"--num_train_epochs {args.num_train_epochs}: must be >= 0")
    if args.per_device_eval_batch_size is not None and args.per_device_eval_batch_size < 1:
        raise UserInputError(f"--per_device_eval_batch_size {args.per_device_eval_batch_size}: must be at least 1")
    if not args.adam_epsilon > 0:
        raise UserInputError(f"--adam_epsilon {args.adam_epsilon}: must be positive")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise UserInputError(f"--{name} {getattr(args, name)}: must be in [0, 1)")
    if args.debug_sync_check < 0:
        raise UserInputError(f"--debug_sync_check {args.debug_sync_check}: must be >= 0")
    if args.validation_noise_multiplier is not None:
        if not args.validation_noise_multiplier > 0:
            raise UserInputError(f"--validation_noise_multiplier {args.validation_noise_multiplier}: must be positive")
        if args.validation_is_public:
            raise UserInputError("--validation_noise_multiplier is for validation data that is not public: drop one")
    elif args.validation_file and not args.validation_is_public:
        raise UserInputError(
            f"--validation_file {args.validation_file}: its exact loss and perplexity are published, so it must be "
            "data you may disclose; pass --validation_is_public if it is, or --validation_noise_multiplier for a "
            "private validation loss"
        )


def main(argv=None):
    args = parse_args(argv)
    log_with = (
        (["tensorboard", "wandb"] if args.report_to == "all" else [args.report_to]) if args.with_tracking else None
    )
    # cpu=True where no GPU exists: otherwise a multi-process launch (accelerate, torchrun) leaves
    # every process alone in a one-process job (docs/DESIGN.md 5)
    folders = ProjectConfiguration(project_dir=args.work_dir, logging_dir=tracker_dir(args.output_dir))
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), log_with=log_with, project_config=folders)
    set_seed(args.seed)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.work_dir)
    on_main_process(lambda: check_folders(args.output_dir, args.work_dir, resuming=checkpoint is not None))
    run = setup(args, accelerator)
    try:
        if checkpoint:
            resume(run, checkpoint, accelerator)
        admit(args, run, accelerator)
        train(args, run, accelerator)
        save(args, run, accelerator)
    finally:
        if run.ledger:
            run.ledger.close()


# ---- setup ----------------------------------------------------------------------------------------


def setup(args, accelerator):
    """Data, model with LoRA, sampler, privacy plan, DP gradient, optimizer: everything a run holds."""
    say, privacy = accelerator.print, args.privacy
    token = access_token(args.access_token)
    tokenizer = load_tokenizer(args.model_name_or_path, token)
    raw = load_raw_datasets(
        args.dataset_name, args.train_file, args.validation_file, args.dataset_dir, privacy.privacy_unit_key
    )
    if "validation" in raw:  # its metrics are published exactly
        check_disjoint(
            raw["train"], raw["validation"], privacy.privacy_unit_key, args.validation_file or "validation split"
        )
    units = (
        privacy_units(raw["train"], privacy.privacy_unit_key, args.train_file or args.dataset_name)
        if privacy.privacy_unit_key
        else None
    )
    # process 0 keeps the privacy ledger; opened before the model loads, so a bad one stops the run at once
    ledger = on_main_process(lambda: PrivacyLedger(privacy.ledger_dir))
    unit_hashes = ledger.unit_hashes(unit_keys(raw["train"], privacy.privacy_unit_key)) if ledger else None
    on_main_process(lambda: check_same_file_system(args.output_dir, args.work_dir))
    # whole, 4-bit, or (FSDP) sharded with only this process's shards ever loaded; LoRA from --seed
    model = build_model(args, accelerator, token, say)
    with accelerator.main_process_first():
        tokenized = {split: tokenize_dataset(ds, tokenizer, args.block_size) for split, ds in raw.items()}
    train_set, eval_set = tokenized["train"], tokenized.get("validation")
    truncated = sum(train_set["truncated"])
    if truncated:  # console only: an exact count over the private data
        say(
            f"note: {truncated} of {len(train_set)} training records exceed --block_size {args.block_size} "
            "and were truncated"
        )
    if eval_set is None:
        say("note: no validation data (--validation_file or a validation split): evaluation skipped")
    model.train()
    validation = private_validation(args, raw.get("validation"), privacy.loss_clip or uniform_guess_loss(model))

    randomness = DPRandomness(privacy.insecure_dp_seed)
    sampler = make_step_sampler(args, len(train_set), units, accelerator, randomness)
    planned = sampler.steps_for(args.max_train_steps, args.num_train_epochs)
    plan = make_privacy_plan(privacy, sampler, planned, uniform_guess_loss(model), say)
    say(plan.plan_line())
    dp_gradient = DPGradient.from_plan(model, plan, randomness)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, args, plan.steps)
    log = StepLog(plan)
    state = TrainingState(model, optimizer, scheduler, plan.accountant, log.history)
    state.run_facts = {
        "dataset_size": sampler.n,  # privacy units: records, or units under --privacy_unit_key
        "expected_batch_size": sampler.expected_batch_size,
        "sampling": privacy.sampling,
        "total_steps": plan.steps,
        "private": plan.private,
        "train_loss": plan.train_loss,
    }
    state.run_id, state.session_id = on_main_process(lambda: (new_id(), new_id()), share=True)
    accelerator.register_for_checkpointing(state)
    return SimpleNamespace(
        ledger=ledger,
        unit_hashes=unit_hashes,
        model=model,
        params=params,
        sampler=sampler,
        plan=plan,
        dp_gradient=dp_gradient,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        log=log,
        eval_set=eval_set,
        collator=Collator(train_set, tokenizer.pad_token_id),
        eval_collator=Collator(eval_set, tokenizer.pad_token_id) if eval_set is not None else None,
        eval_batch=args.per_device_eval_batch_size or args.per_device_train_batch_size,
        validation=validation,
    )


def make_step_sampler(args, num_records, units, accelerator, randomness):
    """Records (Poisson or shuffle), or privacy units of several records under --privacy_unit_key."""
    privacy = args.privacy
    layout = (args.per_device_train_batch_size, args.gradient_accumulation_steps, accelerator.num_processes)
    sampler = make_sampler(
        privacy.sampling,
        num_records,
        *layout,
        accelerator.process_index,
        randomness,
        units=units,
        max_records_per_unit=privacy.max_records_per_unit,
    )
    beyond = sampler.records_beyond_cap()
    if beyond:  # console only: an exact statistic of the private data
        accelerator.print(
            f"note: {beyond} of {num_records} records are beyond --max_records_per_unit "
            f"{privacy.max_records_per_unit} in their unit; each step uses a random {privacy.max_records_per_unit}"
        )
    return sampler


def admit(args, run, accelerator):
    """This session on the privacy ledger (process 0) before it touches any data; then the tracker."""
    discarded, steps = on_main_process(lambda: admit_to_ledger(args, run, accelerator.print), share=True)
    run.plan.discarded_steps, run.plan.steps = discarded, steps
    if args.with_tracking:
        wandb_folder = {"wandb": {"dir": tracker_dir(args.output_dir)}}
        accelerator.init_trackers("dp_lora_finetuning", tracker_config(args), init_kwargs=wandb_folder)
        # every TensorBoard row carries the session's start as its wall time: a step's duration grows
        # with its realised batch size, a statistic of the private sample (wandb keeps its own clock)
        run.tracker_kwargs = {"tensorboard": {"walltime": time.time()}}


def resume(run, checkpoint, accelerator):
    """Adapter, optimizer, scheduler, step and privacy spent so far, from a checkpoint of this run."""
    try:
        accelerator.load_state(checkpoint)
    except ValueError as err:
        raise UserInputError(f"--resume_from_checkpoint {checkpoint}: {err}") from None
    spent = f" (epsilon spent so far {run.plan.epsilon():.4g})" if run.plan.private else ""
    accelerator.print(f"resumed from {checkpoint} at step {run.state.step}{spent}")


# ---- train ----------------------------------------------------------------------------------------


def run_eval(run, accelerator):
    if run.eval_set is None:
        return {}
    if run.validation is None:  # public validation data: exact
        return evaluate(run.model, run.eval_set, run.eval_collator, run.eval_batch, accelerator)
    validation = run.validation
    validation.evaluations += 1
    if validation.admitted:  # on the ledger before it reads the data
        validation.admitted.record_step(validation.evaluations)
    std, like = validation.noise_multiplier * validation.loss_clip, torch.zeros(1, dtype=torch.float64)
    noise = lambda: run.dp_gradient.noise((1,), std, "validation_noise", run.state.step, like)  # noqa: E731
    return evaluate_private(run.model, run.eval_set, run.eval_collator, run.eval_batch, accelerator, validation, noise)


def train(args, run, accelerator):
    total, plan, say = run.plan.steps, run.plan, accelerator.print
    bar = tqdm(
        range(run.state.step, total),
        initial=run.state.step,
        total=total,
        disable=not accelerator.is_local_main_process,
        desc="training",
    )
    reseed_public_generators(args.seed, run.state.step)
    for step in bar:
        if run.ledger:  # on disk before the step touches any data, so before anything it produces
            run.ledgered.record_step(step + 1)
        stats = train_logical_step(
            run.model, run.sampler.record_batches(step), run.collator, run.dp_gradient, accelerator, step
        )
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if args.debug_sync_check and (step + 1) % args.debug_sync_check == 0:
            assert_replicas_agree(run.params, step + 1)
        if stats.nonfinite:  # console only: the count is an exact statistic of the sample
            say(f"note: step {step + 1}: {stats.nonfinite} records had a non-finite gradient and contributed zero")
        row = run.log.add(step + 1, stats, run.scheduler.get_last_lr()[0])
        if args.eval_freq and (step + 1) % args.eval_freq == 0 and step + 1 < total:
            metrics = run_eval(run, accelerator)
            row.update(metrics)
            if metrics:
                say(
                    f"step {step + 1}: eval_loss {metrics['eval_loss']:.4f} perplexity {metrics['eval_perplexity']:.2f}"
                    + (f" epsilon {plan.epsilon():.4g}" if plan.private else "")
                )
        reseed_public_generators(args.seed, step + 1)  # what a checkpoint saves is free of the data
        bar.set_postfix(run.log.postfix)
        if args.with_tracking:
            accelerator.log(row, step=step + 1, log_kwargs=run.tracker_kwargs)
        run.state.step = step + 1
        if args.checkpointing_steps and run.state.step % args.checkpointing_steps == 0 and run.state.step < total:
            save_checkpoint(accelerator, args.work_dir, run.state.step)


# ---- save -----------------------------------------------------------------------------------------


def save(args, run, accelerator):
    """Final evaluation, then the adapter and reports, moved into output_dir at once by process 0."""
    plan = run.plan
    metrics = run_eval(run, accelerator)
    epsilon = plan.published_epsilon()
    if metrics:
        accelerator.print(
            f"final: eval_loss {metrics['eval_loss']:.4f} perplexity {metrics['eval_perplexity']:.2f} "
            f"epsilon {plan.epsilon() if plan.private else 'inf'}"
        )
    if args.with_tracking:
        final = {**metrics, **({"epsilon": epsilon} if epsilon is not None else {})}
        accelerator.log(final, step=plan.steps, log_kwargs=run.tracker_kwargs)
        accelerator.end_training()
    report = plan.report(plan.steps, accelerator.num_processes)
    results = {
        "train_loss": run.log.last_released_loss,
        "eval_loss": metrics.get("eval_loss"),
        "eval_perplexity": metrics.get("eval_perplexity"),
        "epsilon": epsilon,
        "epsilon_replace_one": report["epsilon_replace_one"],
        "steps": plan.steps,
        **({"note": plan.caveat} if plan.caveat else {}),
    }
    run.dp_gradient.detach()
    if accelerator.is_main_process:
        report.update(ledger_report(args, run))
        accelerator.print(ledger_line(report))
        if run.log.exact:  # curator-only: working state, never the release
            os.makedirs(args.work_dir, exist_ok=True)
            write_json(os.path.join(args.work_dir, EXACT_LOG_FILE), run.log.exact)

        def write(folder):
            save_adapter(run.model, folder)
            write_json(os.path.join(folder, "privacy_report.json"), report)
            write_json(os.path.join(folder, "all_results.json"), results)
            write_json(os.path.join(folder, "training_log.json"), run.log.history)

        publish_outputs(args.output_dir, write, scratch_parent=args.work_dir)
        accelerator.print(f"saved adapter and reports to {args.output_dir}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_cli(main)
    end_process_group()  # gloo's threads still running at interpreter exit can abort a finished run
