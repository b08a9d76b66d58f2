"""utils/checkpoint_utils.py and utils/io_utils.py on their own: which checkpoint resumes, finished
runs stay final, a checkpoint of another run is refused, and writes are all-or-nothing."""

import os

import pytest

from utils.checkpoint_utils import (
    TrainingState,
    latest_checkpoint,
    refuse_finished_run,
    resolve_checkpoint,
    resolve_resume,
    run_folder,
)
from utils.cli import UserInputError
from utils.io_utils import replace_folder, write_json


def make_checkpoints(output_dir, *names):
    for name in names:
        os.makedirs(output_dir / "checkpoints" / name)


def test_latest_is_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    make_checkpoints(tmp_path, "step_3", "step_12", ".incomplete_step_15", "step_9", "notes")
    assert latest_checkpoint(str(tmp_path)) == os.path.join(tmp_path, "checkpoints", "step_12")
    assert resolve_checkpoint("latest", str(tmp_path)) == latest_checkpoint(str(tmp_path))
    assert run_folder(os.path.join(tmp_path, "checkpoints", "step_12")) == str(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "checkpoints" / "notes"), str(tmp_path))


def test_a_finished_run_is_never_resumed(tmp_path):
    make_checkpoints(tmp_path, "step_3")
    assert resolve_resume("latest", str(tmp_path)).endswith("step_3")
    assert resolve_resume(None, str(tmp_path)) is None
    write_json(str(tmp_path / "privacy_report.json"), {"epsilon": 1.0})
    with pytest.raises(ValueError, match="finished run"):
        refuse_finished_run(str(tmp_path))
    with pytest.raises(UserInputError, match="finished run"):
        resolve_resume("latest", str(tmp_path))
    # its checkpoint resumed into another folder is the same release a second time
    with pytest.raises(UserInputError, match="finished run"):
        resolve_resume(str(tmp_path / "checkpoints" / "step_3"), str(tmp_path / "elsewhere"))


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
    state = saved.state_dict()
    resumed = TrainingState(model, Stub(), Stub(), None, [])
    resumed.run_facts = {"dataset_size": 64, "sampling": "poisson"}
    resumed.load_state_dict(state)
    assert resumed.step == 7 and resumed.history == [{"step": 1}] and resumed.optimizer.loaded == {"value": 1}
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
