"""Generate synthetic records for the prompts of a data set (the seed's PubMed "Abstract:" task).

    accelerate launch --config_file accelerate_configs/cpu_1proc.cfg inference_generation_dataset.py \
        --dataset_name pubmed_generation --model_name_or_path <model> \
        --lora_weights_path <training output_dir>/lora_weights.bin --max_length 512 --output_dir generations

One prompt per validation record (`--dataset_name pubmed_generation`: "Abstract:"), or the
instructions of --validation_file / --train_file; --num_samples cycles through them or cuts them
short. generations.jsonl repeats every prompt verbatim and is meant for release, so prompts read
from a data file are refused unless --prompts_are_public says they may be published. The output,
output_dir/generations.jsonl, holds one {"instruction", "answer"} record per prompt in order and
can be fed back to train_clm.py --train_file.
"""

import argparse
import itertools

import torch
from accelerate import Accelerator

from utils.cli import UserInputError, run_cli
from utils.data_utils import load_pubmed, load_records_file
from utils.dist_utils import end_process_group
from utils.generation_utils import add_generation_args, run_generation, validate_generation_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = p.add_argument_group("prompts")
    data.add_argument("--dataset_name", default=None, help="pubmed_generation: the built PubMed abstracts")
    data.add_argument("--dataset_dir", default=None, help="folder of the built PubMed data set")
    data.add_argument("--validation_file", default=None, help="JSON or JSON Lines records: their instructions")
    data.add_argument("--train_file", default=None, help="used when no --validation_file is given")
    data.add_argument("--num_samples", type=int, default=None, help="number of generations (default: one per record)")
    data.add_argument(
        "--prompts_are_public",
        action="store_true",
        help="the file's instructions may be published: each is copied into generations.jsonl",
    )
    add_generation_args(p)
    args = p.parse_args(argv)
    validate_generation_args(args)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserInputError(f"--num_samples {args.num_samples}: must be at least 1")
    return args


def dataset_prompts(args):
    if args.dataset_name is not None:
        if args.dataset_name != "pubmed_generation":
            raise UserInputError(f"--dataset_name {args.dataset_name}: unknown (known: pubmed_generation)")
        splits = load_pubmed(args.dataset_dir)
        if "validation" not in splits:
            raise UserInputError(f"--dataset_name {args.dataset_name}: the built data set has no validation split")
        instructions = splits["validation"]["instruction"]
    elif args.validation_file or args.train_file:
        path = args.validation_file or args.train_file
        if not args.prompts_are_public:
            raise UserInputError(
                f"{path}: its instructions would be copied verbatim into generations.jsonl, the "
                "file meant for release; pass --prompts_are_public if they may be published"
            )
        instructions = load_records_file(path)["instruction"]
    else:
        raise UserInputError("give --dataset_name, --validation_file or --train_file")
    count = args.num_samples or len(instructions)
    return list(itertools.islice(itertools.cycle(instructions), count))


def main(argv=None):
    args = parse_args(argv)
    prompts = dataset_prompts(args)
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())  # CPU: torchrun/launch still give P processes
    return run_generation(prompts, args, "inference_generation_dataset", accelerator)


if __name__ == "__main__":
    run_cli(main)
    end_process_group()  # gloo's threads still running at interpreter exit can abort a finished run
