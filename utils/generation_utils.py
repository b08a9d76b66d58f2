"""Generation shared by the two inference scripts: arguments, model loading, batched sampling
sharded over processes, and append-and-resume-safe output.

Output protocol in --output_dir (all writes are appends of whole batches, flushed and fsynced):

    generation_run.json        the arguments and a fingerprint of the prompts; a rerun must match it
    generations.part-<k>.jsonl one line per finished prompt of process k: its global index, its batch,
                               the attempt that wrote it, and the record
    generations.jsonl          at the end: every record in prompt order, written at once (tmp + rename),
                               after which the part files are removed
    generation_info.json       number of processes, timing, throughput

Prompts are cut into global batches of --batch_size in order of token length (prompt order among
equal lengths: a data set's identical prompts keep theirs); batch b goes to process b mod P and is
sampled after torch.manual_seed(seed + b x batch size), so the output does not depend on the
number of processes, and a resumed run regenerates exactly the batches an interrupted one had not
finished (a batch counts as finished only when all its lines are present).
"""

import copy
import glob
import hashlib
import json
import os
import time
import uuid

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from utils.cli import UserInputError
from utils.data_utils import encode_prompt
from utils.io_utils import write_json, write_text
from utils.lora_utils import load_adapter
from utils.model.model_utils import access_token, context_length, load_model, load_tokenizer

OUTPUT_FILE = "generations.jsonl"
RUN_FILE = "generation_run.json"
INFO_FILE = "generation_info.json"
PART_PATTERN = "generations.part-*.jsonl"

# the arguments a resumed run must share with the interrupted one
RUN_ARGS = [
    "model_name_or_path",
    "lora_weights_path",
    "merge_lora",
    "batch_size",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "max_length",
    "max_new_tokens",
    "seed",
    "greedy",
]


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def add_generation_args(parser):
    g = parser.add_argument_group("model and generation")
    g.add_argument("--model_name_or_path", required=True)
    g.add_argument(
        "--lora_weights_path",
        default=None,
        help="a PEFT adapter folder or a lora_weights.bin (adapter_config.json beside it); none: the base model",
    )
    g.add_argument("--merge_lora", action="store_true", help="merge the adapter into the base weights (faster)")
    g.add_argument("--access_token", default=None, help="hub token; prefer the HF_TOKEN environment variable")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call on each process")
    g.add_argument("--temperature", type=float, default=1.0, help="0 means greedy decoding")
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature, top_k, top_p)")
    g.add_argument("--max_length", type=int, default=512, help="tokens per sequence, prompt included")
    g.add_argument(
        "--max_new_tokens", type=int, default=None, help="tokens generated per prompt (overrides --max_length)"
    )
    g.add_argument("--seed", type=int, default=42)
    return parser


