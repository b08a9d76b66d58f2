"""Checkpoint and resume through accelerate, without spending or forgetting privacy budget.

A checkpoint holds the adapter, optimizer, scheduler, step (which also fixes the data position:
each step's sample is derived from the DP seed and the step), the accountant's state and the log
history. It never holds the DP seed or generator state: a resumed run draws fresh randomness from
the operating system (or from --insecure_dp_seed in tests, which then continues the same sequence).
"""

import os
import re
import shutil

from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from utils.cli import UserInputError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)$")


class TrainingState:
    """Everything a resumed run needs, as one object accelerate can save and load."""

    def __init__(self, model, optimizer, scheduler, accountant, history):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accountant, self.history = accountant, history
        self.step = 0
        self.run_facts = {}

    def state_dict(self) -> dict:
        return {
            "adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "accountant": self.accountant.state_dict() if self.accountant else None,
            "history": list(self.history),
            "step": self.step,
            "run_facts": dict(self.run_facts),
        }

    def load_state_dict(self, state: dict) -> None:
        mismatched = {
            k: (state["run_facts"].get(k), v) for k, v in self.run_facts.items() if state["run_facts"].get(k) != v
        }
        if mismatched:
            raise ValueError(
                "the checkpoint belongs to a different run: "
                + ", ".join(f"{k} was {old}, now {new}" for k, (old, new) in mismatched.items())
            )
        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accountant:
            self.accountant.load_state_dict(state["accountant"])
        self.history[:] = state["history"]
        self.step = int(state["step"])


FINISHED_MARK = "privacy_report.json"  # written only when a run has finished and published its outputs


def run_folder(checkpoint: str) -> str:
    """The output folder a checkpoint (output_dir/checkpoints/step_N) belongs to."""
    return os.path.dirname(os.path.dirname(os.path.normpath(checkpoint)))


def refuse_finished_run(output_dir: str) -> None:
    """A finished run is final: resuming it would train a second adapter on the same data with fresh
    noise, two releases under one reported epsilon."""
    if os.path.exists(os.path.join(output_dir, FINISHED_MARK)):
        raise ValueError(
            f"{output_dir}: holds a finished run ({FINISHED_MARK}); a finished run cannot be resumed, "
            "since a second adapter from the same data would not be covered by its epsilon. "
            "Start a new run in a new --output_dir"
        )


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_DIR)


def save_checkpoint(accelerator, output_dir: str, step: int) -> str:
    """Save into a scratch folder, then rename: a crash mid-save leaves no folder named step_N."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step_{step}")
    scratch = os.path.join(root, f".incomplete_step_{step}")
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(scratch)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(scratch, final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: str) -> str | None:
    root = checkpoint_root(output_dir)
    steps = [int(m.group(1)) for m in map(_NAME.match, os.listdir(root) if os.path.isdir(root) else []) if m]
    return os.path.join(root, f"step_{max(steps)}") if steps else None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint -> the checkpoint folder (None: start fresh). A finished run, in
    output_dir or the folder the checkpoint belongs to, is never resumed."""
    if value is None:
        return None
    try:
        checkpoint = resolve_checkpoint(value, output_dir)
        for folder in {output_dir, run_folder(checkpoint) if checkpoint else output_dir}:
            refuse_finished_run(folder)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    return checkpoint


def resolve_checkpoint(value: str, output_dir: str) -> str | None:
    """--resume_from_checkpoint PATH|latest -> folder (None: start fresh when 'latest' finds none)."""
    if value == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.isdir(value) or not _NAME.match(os.path.basename(os.path.normpath(value))):
        raise ValueError(f"--resume_from_checkpoint {value}: not a checkpoint folder (checkpoints/step_N)")
    return value
