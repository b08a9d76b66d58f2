"""Generate answers for the instructions of a text file, each repeated as often as the file asks.

    accelerate launch --config_file accelerate_configs/cpu_1proc.cfg inference_generation_instruction.py \
        --model_name_or_path <model> --lora_weights_path <training output_dir> \
        --instruction_file scripts/example_instruction_file.txt --output_dir generations

One instruction per line, `instruction text #### N` (N repetitions); blank lines are ignored. The
output, output_dir/generations.jsonl, holds one {"instruction", "answer"} record per generation in
file order and can be fed back to train_clm.py --train_file.
"""

import argparse
import os
import re

import torch
from accelerate import Accelerator

from utils.cli import UserInputError, run_cli
from utils.dist_utils import end_process_group
from utils.generation_utils import add_generation_args, run_generation, validate_generation_args

LINE = re.compile(r"^(?P<instruction>.*?)\s*####\s*(?P<count>[0-9]+)\s*$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instruction_file", required=True, help="lines of `instruction text #### N`")
    add_generation_args(p)
    args = p.parse_args(argv)
    validate_generation_args(args)
    return args


def read_instruction_file(path):
    """Prompts in file order, each instruction repeated N times."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: file not found")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            match = LINE.match(line.strip())
            if match is None or int(match["count"]) < 1:
                raise UserInputError(
                    f"{path}, line {number}: expected `instruction text #### N` with N a whole "
                    f"number >= 1, got {line.strip()[:60]!r}"
                )
            prompts += [match["instruction"].strip()] * int(match["count"])
    if not prompts:
        raise UserInputError(f"{path}: no instructions")
    return prompts


def main(argv=None):
    args = parse_args(argv)
    prompts = read_instruction_file(args.instruction_file)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())  # CPU: torchrun/launch still give P processes
    return run_generation(prompts, args, "inference_generation_instruction", accelerator)


if __name__ == "__main__":
    run_cli(main)
    end_process_group()  # gloo's threads still running at interpreter exit can abort a finished run
