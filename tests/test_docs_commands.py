"""Every command that README.md and docs/*.md tell a reader to run, extracted and checked.

Which lines are commands. Only code blocks hold commands: ``` fenced blocks, and indented blocks
(lines indented by 4 spaces or more whose block starts after a blank line, outside a fence). A line
ending in a backslash is joined with the next, and `#` comments are dropped. A line is a command
when its first word, after any leading `NAME=value` environment assignments, is one of PROGRAMS
(python, accelerate, torchrun, make, pip, bash); every other line of a block is output or file
content, never a command. Inline `code` spans are never commands.

(a) Nothing is left to fill in, in any command (`placeholders`):
  - no `...` and no `<`, `>` or `$` (no `<model>`, no variable or redirection to supply);
  - no word in capitals standing for a value (PATH, N, FILE, OUTPUT_DIR), alone or after `=`;
  - every path an option reads (PATH_OPTIONS) is a file or folder of the repository, or lies
    under a folder that a documented command builds (BUILT), or under the `--output_dir` of an
    earlier command on the same page, or is one of the reader's own files READER_FILES, the names
    the README gives the reader's data (`data.jsonl` for the training records, `val.jsonl` for
    validation records); a `--model_name_or_path` outside the repository's folders is a hub id.
(b) End to end (`test_readme_cpu_commands_run`, marked slow): the README's plain `python` commands
    that run train_clm.py or an inference script on models/SmolLM2-135M-Instruct, and `python -m
    scripts.prepare_model`, run in README order, in-process, with three changes:
    models/SmolLM2-135M-Instruct is the folder that the `prepared_model` fixture of conftest.py
    built once for the whole test run with scripts/prepare_model.py (the prepare command itself
    runs again on that folder, which it reuses); every `--output_dir`, and every path under one,
    moves into tmp_path; and SMOKE's arguments are appended (argparse keeps the last value), so
    training takes one step and each generation four tokens. They must cover the whole generation
    sequence: prepare, train, then both inference scripts on the adapter the README trained.
(c) Every other command goes through its parser only (`test_command_parses`): the script's own
    parse function (PARSERS), `accelerate launch` through accelerate's launch parser with its
    `--config_file` loaded by accelerate's config loader, `torchrun` through torch's, `make`
    targets through the recipes the Makefile gives them, `pip install` against the pinned
    versions of the requirements files and the Makefile, `bash` scripts through the parser of the
    program they run. Parsers refuse abbreviated options here: the docs spell every option out. A
    misspelled flag, a missing config file or an unpinned package fails
    (`test_a_wrong_command_fails` shows each kind).
Links between the pages must reach an existing file and heading (`test_links_resolve`).
"""

import argparse
import contextlib
import glob
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass
from unittest import mock

import pytest
from helpers import ROOT

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PROGRAMS = {"python", "accelerate", "torchrun", "make", "pip", "bash"}
SMOLLM2 = "models/SmolLM2-135M-Instruct"
E2E_SCRIPTS = ("train_clm.py", "inference_generation_dataset.py", "inference_generation_instruction.py")
SMOKE = {
    "train_clm.py": ["--max_train_steps", "1"],
    "inference_generation_dataset.py": ["--max_new_tokens", "4"],
    "inference_generation_instruction.py": ["--max_new_tokens", "4"],
}
READER_FILES = {"data.jsonl", "val.jsonl"}
BUILT = {  # folder -> the documented command that builds it
    SMOLLM2: "python -m scripts.prepare_model",
    "data/pubmed_dataset": "python -m scripts.prepare_pubmed",
    "outputs/demo": "make demo",
    "models/random-llama-1.1b": "python -m scripts.sharded_memory build",
}
PATH_OPTIONS = {
    "--train_file",
    "--validation_file",
    "--test_file",
    "--instruction_file",
    "--population_file",
    "--config_file",
    "--lora_weights_path",
    "--dataset_dir",
    "--model_name_or_path",
    "--model",
    "--synthetic",
    "-r",
}
LOCAL_FOLDERS = {"models", "data", "out", "outputs", "scripts", "tests", "docs", "accelerate_configs", "utils"}


