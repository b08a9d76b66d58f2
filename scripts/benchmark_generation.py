"""Tokens per second of the inference scripts' batched generation, at several batch sizes and thread counts.

    python -m scripts.benchmark_generation                      # SmolLM2-135M-Instruct, batch 1, 8, 32; 1 and 2 threads
    python -m scripts.benchmark_generation --batch_sizes 1,8,32,64 --threads 2 --json generation.json
    python -m scripts.benchmark_generation --lora_weights_path outputs/demo/dp --merge_lora

What is timed is utils.generation_utils.generate_batch, the call both inference scripts make per batch
(left-padded prompts, KV cache, sampling at temperature 1 and top-k 50 as their defaults), with
the PubMed prompt "Abstract:". Every sequence generates exactly --max_new_tokens tokens (EOS may
not end one early), so tokens/s = batch x new tokens / seconds per batch, prompt processing
included. Each (threads, batch) cell runs one untimed warm-up batch, then --repeats timed ones;
its median is reported with the CPU time other processes used meanwhile (a busy machine makes
2 threads slower than 1: see docs/performance.md, generation speed).
"""

import argparse
import copy
import os
import statistics
import time
from types import SimpleNamespace

import torch

from scripts.benchmark import busy_cpu_seconds
from utils.cli import DefaultsHelpFormatter, UserInputError, run_cli
from utils.data_utils import PUBMED_PROMPT, encode_prompt
from utils.io_utils import write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="default: models/SmolLM2-135M-Instruct")
    p.add_argument("--lora_weights_path", default=None, help="an adapter on top (unmerged unless --merge_lora)")
    p.add_argument("--merge_lora", action="store_true")
    p.add_argument("--batch_sizes", default="1,8,32")
    p.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        raise UserInputError("--batch_sizes and --threads take comma lists of whole numbers, e.g. 1,8,32") from None
    if min(args.batch_sizes + args.threads + [args.max_new_tokens, args.repeats]) < 1:
        raise UserInputError("batch sizes, thread counts, --max_new_tokens and --repeats must be at least 1")
    if args.merge_lora and not args.lora_weights_path:
        raise UserInputError("--merge_lora needs --lora_weights_path")
    return args


def load(args):
    """The model and tokenizer exactly as the inference scripts load them."""
    from accelerate import Accelerator

    from utils.generation_utils import generation_config, load_generation_model

    if args.model_name_or_path is None:
        from scripts.prepare_model import is_complete, smollm2_dir

        args.model_name_or_path = smollm2_dir()
        if not is_complete(args.model_name_or_path):
            raise UserInputError(f"{args.model_name_or_path}: not built; run `python -m scripts.prepare_model` first")
    gen_args = SimpleNamespace(
        model_name_or_path=args.model_name_or_path,
        lora_weights_path=args.lora_weights_path,
        merge_lora=args.merge_lora,
        access_token=None,
        repetition_penalty=1.0,
        greedy=False,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
    )
    model, tokenizer = load_generation_model(gen_args, Accelerator(cpu=True))
    config = generation_config(gen_args, model, tokenizer)
    config.min_new_tokens = args.max_new_tokens  # every sequence runs the whole budget
    return model, tokenizer, config


def time_cell(model, tokenizer, config, batch, args):
    """Median seconds per batch of `batch` prompts, and the share of the cores other processes used."""
    from utils.generation_utils import generate_batch

    prompt = encode_prompt(tokenizer, PUBMED_PROMPT)
    prompts, budgets = [prompt] * batch, [args.max_new_tokens] * batch
    torch.manual_seed(args.seed)
    warm = copy.copy(config)
    warm.min_new_tokens = None
    generate_batch(model, tokenizer, prompts, [4] * batch, warm)  # warm-up: allocations, kernels
    times, others = [], []
    for _ in range(args.repeats):
        busy, own, start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        generate_batch(model, tokenizer, prompts, budgets, config)
        wall = time.perf_counter() - start
        times.append(wall)
        if busy is not None:
            other = (busy_cpu_seconds() - busy) - (time.process_time() - own)
            others.append(max(0.0, other / (wall * (os.cpu_count() or 1))))
    return statistics.median(times), (statistics.mean(others) if others else None)


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, config = load(args)
    default_threads = torch.get_num_threads()
    rows = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch_sizes:
                seconds, others = time_cell(model, tokenizer, config, batch, args)
                rows.append(
                    {
                        "threads": threads,
                        "batch_size": batch,
                        "seconds_per_batch": round(seconds, 4),
                        "tokens_per_second": round(batch * args.max_new_tokens / seconds, 1),
                        "other_work_cpu_share": None if others is None else round(others, 3),
                    }
                )
                print(
                    f"threads {threads}  batch {batch:3d}  {seconds:7.2f} s/batch  "
                    f"{rows[-1]['tokens_per_second']:7.1f} tokens/s  (other processes: "
                    f"{'?' if others is None else f'{others:.0%}'} of the CPU)",
                    flush=True,
                )
    finally:
        torch.set_num_threads(default_threads)
    result = {
        "model": args.model_name_or_path,
        "lora_weights_path": args.lora_weights_path,
        "merge_lora": args.merge_lora,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    run_cli(main)
