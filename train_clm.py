"""Fine-tune a causal LM with LoRA adapters under (epsilon, delta)-differential privacy.

    accelerate launch --config_file accelerate_configs/cpu_1proc.cfg train_clm.py \
        --train_file data.json --model_name_or_path <model> --output_dir out \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 64 \
        --clip_norm 1 --noise_multiplier 1.2 --num_train_epochs 5 --learning_rate 3e-4

Every privacy-relevant line lives in utils/ (dp_utils, accounting, data_utils' sampler).
"""

import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

from utils.checkpoint_utils import TrainingState, refuse_finished_run, resolve_checkpoint, run_folder, save_checkpoint
from utils.data_utils import Collator, StepSampler, UserInputError, load_raw_datasets, planned_steps, tokenize_dataset
from utils.dp_utils import DPGradient, DPRandomness
from utils.fsdp_utils import assert_replicas_agree, fsdp_requested, shard_frozen_base
from utils.lora_utils import add_lora, lora_summary, parse_target_modules, save_adapter
from utils.model_utils import (access_token, check_block_size, disable_base_dropout, load_model, load_tokenizer,
                               run_cli, uniform_guess_loss)
from utils.privacy import EXACT_LOG_FILE, add_privacy_args, make_privacy_plan, validate_privacy_args
from utils.train_utils import evaluate, publish_outputs, train_logical_step, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None, help="pubmed_generation: the built PubMed abstracts")
    data.add_argument("--dataset_dir", default=None, help="folder of the built PubMed data set")
    data.add_argument("--train_file", default=None, help="JSON {instruction: [...], answer: [...]} or JSON Lines")
    data.add_argument("--validation_file", default=None, help="same format; default: the data set's validation split")
    data.add_argument("--block_size", type=int, default=512, help="max tokens per record (longer ones are truncated)")
    model = p.add_argument_group("model and LoRA")
    model.add_argument("--model_name_or_path", required=True)
    model.add_argument("--access_token", default=None, help="hub token; prefer the HF_TOKEN environment variable")
    model.add_argument("--gradient_ckpt", action="store_true", help="activation checkpointing (less memory, slower)")
    model.add_argument("--lora_r", type=int, default=16)
    model.add_argument("--lora_alpha", type=float, default=16)
    model.add_argument("--lora_dropout", type=float, default=0.0)
    model.add_argument("--lora_target_modules", default=None,
                       help="comma-separated names, one regex or all-linear; default: the attention linears")
    model.add_argument("--keep_base_dropout", action="store_true", help="keep the base model's dropout (default: off)")
    train = p.add_argument_group("optimisation")
    train.add_argument("--per_device_train_batch_size", type=int, default=4)
    train.add_argument("--per_device_eval_batch_size", type=int, default=None)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--num_train_epochs", type=float, default=3)
    train.add_argument("--max_train_steps", type=int, default=None, help="overrides epochs; 0 saves the initial adapter")
    train.add_argument("--learning_rate", type=float, default=3e-4)
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    train.add_argument("--lr_scheduler_type", type=SchedulerType, default="linear", choices=list(SchedulerType))
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--seed", type=int, default=42, help="adapter initialisation and data order of evaluation; never the DP noise")
    add_privacy_args(p)
    multi = p.add_argument_group("multi-process (see README: Multi-GPU, FSDP and CPU configs)")
    multi.add_argument("--fsdp", action="store_true", help="shard the frozen base with FSDP (automatic under an FSDP "
                       "accelerate config; this flag is for CPU tests under torchrun)")
    multi.add_argument("--debug_sync_check", type=int, default=0, metavar="N",
                       help="every N steps check that all processes hold identical adapters (0: off)")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument("--eval_freq", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    out.add_argument("--with_tracking", action="store_true")
    out.add_argument("--report_to", choices=["tensorboard", "wandb", "all"], default="tensorboard")
    out.add_argument("--checkpointing_steps", type=int, default=0, help="save a resumable checkpoint every N steps")
    out.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|latest",
                     help="continue from output_dir/checkpoints/step_N (latest: the newest one, if any)")
    args = p.parse_args(argv)
    validate_args(args)
    return args


def validate_args(args):
    validate_privacy_args(args)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "block_size", "lora_r"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 0:
        raise UserInputError(f"--max_train_steps {args.max_train_steps}: must be >= 0")
    if not args.num_train_epochs >= 0:
        raise UserInputError(f"--num_train_epochs {args.num_train_epochs}: must be >= 0")
    if args.per_device_eval_batch_size is not None and args.per_device_eval_batch_size < 1:
        raise UserInputError(f"--per_device_eval_batch_size {args.per_device_eval_batch_size}: must be at least 1")
    if args.debug_sync_check < 0:
        raise UserInputError(f"--debug_sync_check {args.debug_sync_check}: must be >= 0")


