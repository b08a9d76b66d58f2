"""Fine-tune a causal LM with LoRA adapters under (epsilon, delta)-differential privacy.

    accelerate launch --config_file accelerate_configs/cpu_1proc.cfg train_clm.py \
        --train_file data.json --model_name_or_path <model> --output_dir out \
        --per_device_train_batch_size 4 --gradient_accumulation_steps 64 \
        --clip_norm 1 --noise_multiplier 1.2 --num_train_epochs 5 --learning_rate 3e-4

Every privacy-relevant line lives in utils/ (dp_utils, accounting, data_utils' sampler).
"""

import argparse
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

from utils.accounting import (ACCOUNTANT_NAME, PrivacyAccountant, check_delta, compute_epsilon_rdp,
                              noise_multiplier_for_epsilon)
from utils.checkpoint_utils import TrainingState, resolve_checkpoint, save_checkpoint
from utils.data_utils import Collator, StepSampler, UserInputError, load_raw_datasets, planned_steps, tokenize_dataset
from utils.dp_utils import DPGradient, DPRandomness
from utils.fsdp_utils import assert_replicas_agree, fsdp_requested, shard_frozen_base
from utils.lora_utils import add_lora, parse_target_modules, save_adapter
from utils.model_utils import access_token, check_block_size, load_model, load_tokenizer, run_cli
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
    model.add_argument("--lora_target_modules", default=None, help="comma-separated names or one regex; default: attention linears")
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
    privacy = p.add_argument_group("privacy")
    privacy.add_argument("--clip_norm", type=float, default=1.0, help="per-example clipping norm C (<0: non-private)")
    privacy.add_argument("--noise_multiplier", type=float, default=None, help="sigma (<0: non-private)")
    privacy.add_argument("--target_epsilon", type=float, default=None, help="solve sigma for this epsilon over the planned steps")
    privacy.add_argument("--delta", type=float, default=1e-7)
    privacy.add_argument("--sampling", choices=["poisson", "shuffle"], default="poisson")
    privacy.add_argument("--insecure_dp_seed", type=int, default=None, help="TESTING ONLY: reproducible sampling and noise")
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
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "block_size", "lora_r"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.target_epsilon is not None and args.noise_multiplier is not None:
        raise UserInputError("--target_epsilon and --noise_multiplier exclude each other: give one")
    if args.target_epsilon is not None and args.clip_norm <= 0:
        raise UserInputError("--target_epsilon needs --clip_norm > 0")
    if args.target_epsilon is None and args.noise_multiplier is None:
        raise UserInputError("give --noise_multiplier or --target_epsilon (or --clip_norm -1 --noise_multiplier -1 for non-private)")
    if (args.clip_norm < 0) != (args.noise_multiplier is not None and args.noise_multiplier < 0):
        raise UserInputError("non-private mode needs both --clip_norm -1 and --noise_multiplier -1")
    if args.max_train_steps is not None and args.max_train_steps < 0:
        raise UserInputError(f"--max_train_steps {args.max_train_steps}: must be >= 0")
    if not (args.clip_norm > 0 or args.clip_norm < 0):  # 0 (or NaN) would silently train without privacy
        raise UserInputError(f"--clip_norm {args.clip_norm}: must be > 0 (or -1 for non-private training)")
    if args.target_epsilon is not None and not args.target_epsilon > 0:
        raise UserInputError(f"--target_epsilon {args.target_epsilon}: must be positive")
    if not 0 < args.delta < 1:
        raise UserInputError(f"--delta {args.delta}: must be in (0, 1)")
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
    model = load_model(args.model_name_or_path, accelerator.mixed_precision, token)
    check_block_size(args.block_size, model)
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
    if fsdp_requested(args.fsdp, accelerator):  # frozen base sharded, LoRA replicated (DESIGN.md 2.9)
        shard_frozen_base(model, accelerator.device, accelerator)
    else:
        model.to(accelerator.device)
    model.train()

    # ---- sampling, privacy budget, DP gradient ----
    private = args.clip_norm > 0
    randomness = DPRandomness(args.insecure_dp_seed)
    sampler = StepSampler(len(train_set), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                          accelerator.num_processes, accelerator.process_index, randomness, args.sampling)
    q, batch_size = sampler.sampling_rate, sampler.expected_batch_size
    total_steps = args.max_train_steps if args.max_train_steps is not None else planned_steps(
        args.num_train_epochs, len(train_set), batch_size, args.sampling)
    sigma = args.noise_multiplier
    accountant = None
    if private:
        try:
            check_delta(args.delta, len(train_set))
            if args.target_epsilon is not None:
                sigma = noise_multiplier_for_epsilon(args.target_epsilon, q, total_steps, args.delta)
        except ValueError as err:
            raise UserInputError(str(err)) from None
        accountant = PrivacyAccountant(sigma, q, args.delta)
        if args.target_epsilon is not None:  # defence in depth: never step past the budget
            allowed = accountant.steps_within(args.target_epsilon, total_steps)
            if allowed < total_steps:
                say(f"warning: only {allowed} of {total_steps} steps fit in --target_epsilon {args.target_epsilon:g}")
                total_steps = allowed
        say(f"privacy plan: epsilon {accountant.epsilon(total_steps):.4g} at delta {args.delta:g} "
            f"(sigma {sigma:.4g}, q {q:.4g}, {total_steps} steps, expected batch {batch_size}, {args.sampling} sampling)")
        if sigma == 0:
            say("warning: --noise_multiplier 0 clips without noise: epsilon is infinite")
    else:
        say(f"non-private training: epsilon = infinity ({total_steps} steps, expected batch {batch_size})")
    dp_gradient = DPGradient(model, args.clip_norm, sigma if private else -1, batch_size, randomness)

    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=0.0, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=max(total_steps, 1))
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
    history = []
    state = TrainingState(model, optimizer, scheduler, accountant, history)
    state.run_facts = {"dataset_size": len(train_set), "expected_batch_size": batch_size, "sampling": args.sampling,
                       "total_steps": total_steps, "private": private}
    accelerator.register_for_checkpointing(state)
    checkpoint = resolve_checkpoint_or_fail(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        try:
            accelerator.load_state(checkpoint)
        except ValueError as err:
            raise UserInputError(f"--resume_from_checkpoint {checkpoint}: {err}") from None
        say(f"resumed from {checkpoint} at step {state.step}"
            + (f" (epsilon spent so far {accountant.epsilon():.4g})" if accountant else ""))

    # ---- train ----
    def run_eval():
        return evaluate(model, eval_set, eval_collator, eval_batch, accelerator) if eval_set is not None else {}

    def epsilon_now():
        return accountant.epsilon() if accountant else math.inf

    bar = tqdm(range(state.step, total_steps), initial=state.step, total=total_steps,
               disable=not accelerator.is_local_main_process, desc="training")
    train_loss, metrics, postfix = float("nan"), {}, {}
    for step in bar:
        loss_sum, records = train_logical_step(model, sampler.micro_batches(step), collator, dp_gradient,
                                               accelerator, step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if args.debug_sync_check and (step + 1) % args.debug_sync_check == 0:
            assert_replicas_agree(params, step + 1)
        if accountant:
            accountant.step()
        train_loss = float(loss_sum / max(records, 1))
        log = {"train_loss": train_loss, "lr": scheduler.get_last_lr()[0], "batch_size": int(records)}
        if accountant and (step % 10 == 0 or step == total_steps - 1):
            log["epsilon"] = epsilon_now()
            postfix["eps"] = f"{log['epsilon']:.3f}"
        postfix.update(loss=f"{train_loss:.4f}", lr=f"{log['lr']:.2e}")
        bar.set_postfix(postfix)
        if args.eval_freq and (step + 1) % args.eval_freq == 0 and step + 1 < total_steps:
            metrics = run_eval()
            log.update(metrics)
            if metrics:
                say(f"step {step + 1}: eval_loss {metrics['eval_loss']:.4f} perplexity {metrics['eval_perplexity']:.2f} "
                    f"epsilon {epsilon_now():.4g}")
        history.append({"step": step + 1, **log})
        if args.with_tracking:
            accelerator.log(log, step=step + 1)
        state.step = step + 1
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0 and state.step < total_steps:
            save_checkpoint(accelerator, args.output_dir, state.step)

    metrics = run_eval()
    epsilon = accountant.epsilon() if accountant else None
    if metrics:
        say(f"final: eval_loss {metrics['eval_loss']:.4f} perplexity {metrics['eval_perplexity']:.2f} "
            f"epsilon {epsilon if epsilon is not None else 'inf'}")
    if args.with_tracking:
        accelerator.log({**metrics, **({"epsilon": epsilon} if epsilon is not None else {})}, step=total_steps)
        accelerator.end_training()

    # ---- save (the adapter is replicated: process 0 writes it) ----
    report = privacy_report(args, accountant, sigma, sampler, len(train_set), total_steps, accelerator.num_processes)
    results = {"train_loss": train_loss, "eval_loss": metrics.get("eval_loss"),
               "eval_perplexity": metrics.get("eval_perplexity"), "epsilon": epsilon, "steps": total_steps}
    dp_gradient.detach()
    if accelerator.is_main_process:
        def write(folder):
            save_adapter(model, folder)
            write_json(os.path.join(folder, "privacy_report.json"), report)
            write_json(os.path.join(folder, "all_results.json"), results)
            write_json(os.path.join(folder, "training_log.json"), history)
        publish_outputs(args.output_dir, write)
        say(f"saved adapter and reports to {args.output_dir}")
    accelerator.wait_for_everyone()


def resolve_checkpoint_or_fail(value, output_dir):
    if value is None:
        return None
    try:
        return resolve_checkpoint(value, output_dir)
    except ValueError as err:
        raise UserInputError(str(err)) from None


def privacy_report(args, accountant, sigma, sampler, dataset_size, steps, num_processes):
    private = accountant is not None
    report = {
        "epsilon": accountant.epsilon(steps) if private else None,
        "epsilon_rdp": compute_epsilon_rdp(sigma, sampler.sampling_rate, steps, args.delta) if private else None,
        "delta": args.delta if private else None,
        "noise_multiplier": sigma if private else None,
        "clip_norm": args.clip_norm if private else None,
        "target_epsilon": args.target_epsilon,
        "sampling": args.sampling,
        "sampling_rate": sampler.sampling_rate,
        "expected_batch_size": sampler.expected_batch_size,
        "dataset_size": dataset_size,
        "steps": steps,
        "accountant": ACCOUNTANT_NAME if private else None,
        "num_processes": num_processes,
        "noise_seed": "insecure (--insecure_dp_seed)" if args.insecure_dp_seed is not None else "os",
    }
    if not private:
        report["note"] = "non-private training: epsilon is infinite"
    elif sigma == 0:
        report["note"] = "noise multiplier 0: clipping only, epsilon is infinite"
    elif args.sampling == "shuffle":
        report["note"] = ("epsilon is computed for Poisson sampling; this run used shuffled fixed-size "
                          "batches, for which it is not a proven guarantee")
    return report


if __name__ == "__main__":
    run_cli(main)