def validate_generation_args(args):
    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserInputError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise UserInputError(f"--temperature {args.temperature}: must be >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        raise UserInputError(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.top_k < 0:
        raise UserInputError(f"--top_k {args.top_k}: must be >= 0 (0: no top-k filter)")
    if args.repetition_penalty <= 0:
        raise UserInputError(f"--repetition_penalty {args.repetition_penalty}: must be > 0")
    if args.merge_lora and not args.lora_weights_path:
        raise UserInputError("--merge_lora needs --lora_weights_path")
    if args.lora_weights_path and not os.path.exists(args.lora_weights_path):
        raise UserInputError(f"--lora_weights_path {args.lora_weights_path}: not found")
    if args.temperature == 0:
        args.greedy = True


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def load_generation_model(args, accelerator):
    """Tokenizer (left padding, no added tokens) and the base model with the adapter, in eval mode."""
    token = access_token(args.access_token)
    tokenizer = load_tokenizer(args.model_name_or_path, token, padding_side="left")
    model = load_model(args.model_name_or_path, accelerator.mixed_precision, token)
    if args.lora_weights_path:
        try:
            model = load_adapter(model, args.lora_weights_path)
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserInputError(
                f"--lora_weights_path {args.lora_weights_path}: cannot be loaded onto "
                f"--model_name_or_path {args.model_name_or_path} ({first})"
            ) from None
        if args.merge_lora:
            model = model.merge_and_unload()
    model.config.use_cache = True
    model.eval().to(accelerator.device)
    return model, tokenizer


def generation_config(args, model, tokenizer):
    base = model.generation_config
    settings = dict(
        max_new_tokens=1,
        use_cache=True,
        repetition_penalty=args.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=base.eos_token_id if base.eos_token_id is not None else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if args.greedy:
        settings.update(do_sample=False)
    else:
        settings.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return GenerationConfig(**settings)


def token_budgets(prompt_ids, args, model):
    """New tokens allowed for each prompt: --max_new_tokens, else --max_length minus the prompt,
    never beyond the model's context."""
    context = context_length(model)
    budgets = []
    for i, ids in enumerate(prompt_ids):
        budget = args.max_new_tokens if args.max_new_tokens is not None else args.max_length - len(ids)
        if context is not None:
            budget = min(budget, context - len(ids))
        if budget < 1:
            limit = "the model's context" if args.max_new_tokens is not None else f"--max_length {args.max_length}"
            raise UserInputError(f"prompt {i} has {len(ids)} tokens: {limit} leaves no room to generate")
        budgets.append(budget)
    return budgets


@torch.no_grad()
def generate_batch(model, tokenizer, prompt_ids, budgets, config):
    """Answers (new tokens only, specials skipped, the joining space removed) for one batch."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for k, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
        input_ids[k, width - len(ids) :] = torch.tensor(ids)
        attention_mask[k, width - len(ids) :] = 1
    config = copy.copy(config)
    config.max_new_tokens = max(budgets)
    out = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device), generation_config=config
    )
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    new = out[:, width:].cpu()
    # an answer ends at its first EOS (what follows is padding) or at its own budget
    ends = torch.isin(new, torch.tensor(eos)) | (torch.arange(new.shape[1]) >= torch.tensor(budgets)[:, None])
    lengths = torch.where(ends.any(1), ends.int().argmax(1), new.shape[1]).tolist()
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(new.tolist(), lengths)], skip_special_tokens=True)
    return [text[1:] if text.startswith(" ") else text for text in texts]


# ----------------------------------------------------------------------------------------------
# Resumable output
# ----------------------------------------------------------------------------------------------


def check_run(args, prompts, script):
    """Refuse to mix runs in one output folder. Returns (the run's settings, whether it is already complete)."""
    fingerprint = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    run = {
        "script": script,
        "batch_order": "prompt_length",
        **{k: getattr(args, k) for k in RUN_ARGS},
        "num_prompts": len(prompts),
        "prompts_sha256": fingerprint,
    }
    path = os.path.join(args.output_dir, RUN_FILE)
    complete = os.path.exists(os.path.join(args.output_dir, OUTPUT_FILE))
    previous = None
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
    started = complete or any(os.path.getsize(p) for p in glob.glob(os.path.join(args.output_dir, PART_PATTERN)))
    if started and previous != run:
        diff = [k for k in run if (previous or {}).get(k) != run[k]] if previous else ["unrecorded run"]
        what = "finished" if complete else "unfinished"
        raise UserInputError(
            f"--output_dir {args.output_dir}: holds the output of an {what} run with different "
            f"settings ({', '.join(diff)}); use another --output_dir, or the same arguments to resume"
        )
    return run, complete


def read_finished(output_dir):
    """{batch: [(index, record), ...]} of every batch some attempt finished (torn lines are ignored)."""
    groups = {}
    for part in sorted(glob.glob(os.path.join(output_dir, PART_PATTERN))):
        with open(part) as f:
            for line in f:
                try:
                    row = json.loads(line)
                    key = (row["attempt"], row["batch"])
                except (ValueError, KeyError, TypeError):
                    continue
                groups.setdefault(key, []).append(row)
    finished = {}
    for (_, batch), rows in sorted(groups.items()):
        if batch not in finished and len({r["index"] for r in rows}) == rows[0]["batch_size"] == len(rows):
            finished[batch] = [(r["index"], {"instruction": r["instruction"], "answer": r["answer"]}) for r in rows]
    return finished


class PartWriter:
    """This process's part file: whole batches appended, flushed and fsynced."""

    def __init__(self, output_dir, process_index):
        self.path = os.path.join(output_dir, f"generations.part-{process_index}.jsonl")
        self.attempt = uuid.uuid4().hex
        self.file = open(self.path, "a+b")
        self.file.seek(0, os.SEEK_END)
        if self.file.tell() > 0:  # a torn last line from a killed run must not swallow the next one
            self.file.seek(-1, os.SEEK_END)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")

    def append(self, batch, indices, records):
        lines = [
            json.dumps({"index": i, "batch": batch, "batch_size": len(indices), "attempt": self.attempt, **r})
            for i, r in zip(indices, records)
        ]
        self.file.write(("\n".join(lines) + "\n").encode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def merge_parts(output_dir, num_prompts, num_batches):
    finished = read_finished(output_dir)
    missing = [b for b in range(num_batches) if b not in finished]
    if missing:
        raise RuntimeError(f"{output_dir}: batches {missing[:5]} have no complete output; rerun to resume")
    records = sorted(row for rows in finished.values() for row in rows)
    assert [i for i, _ in records] == list(range(num_prompts))
    path = os.path.join(output_dir, OUTPUT_FILE)
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for _, record in records))
    for part in glob.glob(os.path.join(output_dir, PART_PATTERN)):
        os.remove(part)
    return path


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------


def generate_to_file(prompts, run, model, tokenizer, args, accelerator):
    """Generate one answer per prompt into output_dir/generations.jsonl, resuming finished batches."""
    out_dir = args.output_dir
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    budgets = token_budgets(prompt_ids, args, model)
    config = generation_config(args, model, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    if accelerator.is_main_process:  # recorded once the inputs are known to be good
        write_json(os.path.join(out_dir, RUN_FILE), run)
    # batches of prompts of similar length pad less; the order depends on the prompts alone, so
    # every process and every resumed attempt forms the same batches
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    starts = list(range(0, len(prompts), args.batch_size))
    finished = read_finished(out_dir)
    accelerator.wait_for_everyone()  # everyone has read the parts before anyone appends
    mine = [b for b in range(len(starts)) if b % accelerator.num_processes == accelerator.process_index]
    todo = [b for b in mine if b not in finished]
    if finished:
        accelerator.print(
            f"resuming: {sum(len(r) for r in finished.values())} of {len(prompts)} generations already done"
        )

    size = lambda b: min(args.batch_size, len(prompts) - starts[b])  # noqa: E731
    bar = tqdm(
        total=sum(size(b) for b in mine),
        initial=sum(size(b) for b in mine if b in finished),
        disable=not accelerator.is_local_main_process,
        desc="generating",
        unit="prompt",
    )
    writer = PartWriter(out_dir, accelerator.process_index)
    began, generated = time.time(), 0
    try:
        for b in todo:
            indices = order[starts[b] : starts[b] + size(b)]
            torch.manual_seed(args.seed + starts[b])  # per batch: independent of the process count
            answers = generate_batch(
                model, tokenizer, [prompt_ids[i] for i in indices], [budgets[i] for i in indices], config
            )
            writer.append(b, indices, [{"instruction": prompts[i], "answer": a} for i, a in zip(indices, answers)])
            generated += len(indices)
            bar.update(len(indices))
    finally:
        writer.close()
        bar.close()
    elapsed = time.time() - began

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = merge_parts(out_dir, len(prompts), len(starts))
        write_json(
            os.path.join(out_dir, INFO_FILE),
            {
                "num_prompts": len(prompts),
                "num_processes": accelerator.num_processes,
                "batch_size": args.batch_size,
                "generated_this_run_by_process_0": generated,
                "seconds_process_0": round(elapsed, 3),
                "prompts_per_second_process_0": round(generated / elapsed, 3) if elapsed > 0 else None,
            },
        )
        accelerator.print(f"wrote {len(prompts)} generations to {path}")
    accelerator.wait_for_everyone()
    return os.path.join(out_dir, OUTPUT_FILE)


def run_generation(prompts, args, script, accelerator):
    """Check the output folder, load the model, generate; the scripts' common main body."""
    if not prompts:
        raise UserInputError("no prompts to generate for")
    run, complete = check_run(args, prompts, script)
    if complete:
        accelerator.print(f"{os.path.join(args.output_dir, OUTPUT_FILE)} is already complete for these arguments")
        return os.path.join(args.output_dir, OUTPUT_FILE)
    model, tokenizer = load_generation_model(args, accelerator)
    return generate_to_file(prompts, run, model, tokenizer, args, accelerator)