@dataclass
class Command:
    page: str
    line: int
    text: str
    env: list
    words: list
    earlier_outputs: tuple  # --output_dir values of the page's earlier commands

    @property
    def id(self):
        return f"{self.page}:{self.line}"


# ---- extraction ---------------------------------------------------------------------------------


def code_blocks(text):
    """(first line number, lines) of each fenced or indented code block of a Markdown text."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip(" ").startswith("```") and len(line) - len(line.lstrip(" ")) < 4:
            start, i = i + 1, i + 1
            while i < len(lines) and not lines[i].lstrip(" ").startswith("```"):
                i += 1
            blocks.append((start + 1, lines[start:i]))
        elif line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            start = i
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                i += 1
            body = [raw[4:] for raw in lines[start:i]]
            while body and not body[-1].strip():
                body.pop()
            blocks.append((start + 1, body))
            continue
        i += 1
    return blocks


def commands_of(page, text):
    commands, outputs = [], []
    for first, lines in code_blocks(text):
        i = 0
        while i < len(lines):
            number, joined = first + i, lines[i]
            while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            try:
                words = shlex.split(joined, comments=True)
            except ValueError:
                continue  # not shell syntax: output or file content
            env = []
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                env.append(words.pop(0))
            if not words or words[0] not in PROGRAMS:
                continue
            commands.append(Command(page, number, joined.strip(), env, words, tuple(outputs)))
            outputs += option_values(words, "--output_dir")
    return commands


def option_values(words, option):
    values = []
    for k, word in enumerate(words):
        if word == option and k + 1 < len(words):
            values.append(words[k + 1])
        elif word.startswith(option + "="):
            values.append(word.split("=", 1)[1])
    return values


def all_commands():
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            found += commands_of(page, f.read())
    return found


def script_of(command):
    """(launcher, script or module, its arguments) of a python/accelerate/torchrun command."""
    words = command.words
    if words[0] == "python":
        if words[1] == "-m":
            return "python", words[2], words[3:]
        return "python", words[1], words[2:]
    return words[0], None, words[1:]


def runs_end_to_end(command):
    launcher, script, args = script_of(command)
    if command.page != "README.md" or launcher != "python":
        return False
    if script == "scripts.prepare_model":
        return not args
    return script in E2E_SCRIPTS and SMOLLM2 in args


COMMANDS = all_commands()
END_TO_END = [c for c in COMMANDS if runs_end_to_end(c)]
PARSE_ONLY = [c for c in COMMANDS if not runs_end_to_end(c)]


# ---- (a) placeholders ---------------------------------------------------------------------------


def is_repository_path(value):
    return os.path.exists(os.path.join(ROOT, value))


def under(value, folder):
    value = os.path.normpath(value)
    return value == os.path.normpath(folder) or value.startswith(os.path.normpath(folder) + os.sep)


def path_problem(option, value, command):
    if option == "--synthetic":
        if "=" not in value:
            return f"--synthetic {value}: expected LABEL=FILE with a concrete label and file"
        value = value.split("=", 1)[1]
    if option == "--model_name_or_path" and value.split("/")[0] not in LOCAL_FOLDERS and value.count("/") == 1:
        return None  # a hub id
    if value in READER_FILES or is_repository_path(value):
        return None
    if any(under(value, folder) for folder in [*BUILT, *command.earlier_outputs]):
        return None
    return (
        f"{option} {value}: neither a file of the repository, nor built by a documented command, nor the "
        f"output of an earlier command on {command.page}, nor one of the reader's files {sorted(READER_FILES)}"
    )


def placeholders(command):
    """What a reader would still have to fill in: [] when the command can be pasted as it is."""
    found = []
    if "..." in command.text or "\u2026" in command.text:
        found.append("'...'")
    found += [f"'{c}'" for c in "<>$" if c in command.text]
    values = [assignment.split("=", 1)[1] for assignment in command.env]  # NAME=value: the name is no placeholder
    for word in values + command.words:
        for part in re.split(r"[=,]", word):
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", part):
                found.append(f"{part!r} stands for a value")
    words = command.words
    for k, word in enumerate(words):
        option, value = word.split("=", 1) if word.startswith("--") and "=" in word else (word, None)
        if option in PATH_OPTIONS:
            value = value if value is not None else (words[k + 1] if k + 1 < len(words) else "")
            problem = path_problem(option, value, command)
            if problem:
                found.append(problem)
    return found


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_no_placeholders(command):
    assert not placeholders(command), f"{command.id}: {command.text}\n{placeholders(command)}"


# ---- (c) parse only -----------------------------------------------------------------------------


class _Parsed(Exception):
    pass


def parsed_by_main(main, argv, prog, from_sys_argv=False):
    """Run main(argv) only as far as its argument parser: for scripts without a parse function
    (`from_sys_argv`: main() takes no argv and its parser reads sys.argv)."""
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), mock.patch.object(sys, "argv", [prog, *argv]):
        try:
            main() if from_sys_argv else main(argv)
        except _Parsed as parsed:
            return parsed.args[0]
    raise AssertionError(f"{prog}: main() returned without parsing arguments")


def parse_audit(argv):
    import train_clm
    from scripts import audit_privacy

    _, passed_on = audit_privacy.parse_args(argv)
    # the audit sets the data, the model and the output itself; what it passes on must be train_clm's
    own = ["--train_file", "data.jsonl", "--model_name_or_path", SMOLLM2, "--output_dir", "audit"]
    if not {"--noise_multiplier", "--target_epsilon"} & {a.split("=")[0] for a in passed_on}:
        own += ["--target_epsilon", "1"]  # the audit's own privacy setting
    train_clm.parse_args([*own, *passed_on])


def parse_tune(argv):
    import train_clm
    from scripts import tune

    args = tune.parse_args(argv)  # its own options, then what goes to every trial
    solved = ["--noise_multiplier", "1"] if args.target_procedure_epsilon is not None else []  # set at run time
    train_clm.parse_args([*args.trial_args, *solved, "--output_dir", "trial"])


def parse_no_arguments(module):
    def parse(argv):
        assert not argv, f"python -m {module} takes no arguments"
        assert importlib.util.find_spec(module) is not None

    return parse


def module_parser(module):
    return lambda argv: importlib.import_module(module).parse_args(argv)


PARSERS = {
    "train_clm": module_parser("train_clm"),
    "inference_generation_dataset": module_parser("inference_generation_dataset"),
    "inference_generation_instruction": module_parser("inference_generation_instruction"),
    "scripts.demo": module_parser("scripts.demo"),
    "scripts.evaluate_synthetic": module_parser("scripts.evaluate_synthetic"),
    "scripts.benchmark": module_parser("scripts.benchmark"),
    "scripts.benchmark_generation": module_parser("scripts.benchmark_generation"),
    "scripts.prepare_pubmed": module_parser("scripts.prepare_pubmed"),
    "scripts.sharded_memory": module_parser("scripts.sharded_memory"),
    "scripts.audit_privacy": parse_audit,
    "scripts.tune": parse_tune,
    "scripts.recipe_sweep": module_parser("scripts.recipe_sweep"),
    "scripts.prepare_model": lambda argv: parsed_by_main(
        importlib.import_module("scripts.prepare_model").main, argv, "prepare_model"
    ),
    # gpu_check reads sys.argv; it exits early without a GPU, after parsing
    "scripts.gpu_check": lambda argv: parsed_by_main(
        importlib.import_module("scripts.gpu_check").main, argv, "gpu_check", from_sys_argv=True
    ),
    "utils.model.memory_model": parse_no_arguments("utils.model.memory_model"),
    "pytest": parse_no_arguments("pytest"),
    "ruff": parse_no_arguments("ruff"),
}
BASH_SCRIPTS = {"scripts/gpu_check.sh": "scripts.gpu_check"}  # script -> the program it runs


def check_module(module, argv):
    if module == "pip":
        return check_pip(argv)
    if module in ("pytest", "ruff"):
        assert importlib.util.find_spec(module) is not None, f"{module} is not installed"
        return None
    assert module in PARSERS, f"python -m {module}: no parser known; add it to PARSERS"
    from utils.cli import UserInputError

    try:
        PARSERS[module](argv)
    except SystemExit as exit:
        raise AssertionError(f"{module} {shlex.join(argv)}: refused by its parser (exit {exit.code})") from None
    except UserInputError as err:
        raise AssertionError(f"{module} {shlex.join(argv)}: error: {err}") from None


def check_script(path, argv):
    assert os.path.isfile(os.path.join(ROOT, path)), f"{path}: no such file"
    assert "/" not in path, f"{path}: helpers in scripts/ run as modules from the root, python -m scripts.NAME"
    check_module(path[: -len(".py")], argv)


def check_launch(words):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    assert words[1] == "launch", f"accelerate {words[1]}: only `accelerate launch` is checked"
    try:
        launch = launch_command_parser().parse_args(words[2:])
    except SystemExit:
        raise AssertionError("refused by accelerate launch's argument parser") from None
    if launch.config_file:
        assert os.path.isfile(os.path.join(ROOT, launch.config_file)), f"{launch.config_file}: no such config"
        load_config_from_file(os.path.join(ROOT, launch.config_file))
    if launch.module:
        check_module(launch.training_script, launch.training_script_args)
    else:
        check_script(launch.training_script, launch.training_script_args)


def check_torchrun(words):
    from torch.distributed.run import get_args_parser

    try:
        run = get_args_parser().parse_args(words[1:])
    except SystemExit:
        raise AssertionError("refused by torchrun's argument parser") from None
    (check_module if run.module else check_script)(run.training_script, run.training_script_args)


def makefile():
    """target -> (prerequisites, recipe lines with $(PYTHON) as python)."""
    targets, current = {}, None
    with open(os.path.join(ROOT, "Makefile")) as f:
        for line in f.read().split("\n"):
            if line.startswith("\t") and current:
                targets[current][1].append(line.strip().replace("$(PYTHON)", "python"))
            elif re.match(r"^[A-Za-z][\w-]*\s*:(?!=)", line):
                name, prerequisites = line.split(":", 1)
                current = name.strip()
                targets[current] = (prerequisites.split(), [])
            elif line and not line.startswith("#"):
                current = None
    return targets


def check_make(words):
    targets = makefile()
    for target in words[1:] or ["install"]:
        assert target in targets, f"make {target}: no such target in the Makefile"
        prerequisites, recipe = targets[target]
        for prerequisite in prerequisites:
            check_make(["make", prerequisite])
        for line in recipe:
            recipe_words = shlex.split(line, comments=True)
            check_words(recipe_words)


def pins():
    """package -> pinned version, from the requirements files and the Makefile's pip commands."""
    found = {}
    texts = [open(os.path.join(ROOT, name)).read() for name in ("requirements.txt", "requirements-test.txt")]
    texts += ["\n".join(line for _, (_, recipe) in makefile().items() for line in recipe)]
    for text in texts:
        for name, version in re.findall(r"(?m)(?:^|\s)([A-Za-z][\w.-]*)==([\w.+-]+)", text):
            found[name.lower()] = version
    return found


