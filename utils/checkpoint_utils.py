"""Release folder, work folder, checkpoints and resume (docs/DESIGN.md 2.14).

`--output_dir` is the release: it receives the finished adapter and reports at once, plus the
tracker's files (`<output_dir>/tracker`) as its one live part. Working state (checkpoints, the
scratch folder of the final move, curator-only files) lives in `--work_dir`, by default
`<output_dir>.work` beside it, on the same file system so the final move stays atomic.

A checkpoint holds the adapter, optimizer, scheduler, step (which also fixes the data position:
each step's sample is derived from the DP seed and the step), the accountant's state, the log
history, and the run's identity on the privacy ledger (its run id and which session took which
steps). It never holds the DP seed or generator state. The global generators (Python, numpy,
torch) are reseeded from public values (--seed, step) after every step, so the random-number state
accelerate saves beside them is the same whatever the private data were.
"""

import hashlib
import os
import re
import shutil

from accelerate.utils import set_seed
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from utils.cli import UserInputError

CHECKPOINT_DIR = "checkpoints"
TRACKER_DIR = "tracker"
FINISHED_MARK = "privacy_report.json"  # written only when a run has finished and published its outputs
_NAME = re.compile(r"^step_(\d+)$")


class TrainingState:
    """Everything a resumed run needs, as one object accelerate can save and load."""

    def __init__(self, model, optimizer, scheduler, accountant, history):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accountant, self.history = accountant, history
        self.step = 0
        self.run_facts = {}
        # identity on the privacy ledger: the run, the sessions whose steps the adapter holds
        # ([session, first step, last step] each), and this session, which began at start_step
        self.run_id, self.session_id, self.lineage, self.start_step = None, None, [], 0

    def state_dict(self) -> dict:
        return {
            "adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "accountant": self.accountant.state_dict() if self.accountant else None,
            "history": list(self.history),
            "step": self.step,
            "run_facts": dict(self.run_facts),
            "run_id": self.run_id,
            "lineage": self.full_lineage(),
        }

    def full_lineage(self) -> list:
        return [*self.lineage, [self.session_id, self.start_step, self.step]]

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
        self.step = self.start_step = int(state["step"])
        self.run_id, self.lineage = state["run_id"], [list(part) for part in state["lineage"]]

    @property
    def parent(self) -> list | None:
        """[session, step] of the checkpoint this session resumed from."""
        return [self.lineage[-1][0], self.start_step] if self.lineage else None


def reseed_public_generators(seed: int, step: int) -> None:
    """Python, numpy and torch generators (every device) from (seed, step) alone. Dropout draws as
    many numbers as its tensors hold, so after a step the global state depends on the sampled
    records' lengths; reseeding after each step keeps what a checkpoint saves free of the data (the
    DP noise and sampling have generators of their own, from a secret seed)."""
    digest = hashlib.sha256(f"{seed}:public-generators:{step}".encode()).digest()
    set_seed(int.from_bytes(digest[:4], "little"))


# ---- folders ------------------------------------------------------------------------------------


def default_work_dir(output_dir: str) -> str:
    return os.path.normpath(output_dir) + ".work"


def tracker_dir(output_dir: str) -> str:
    return os.path.join(output_dir, TRACKER_DIR)


def checkpoint_root(work_dir: str) -> str:
    return os.path.join(work_dir, CHECKPOINT_DIR)


def check_folders(output_dir: str, work_dir: str, resuming: bool) -> None:
    """A release is final, and belongs to one run: a finished release is never continued or
    overwritten, and a fresh run never writes into a folder that already holds part of a release
    or beside checkpoints of an unfinished run."""
    if os.path.exists(os.path.join(output_dir, FINISHED_MARK)):
        raise UserInputError(
            f"{output_dir}: holds a finished run ({FINISHED_MARK}); a release is final: start a new run, or "
            "fork a checkpoint, into a new --output_dir"
        )
    if os.path.abspath(work_dir).startswith(os.path.abspath(output_dir) + os.sep):
        raise UserInputError(f"--work_dir {work_dir}: must not lie inside the release folder --output_dir")
    if resuming:
        return
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise UserInputError(
            f"{output_dir}: already holds part of a release ({', '.join(sorted(os.listdir(output_dir)))}); resume "
            "its run with --resume_from_checkpoint latest, or choose a new --output_dir"
        )
    if latest_checkpoint(work_dir):
        raise UserInputError(
            f"{work_dir}: holds checkpoints of an unfinished run; resume it with --resume_from_checkpoint latest, "
            "or delete the folder to start over"
        )


def check_same_file_system(output_dir: str, work_dir: str) -> None:
    """The finished release moves from the work folder into --output_dir by renaming: one file system
    (compared on the nearest folders that exist: nothing is created before the run is admitted)."""

    def device(path):
        path = os.path.abspath(path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        return os.stat(path).st_dev

    if device(output_dir) != device(work_dir):
        raise UserInputError(f"--work_dir {work_dir}: must be on the same file system as --output_dir {output_dir}")


def save_checkpoint(accelerator, work_dir: str, step: int) -> str:
    """Save into a scratch folder, then rename: a crash mid-save leaves no folder named step_N."""
    root = checkpoint_root(work_dir)
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


def latest_checkpoint(work_dir: str) -> str | None:
    root = checkpoint_root(work_dir)
    steps = [int(m.group(1)) for m in map(_NAME.match, os.listdir(root) if os.path.isdir(root) else []) if m]
    return os.path.join(root, f"step_{max(steps)}") if steps else None


def resolve_checkpoint(value: str | None, work_dir: str) -> str | None:
    """--resume_from_checkpoint PATH|latest -> folder (None: start fresh, also when 'latest' finds none)."""
    if value is None:
        return None
    if value == "latest":
        return latest_checkpoint(work_dir)
    if not os.path.isdir(value) or not _NAME.match(os.path.basename(os.path.normpath(value))):
        raise UserInputError(f"--resume_from_checkpoint {value}: not a checkpoint folder (checkpoints/step_N)")
    return value
