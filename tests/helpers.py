"""What tests share besides fixtures: paths, launch environments, argument lists, comparisons."""

import json
import os
import subprocess

from utils.cli import cli_flags
from utils.dist_utils import accelerate_launch_command, free_port, torchrun_command  # noqa: F401 (for the tests)
from utils.tiny_models import local_sentences  # noqa: F401 (for the tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(model, data, out, **options):
    """train_clm.py's arguments for a run of `model` on `data` into `out`; options as in cli_flags."""
    return cli_flags(train_file=data, model_name_or_path=model, output_dir=str(out), **options)


def process_env(threads=1, **extra):
    """The environment of a launched test process: offline, `threads` OpenMP threads, and no
    ACCELERATE_USE_CPU left over, so that the launch configs alone decide the processes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", **extra)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_ok(cmd, env, timeout=300):
    """Run a command from the repository root; fail the test with its output unless it exits 0."""
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def relative_difference(a, b, select=""):
    """||a - b|| / ||a|| over the tensors of two state dicts whose names contain `select`."""
    keys = [k for k in a if select in k]
    assert keys and set(a) == set(b)
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)
    den = sum((a[k].double() ** 2).sum() for k in keys)
    return float((num / den).sqrt())


def write_units(path, units):
    """units: {unit id: [answer texts]} -> JSON Lines records with the id under 'user'."""
    with open(path, "w") as f:
        for unit, texts in units.items():
            for text in texts:
                f.write(json.dumps({"instruction": "", "answer": text, "user": unit}) + "\n")
    return str(path)


def write_records(path, records, jsonl=False):
    """records: list of (instruction, answer)."""
    with open(path, "w") as f:
        if jsonl:
            for instruction, answer in records:
                f.write(json.dumps({"instruction": instruction, "answer": answer}) + "\n")
        else:
            json.dump({"instruction": [r[0] for r in records], "answer": [r[1] for r in records]}, f)
    return str(path)


def brute_force_longest_span(query, records):
    """The same answer as longest_shared_spans for one query, by comparing every pair of positions:
    the reference the fast scan is tested against."""
    best = 0
    for record in records:
        for i in range(len(query)):
            for j in range(len(record)):
                k = 0
                while i + k < len(query) and j + k < len(record) and query[i + k] == record[j + k]:
                    k += 1
                best = max(best, k)
    return best