def check_pip(argv):
    from utils.model.model_utils import BNB_VERSION

    assert argv and argv[0] == "install", f"pip {shlex.join(argv)}: only `pip install` is documented"
    known = {**pins(), "bitsandbytes": BNB_VERSION}
    k = 1
    while k < len(argv):
        word = argv[k]
        if word == "-r":
            assert os.path.isfile(os.path.join(ROOT, argv[k + 1])), f"-r {argv[k + 1]}: no such file"
            k += 2
            continue
        if word.startswith("-"):
            assert word in ("--no-deps",), f"pip install {word}: not an option the docs use"
        else:
            match = re.fullmatch(r"([A-Za-z][\w.-]*)==([\w.+-]+)", word)
            assert match, f"pip install {word}: not pinned as name==version"
            name, version = match[1].lower(), match[2]
            assert name in known, f"{name}: not a package of the requirements files or the Makefile"
            assert known[name] == version, f"{name}=={version}: the project pins {known[name]}"
        k += 1


def check_bash(words):
    script = words[1]
    assert os.path.isfile(os.path.join(ROOT, script)), f"{script}: no such file"
    assert script in BASH_SCRIPTS, f"bash {script}: no parser known; add it to BASH_SCRIPTS"
    check_module(BASH_SCRIPTS[script], words[2:])


