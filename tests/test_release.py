"""What a run may publish (docs/DESIGN.md 2.10, 2.14): validation data declared public and disjoint
from the training data, no epsilon when the DP seed is known, user-level runs publish the number of
units and never of records, curator-only files stay in the work folder, and a release is final."""

import glob
import json
import os

import pytest
import torch
from helpers import train_args, write_records, write_units

import train_clm
from utils.cli import UserInputError

SIZES = dict(block_size=32, per_device_train_batch_size=8, delta=1e-3)


def run(model, data, out, **options):
    train_clm.main(train_args(model, data, out, **(SIZES | options)))
    return json.loads((out / "privacy_report.json").read_text())


def test_validation_data_must_be_declared_public_and_share_nothing_with_training(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:32])
    with pytest.raises(UserInputError, match="--validation_file .* pass --validation_is_public"):
        train_clm.parse_args(train_args(tiny_llama, data, tmp_path / "o", validation_file=data, noise_multiplier=1))
    # the training file as its own validation data: an exact statistic of the private set
    overlapping = write_records(tmp_path / "v.jsonl", [text_records[40], text_records[5]], jsonl=True)
    public = dict(validation_is_public=True, max_train_steps=0, noise_multiplier=1)
    with pytest.raises(UserInputError, match=r"v.jsonl: record 1 \(counting from 0\) is also a training record"):
        run(tiny_llama, data, tmp_path / "a", validation_file=overlapping, **public)
    # a person with records on both sides is refused too, named, under a privacy unit key
    units = write_units(tmp_path / "u.jsonl", {"ann": ["one text", "two texts"], "bob": ["three", "four"]})
    val = write_units(tmp_path / "uv.jsonl", {"cid": ["five"], "bob": ["a record of bob's not in training"]})
    unit = dict(privacy_unit_key="user", per_device_train_batch_size=1, delta=0.1)
    with pytest.raises(UserInputError, match="record 1 .* privacy unit 'user' = 'bob', which also has training rec"):
        run(tiny_llama, units, tmp_path / "b", validation_file=val, **public, **unit)
    with pytest.raises(UserInputError, match=r"v.jsonl: records lack the key\(s\) \['user'\]"):
        run(tiny_llama, units, tmp_path / "c", validation_file=overlapping, **public, **unit)
    disjoint = write_records(tmp_path / "w.json", text_records[40:44])
    run(tiny_llama, data, tmp_path / "d", validation_file=disjoint, **public)
    assert json.loads((tmp_path / "d" / "all_results.json").read_text())["eval_loss"] > 0


def test_a_known_dp_seed_gives_no_epsilon_and_never_reaches_the_tracker(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    out = tmp_path / "out"
    report = run(tiny_llama, data, out, max_train_steps=3, noise_multiplier=1, insecure_dp_seed=77, with_tracking=True)
    assert report["epsilon"] is None and report["epsilon_replace_one"] is None and report["ledger_epsilon"] is None
    assert 0 < report["epsilon_if_seed_secret"] < report["epsilon_replace_one_if_seed_secret"]
    assert "--insecure_dp_seed" in report["note"] and report["noise_source"].startswith("insecure")
    assert json.loads((out / "all_results.json").read_text())["epsilon"] is None
    assert all(row.get("epsilon") is None for row in json.loads((out / "training_log.json").read_text()))
    tracked = [p for p in glob.glob(str(out / "tracker" / "**"), recursive=True) if os.path.isfile(p)]
    assert tracked and not any(b"insecure_dp_seed" in open(p, "rb").read() for p in tracked)
    # no step's duration (it grows with the realised batch size): every row has the same wall time
    walltimes = {event.wall_time for path in tracked if "tfevents" in path for event in scalar_events(path)}
    assert len(walltimes) == 1


def scalar_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(path)
    events.Reload()
    return [event for tag in events.Tags()["scalars"] for event in events.Scalars(tag)]


def test_non_private_runs_say_they_release_exact_statistics(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:32])
    report = run(tiny_llama, data, tmp_path / "out", max_train_steps=2, clip_norm=-1, noise_multiplier=-1)
    assert report["releases_non_private_statistics"] is True and report["epsilon"] is None
    assert report["ledger_epsilon"] is None  # and the ledger knows these records had no guarantee


def test_curator_only_files_and_checkpoints_stay_in_the_work_folder(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:32])
    out, work = tmp_path / "out", tmp_path / "scratch"
    options = dict(max_train_steps=4, noise_multiplier=1, train_loss="exact", checkpointing_steps=2)
    report = run(tiny_llama, data, out, work_dir=str(work), **options)
    assert report["releases_non_private_statistics"] is True
    assert sorted(os.listdir(work)) == ["checkpoints", "training_log.NOT_PRIVATE_exact_losses.json"]
    released = sorted(os.listdir(out))
    assert released == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "all_results.json", "lora_weights.bin"]
        + ["privacy_report.json", "training_log.json"]
    )
    assert not any("train_loss" in row for row in json.loads((out / "training_log.json").read_text()))


def test_a_release_is_final_and_a_fresh_run_never_joins_an_unfinished_one(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:32])
    options = dict(max_train_steps=3, noise_multiplier=1, checkpointing_steps=1)
    run(tiny_llama, data, tmp_path / "out", **options)
    with pytest.raises(UserInputError, match="holds a finished run"):
        run(tiny_llama, data, tmp_path / "out", **options)
    os.makedirs(tmp_path / "elsewhere.work")
    os.rename(tmp_path / "out.work" / "checkpoints", tmp_path / "elsewhere.work" / "checkpoints")
    with pytest.raises(UserInputError, match="elsewhere.work: holds checkpoints of an unfinished run"):
        run(tiny_llama, data, tmp_path / "elsewhere", **options)
    os.makedirs(tmp_path / "busy" / "tracker")
    with pytest.raises(UserInputError, match=r"busy: already holds part of a release \(tracker\)"):
        run(tiny_llama, data, tmp_path / "busy", **options)


def test_user_level_runs_publish_units_never_records(tiny_llama, tmp_path):
    units = {f"u{k}": [f"record {j} of person {k}, who writes a little" for j in range(1 + k % 3)] for k in range(6)}
    data = write_units(tmp_path / "u.jsonl", units)  # 6 units, 12 records
    out = tmp_path / "out"
    options = dict(privacy_unit_key="user", per_device_train_batch_size=2, delta=0.1, max_train_steps=2)
    report = run(tiny_llama, data, out, noise_multiplier=1, checkpointing_steps=1, **options)
    assert report["dataset_size"] == report["num_units"] == 6
    saved = torch.load(tmp_path / "out.work" / "checkpoints" / "step_1" / "custom_checkpoint_0.pkl", weights_only=False)
    assert saved["run_facts"]["dataset_size"] == 6