def main(argv=None):
    args = parse_args(argv)
    log_with = (["tensorboard", "wandb"] if args.report_to == "all" else [args.report_to]) if args.with_tracking else None
    # cpu=True where no GPU exists: otherwise a multi-process launch (accelerate, torchrun) leaves
    # every process alone in a one-process job (DESIGN.md 5)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), log_with=log_with, project_dir=args.output_dir)
    set_seed(args.seed)
    say = accelerator.print

    # ---- data and model ----
    token = access_token(args.access_token)
    tokenizer = load_tokenizer(args.model_name_or_path, token)
    raw = load_raw_datasets(args.dataset_name, args.train_file, args.validation_file, args.dataset_dir)
    checkpoint = resolve_checkpoint_or_fail(args.resume_from_checkpoint, args.output_dir)  # before any work
    model = load_model(args.model_name_or_path, accelerator.mixed_precision, token)
    check_block_size(args.block_size, model)
    dropped = {} if args.keep_base_dropout else disable_base_dropout(model)
    if dropped:
        say(f"base model dropout off ({', '.join(f'{k} {v:g}' for k, v in dropped.items())}); --keep_base_dropout keeps it")
    with accelerator.main_process_first():
        tokenized = {split: tokenize_dataset(ds, tokenizer, args.block_size) for split, ds in raw.items()}
    train_set = tokenized["train"]
    truncated = sum(train_set["truncated"])
    if truncated:
        say(f"note: {truncated} of {len(train_set)} training records exceed --block_size {args.block_size} and were truncated")
    if args.gradient_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout,
                     parse_target_modules(args.lora_target_modules), seed=args.seed)
    say(lora_summary(model))
    if fsdp_requested(args.fsdp, accelerator):  # frozen base sharded, LoRA replicated (DESIGN.md 2.9)
        shard_frozen_base(model, accelerator.device, accelerator)
    else:
        model.to(accelerator.device)
    model.train()

    # ---- sampling, privacy plan, DP gradient ----
    randomness = DPRandomness(args.insecure_dp_seed)
    sampler = StepSampler(len(train_set), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                          accelerator.num_processes, accelerator.process_index, randomness, args.sampling)
    planned = args.max_train_steps if args.max_train_steps is not None else planned_steps(
        args.num_train_epochs, len(train_set), sampler.expected_batch_size, args.sampling)
    plan = make_privacy_plan(args, len(train_set), sampler.sampling_rate, sampler.expected_batch_size, planned,
                             uniform_guess_loss(model), say)
    say(plan.plan_line())
    total_steps = plan.steps
    dp_gradient = DPGradient(model, args.clip_norm, plan.noise_multiplier if plan.private else -1,
                             sampler.expected_batch_size, randomness, loss_clip=plan.loss_clip,
                             loss_noise_multiplier=plan.loss_noise_multiplier, secure_noise=args.secure_noise,
                             accountant=plan.accountant)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, args, total_steps)
    collator = Collator(train_set, tokenizer.pad_token_id)
    eval_set = tokenized.get("validation")
    eval_collator = Collator(eval_set, tokenizer.pad_token_id) if eval_set is not None else None
    eval_batch = args.per_device_eval_batch_size or args.per_device_train_batch_size
    if eval_set is None:
        say("note: no validation data (--validation_file or a validation split): evaluation skipped")
    if args.with_tracking:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
                  if k != "access_token"}
        accelerator.init_trackers("dp_lora_finetuning", config)

    # ---- resume: adapter, optimizer, scheduler, step and privacy spent so far ----
    history, exact_history = [], []  # the released log; the curator-only exact losses (--train_loss exact)
    state = TrainingState(model, optimizer, scheduler, plan.accountant, history)
    state.run_facts = {"dataset_size": len(train_set), "expected_batch_size": sampler.expected_batch_size,
                       "sampling": args.sampling, "total_steps": total_steps, "private": plan.private,
                       "train_loss": plan.train_loss}
    accelerator.register_for_checkpointing(state)
    if checkpoint:
        try:
            accelerator.load_state(checkpoint)
        except ValueError as err:
            raise UserInputError(f"--resume_from_checkpoint {checkpoint}: {err}") from None
        say(f"resumed from {checkpoint} at step {state.step}"
            + (f" (epsilon spent so far {plan.epsilon():.4g})" if plan.private else ""))

    # ---- train ----
    def run_eval():
        return evaluate(model, eval_set, eval_collator, eval_batch, accelerator) if eval_set is not None else {}

    bar = tqdm(range(state.step, total_steps), initial=state.step, total=total_steps,
               disable=not accelerator.is_local_main_process, desc="training")
    train_loss, metrics, postfix = None, {}, {}
    for step in bar:
        stats = train_logical_step(model, sampler.micro_batches(step), collator, dp_gradient, accelerator, step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if args.debug_sync_check and (step + 1) % args.debug_sync_check == 0:
            assert_replicas_agree(params, step + 1)
        if stats.nonfinite:  # console only: the count is an exact statistic of the sample
            say(f"note: step {step + 1}: {stats.nonfinite} records had a non-finite gradient and contributed zero")
        train_loss = stats.exact_loss if not plan.private else stats.released_loss
        log = {"lr": scheduler.get_last_lr()[0]}
        if train_loss is not None:
            log["train_loss"] = train_loss
            postfix["loss"] = f"{train_loss:.4f}"
        if plan.train_loss == "exact" and plan.private:
            exact_history.append({"step": step + 1, "exact_train_loss": stats.exact_loss, "records": stats.records})
            postfix["exact loss (not private)"] = f"{stats.exact_loss:.4f}"
        if plan.private and (step % 10 == 0 or step == total_steps - 1):
            log["epsilon"] = plan.epsilon()
            postfix["eps"] = f"{log['epsilon']:.3f}"
        postfix["lr"] = f"{log['lr']:.2e}"
        bar.set_postfix(postfix)
        if args.eval_freq and (step + 1) % args.eval_freq == 0 and step + 1 < total_steps:
            metrics = run_eval()
            log.update(metrics)
            if metrics:
                say(f"step {step + 1}: eval_loss {metrics['eval_loss']:.4f} perplexity {metrics['eval_perplexity']:.2f}"
                    + (f" epsilon {plan.epsilon():.4g}" if plan.private else ""))
        history.append({"step": step + 1, **log})
        if args.with_tracking:
            accelerator.log(log, step=step + 1)
        state.step = step + 1
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0 and state.step < total_steps:
            save_checkpoint(accelerator, args.output_dir, state.step)

    metrics = run_eval()
    epsilon = plan.epsilon()
    if metrics:
        say(f"final: eval_loss {metrics['eval_loss']:.4f} perplexity {metrics['eval_perplexity']:.2f} "
            f"epsilon {epsilon if epsilon is not None else 'inf'}")
    if args.with_tracking:
        accelerator.log({**metrics, **({"epsilon": epsilon} if epsilon is not None else {})}, step=total_steps)
        accelerator.end_training()

    # ---- save (the adapter is replicated: process 0 writes it) ----
    report = plan.report(total_steps, accelerator.num_processes)
    results = {"train_loss": train_loss,
               "eval_loss": metrics.get("eval_loss"), "eval_perplexity": metrics.get("eval_perplexity"),
               "epsilon": epsilon, "epsilon_replace_one": report["epsilon_replace_one"], "steps": total_steps,
               **({"note": plan.caveat} if plan.caveat else {})}
    dp_gradient.detach()
    if accelerator.is_main_process:
        def write(folder):
            save_adapter(model, folder)
            write_json(os.path.join(folder, "privacy_report.json"), report)
            write_json(os.path.join(folder, "all_results.json"), results)
            write_json(os.path.join(folder, "training_log.json"), history)
            if exact_history:
                write_json(os.path.join(folder, EXACT_LOG_FILE), exact_history)
        publish_outputs(args.output_dir, write)
        say(f"saved adapter and reports to {args.output_dir}")
    accelerator.wait_for_everyone()


def build_optimizer(params, args, total_steps):
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=0.0, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=max(total_steps, 1))
    return optimizer, scheduler


def resolve_checkpoint_or_fail(value, output_dir):
    """The checkpoint folder to resume from (None: start fresh); a finished run is never resumed."""
    if value is None:
        return None
    try:
        checkpoint = resolve_checkpoint(value, output_dir)
        for run_dir in {output_dir, run_folder(checkpoint) if checkpoint else output_dir}:
            refuse_finished_run(run_dir)
        return checkpoint
    except ValueError as err:
        raise UserInputError(str(err)) from None


if __name__ == "__main__":
    run_cli(main)