@contextlib.contextmanager
def exact_option_names():
    """Every parser built meanwhile refuses abbreviated options: the docs spell each option out."""
    original = argparse.ArgumentParser.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "allow_abbrev": False})

    with mock.patch.object(argparse.ArgumentParser, "__init__", init):
        yield


def check_words(words):
    with exact_option_names():
        return check_launched(words)


def check_launched(words):
    launcher = words[0]
    if launcher == "python":
        if words[1] == "-m":
            return check_module(words[2], words[3:])
        return check_script(words[1], words[2:])
    if launcher == "pip":
        return check_pip(words[1:])
    return {"accelerate": check_launch, "torchrun": check_torchrun, "make": check_make}.get(launcher, check_bash)(words)


def relocated(words, outputs, tmp_path, create=False):
    """The words with every output folder of `outputs` (and every path under one) moved into tmp_path."""
    moved = []
    for word in words:
        prefix, value = "", word
        if "=" in word and not word.startswith("-"):
            prefix, value = word.split("=", 1)[0] + "=", word.split("=", 1)[1]
        for folder in outputs:
            if under(value, folder):
                value = str(tmp_path / value)
                if create:
                    os.makedirs(str(tmp_path / folder), exist_ok=True)
                break
        moved.append(prefix + value)
    return moved


