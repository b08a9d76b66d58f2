"""Privacy reports of real CLI runs against an independent accountant (prv_accountant)."""

import json
import os

from prv_accountant import Accountant

from conftest import write_records

import train_clm


def run(model, data, out, *extra):
    train_clm.main([
        "--train_file", data, "--model_name_or_path", model, "--output_dir", str(out), "--block_size", "32",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--clip_norm", "1",
        "--max_train_steps", "10", "--delta", "1e-3", *extra,
    ])
    return json.loads(open(os.path.join(out, "privacy_report.json")).read())


def independent_epsilon(sigma, q, steps, delta):
    """(lower, estimate, upper) from prv_accountant, a different method and implementation."""
    return Accountant(noise_multiplier=sigma, sampling_probability=q, delta=delta, eps_error=0.005,
                      max_compositions=steps).compute_epsilon(num_compositions=steps)


def test_reported_epsilon_matches_independent_pld(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    report = run(tiny_llama, data, tmp_path / "out", "--noise_multiplier", "1.0")
    assert report["sampling"] == "poisson"
    assert report["sampling_rate"] == 0.125 and report["expected_batch_size"] == 8
    assert report["steps"] == 10 and report["dataset_size"] == 64 and report["num_processes"] == 1
    _, estimate, _ = independent_epsilon(1.0, 0.125, 10, 1e-3)
    assert estimate * 0.995 <= report["epsilon"] <= estimate * 1.03


def test_target_epsilon_lands_just_under_the_target(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    report = run(tiny_llama, data, tmp_path / "out", "--target_epsilon", "3")
    assert 2.85 <= report["epsilon"] <= 3.0
    _, _, upper = independent_epsilon(report["noise_multiplier"], 0.125, 10, 1e-3)
    assert upper <= 3.0 * 1.005  # the sigma we used meets the target under the other accountant too


def test_run_stops_before_exceeding_its_target(tiny_llama, text_records, tmp_path, monkeypatch):
    """Defence in depth: even with a sigma too small for the plan, no step goes past the target."""
    data = write_records(tmp_path / "d.json", text_records[:64])
    too_small = train_clm.noise_multiplier_for_epsilon(3.0, 0.125, 4, 1e-3)  # calibrated for 4 steps, not 10
    monkeypatch.setattr(train_clm, "noise_multiplier_for_epsilon", lambda *a: too_small)
    report = run(tiny_llama, data, tmp_path / "out", "--target_epsilon", "3")
    assert report["epsilon"] <= 3.0
    assert 4 <= report["steps"] < 10
