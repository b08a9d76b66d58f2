"""utils/checkpoint_utils.py and utils/io_utils.py on their own: which checkpoint resumes, a release
is final, a checkpoint of another run is refused, the saved generator state is public, and writes
are all-or-nothing."""

import os
import random

import numpy as np
import pytest
import torch

from utils.checkpoint_utils import (
    TrainingState,
    check_folders,
    default_work_dir,
    latest_checkpoint,
    reseed_public_generators,
    resolve_checkpoint,
)
from utils.cli import UserInputError
from utils.io_utils import replace_folder, write_json


def make_checkpoints(work_dir, *names):
    for name in names:
        os.makedirs(work_dir / "checkpoints" / name)


def test_latest_is_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    assert resolve_checkpoint("latest", str(tmp_path)) is None and resolve_checkpoint(None, str(tmp_path)) is None
    make_checkpoints(tmp_path, "step_3", "step_12", ".incomplete_step_15", "step_9", "notes")
    assert latest_checkpoint(str(tmp_path)) == os.path.join(tmp_path, "checkpoints", "step_12")
    assert resolve_checkpoint("latest", str(tmp_path)) == latest_checkpoint(str(tmp_path))
    with pytest.raises(UserInputError, match="not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "checkpoints" / "notes"), str(tmp_path))


def test_a_release_is_final_and_working_state_stays_outside_it(tmp_path):
    out = tmp_path / "out"
    assert default_work_dir(str(out) + "/") == str(out) + ".work"
    check_folders(str(out), default_work_dir(str(out)), resuming=False)  # nothing there yet
    write_json(str(tmp_path / "privacy_report.json"), {"epsilon": 1.0})
    for resuming in (False, True):
        with pytest.raises(UserInputError, match="finished run"):
            check_folders(str(tmp_path), str(tmp_path) + ".work", resuming)
    with pytest.raises(UserInputError, match="must not lie inside the release folder"):
        check_folders(str(out), str(out / "work"), resuming=True)


def test_public_reseeding_sets_every_generator_from_seed_and_step():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    reseed_public_generators(7, 3)
    first = draws()
    torch.rand(1000)  # whatever the step drew in between
    reseed_public_generators(7, 3)
    assert draws() == first
    reseed_public_generators(7, 4)
    assert draws() != first


class Stub:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"value": 1}

    def load_state_dict(self, state):
        self.loaded = state


def test_training_state_refuses_a_checkpoint_of_another_run(tiny_llama):
    from transformers import AutoModelForCausalLM

    from utils.lora_utils import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 4, 8)
    saved = TrainingState(model, Stub(), Stub(), None, [{"step": 1}])
    saved.step, saved.run_facts = 7, {"dataset_size": 64, "sampling": "poisson"}
    saved.run_id, saved.session_id, saved.lineage, saved.start_step = "run", "second", [["first", 0, 3]], 3
    state = saved.state_dict()
    resumed = TrainingState(model, Stub(), Stub(), None, [])
    resumed.run_facts = {"dataset_size": 64, "sampling": "poisson"}
    resumed.load_state_dict(state)
    assert resumed.step == 7 and resumed.history == [{"step": 1}] and resumed.optimizer.loaded == {"value": 1}
    # the ledger identity: the run, and which session's steps the adapter holds
    assert resumed.run_id == "run" and resumed.lineage == [["first", 0, 3], ["second", 3, 7]]
    assert resumed.parent == ["second", 7]
    other = TrainingState(model, Stub(), Stub(), None, [])
    other.run_facts = {"dataset_size": 40, "sampling": "poisson"}
    with pytest.raises(ValueError, match="dataset_size was 64, now 40"):
        other.load_state_dict(state)


def test_writes_are_all_or_nothing(tmp_path):
    write_json(str(tmp_path / "a.json"), {"x": 1})
    assert os.listdir(tmp_path) == ["a.json"]
    target = tmp_path / "folder"
    replace_folder(str(target), lambda d: open(os.path.join(d, "v1"), "w").close())
    assert os.listdir(target) == ["v1"]

    def broken(folder):
        open(os.path.join(folder, "v2"), "w").close()
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        replace_folder(str(target), broken)
    assert os.listdir(target) == ["v1"]  # the old folder stays until a new one is complete
    assert sorted(os.listdir(tmp_path)) == ["a.json", "folder"]
    replace_folder(str(target), lambda d: open(os.path.join(d, "v3"), "w").close())
    assert os.listdir(target) == ["v3"] and sorted(os.listdir(tmp_path)) == ["a.json", "folder"]