def check_command(command, tmp_path):
    """(c): the command through the parsers, after the outputs of earlier commands exist."""
    outputs = set(command.earlier_outputs) | set(option_values(command.words, "--output_dir"))
    words = relocated(command.words, command.earlier_outputs, tmp_path, create=True)
    words = relocated(words, outputs, tmp_path)
    check_words(words)


@pytest.mark.parametrize("command", PARSE_ONLY, ids=[c.id for c in PARSE_ONLY])
def test_command_parses(command, tmp_path):
    try:
        check_command(command, tmp_path)
    except AssertionError as err:
        pytest.fail(f"{command.id}: {command.text}\n{err}")


def test_built_folders_come_from_documented_commands():
    documented = [shlex.join(c.words) for c in COMMANDS]
    for folder, builder in BUILT.items():
        assert any(text.startswith(builder) for text in documented), f"{folder}: `{builder}` is documented nowhere"


# ---- (b) end to end -----------------------------------------------------------------------------


def reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def instruction_count(path):
    from inference_generation_instruction import read_instruction_file

    return len(read_instruction_file(path))


def test_the_readme_holds_the_cpu_generation_sequence():
    """The README leads generation with a sequence that runs on a CPU: prepare, train, both scripts."""
    scripts = [script_of(c)[1] for c in END_TO_END]
    assert "scripts.prepare_model" in scripts and "train_clm.py" in scripts
    trained = set()
    for command in END_TO_END:
        _, script, args = script_of(command)
        if script == "train_clm.py":
            trained.update(option_values(args, "--output_dir"))
        elif script in E2E_SCRIPTS:
            adapters = option_values(args, "--lora_weights_path")
            assert adapters and set(adapters) <= trained, f"{command.id}: not the adapter the README trained"
    assert {"inference_generation_dataset.py", "inference_generation_instruction.py"} <= set(scripts)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_readme_cpu_commands_run(prepared_model, tmp_path):
    import inference_generation_dataset
    import inference_generation_instruction
    import train_clm
    from scripts import prepare_model

    mains = {
        "train_clm.py": train_clm.main,
        "inference_generation_dataset.py": inference_generation_dataset.main,
        "inference_generation_instruction.py": inference_generation_instruction.main,
    }
    outputs = []
    for command in END_TO_END:
        _, script, args = script_of(command)
        if script == "scripts.prepare_model":
            assert prepare_model.main(["--output_dir", prepared_model]) == prepared_model, command.id
            continue
        outputs += option_values(args, "--output_dir")
        argv = [prepared_model if word == SMOLLM2 else word for word in relocated(args, outputs, tmp_path)]
        argv += SMOKE[script]
        out = tmp_path / option_values(args, "--output_dir")[-1]
        reset_accelerate()
        mains[script](argv)
        reset_accelerate()
        if script == "train_clm.py":
            report = json.loads((out / "privacy_report.json").read_text())
            assert report["epsilon"] is not None and math.isfinite(report["epsilon"]), command.id
            assert (out / "adapter_model.safetensors").is_file(), command.id
            continue
        records = read_jsonl(out / "generations.jsonl")
        assert all(set(r) == {"instruction", "answer"} and isinstance(r["answer"], str) for r in records)
        if script == "inference_generation_dataset.py":
            expected = int(option_values(args, "--num_samples")[-1])
        else:
            expected = instruction_count(os.path.join(ROOT, option_values(args, "--instruction_file")[-1]))
        assert len(records) == expected, f"{command.id}: {len(records)} records, expected {expected}"


# ---- the checks can fail ------------------------------------------------------------------------


def snippet(text):
    return commands_of("snippet.md", text)


def test_extraction_joins_lines_and_skips_output():
    found = snippet(
        'Run:\n\n    make demo    # the demo\n    {"instruction": "x"}\n'
        "    python train_clm.py --output_dir out/a \\\n        --lora_r 8\n\n"
        "```bash\nOMP_NUM_THREADS=1 python -m scripts.demo --steps 2\nerror: shown output\n```\n"
    )
    assert [c.words for c in found] == [
        ["make", "demo"],
        ["python", "train_clm.py", "--output_dir", "out/a", "--lora_r", "8"],
        ["python", "-m", "scripts.demo", "--steps", "2"],
    ]
    assert found[1].earlier_outputs == () and found[2].earlier_outputs == ("out/a",)
    assert found[2].env == ["OMP_NUM_THREADS=1"]


def test_placeholders_are_found():
    bad = snippet(
        "    python train_clm.py --train_file PATH --model_name_or_path <model> --output_dir out ...\n\n"
        "    python inference_generation_instruction.py --instruction_file prompts.txt --output_dir g\n"
    )
    assert len(placeholders(bad[0])) >= 3
    assert any("prompts.txt" in p for p in placeholders(bad[1]))
    good = snippet("    python train_clm.py --train_file data.jsonl --model_name_or_path meta-llama/Llama-2-7b-hf\n")
    assert placeholders(good[0]) == []


TRAIN = "train_clm.py --train_file data.jsonl --model_name_or_path meta-llama/Llama-2-7b-hf --output_dir out/x"
DP = "--noise_multiplier 1"


@pytest.mark.parametrize(
    "right, wrong",
    [
        (f"python {TRAIN} {DP}", f"python {TRAIN} {DP} --lora_rank 8"),
        (f"python {TRAIN} {DP}", f"python {TRAIN.replace('--train_file', '--trian_file')} {DP}"),
        (f"python {TRAIN} --target_epsilon 8", f"python {TRAIN} --target_epsilon 8 {DP}"),
        (f"python {TRAIN} --target_epsilon 8", f"python {TRAIN} --target_eps 8"),
        (
            f"accelerate launch --config_file accelerate_configs/cpu_2proc.cfg {TRAIN} {DP}",
            f"accelerate launch --config_file accelerate_configs/gpu_9proc.cfg {TRAIN} {DP}",
        ),
        ("python -m scripts.benchmark --preset cpu-small", "python -m scripts.benchmark --preset cpu-huge"),
        ("python -m scripts.benchmark --preset cpu-small", "python scripts/benchmark.py --preset cpu-small"),
        ("make demo-evaluate", "make demo-everything"),
        ("pip install bitsandbytes==0.50.2", "pip install bitsandbytes==0.1"),
        ("pip install bitsandbytes==0.50.2", "pip install bitsandbytes"),
        ("bash scripts/gpu_check.sh --layers 8", "bash scripts/gpu_check.sh --layer 8"),
        (
            "python -m scripts.audit_privacy --output_dir a --learning_rate 1e-2",
            "python -m scripts.audit_privacy --output_dir a --lerning_rate 1e-2",
        ),
    ],
)
def test_a_wrong_command_fails(right, wrong, tmp_path):
    """Each pair differs in one mistake: the right command passes, the wrong one fails."""
    (good,) = snippet("    " + right + "\n")
    check_command(good, tmp_path)
    (bad,) = snippet("    " + wrong + "\n")
    with pytest.raises(AssertionError):
        check_command(bad, tmp_path)


# ---- links between the pages --------------------------------------------------------------------


def anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"(?ms)^```.*?^```", "", f.read())
    slugs = set()
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", text):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    path = os.path.join(ROOT, page)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page}: {broken}"
