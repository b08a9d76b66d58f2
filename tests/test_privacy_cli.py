"""Privacy reports of real CLI runs against an independent accountant (prv_accountant)."""

import json
import os

import numpy as np
import pytest
from helpers import train_args, write_records
from prv_accountant import Accountant

import train_clm
from utils.privacy import plan as privacy


def run(model, data, out, *extra):
    sizes = dict(block_size=32, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_train_steps=10)
    train_clm.main([*train_args(model, data, out, **sizes, clip_norm=1, delta=1e-3), *extra])
    return json.loads(open(os.path.join(out, "privacy_report.json")).read())


def independent_epsilon(sigma, q, steps, delta):
    """(lower, estimate, upper) from prv_accountant, a different method and implementation."""
    return Accountant(
        noise_multiplier=sigma, sampling_probability=q, delta=delta, eps_error=0.005, max_compositions=steps
    ).compute_epsilon(num_compositions=steps)


def replace_one_epsilon(sigma, q, steps, delta, grid=4e-4):
    """Replace-one epsilon of the Poisson-subsampled Gaussian, composed here by FFT on a pessimistic
    grid (no accounting library): the dominating pair is (1-q) N(0, s^2) + q N(1, s^2) against
    (1-q) N(0, s^2) + q N(-1, s^2) (one record of gradient +C replaced by one of -C)."""
    x = np.linspace(-12 * sigma - 2, 12 * sigma + 2, 400_001)
    normal = lambda mu: np.exp(-((x - mu) ** 2) / (2 * sigma**2))  # noqa: E731
    p, r = (1 - q) * normal(0) + q * normal(1), (1 - q) * normal(0) + q * normal(-1)
    loss, mass = np.log(p / r), p / p.sum()
    bins = np.ceil((loss - loss.min()) / grid).astype(int)  # rounding the loss up: an upper bound
    pmf = np.bincount(bins, weights=mass)
    size = 1 << int(np.ceil(np.log2(steps * len(pmf))))
    composed = np.fft.irfft(np.fft.rfft(pmf, size) ** steps, size).clip(min=0)
    values = steps * loss.min() + np.arange(size) * grid

    def delta_at(eps):
        return float((composed * -np.expm1(np.minimum(eps - values, 0))).sum())

    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def test_reported_epsilons_match_independent_computations(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    report = run(tiny_llama, data, tmp_path / "out", "--noise_multiplier", "1.0")
    assert report["sampling"] == "poisson"
    assert report["sampling_rate"] == 0.125 and report["expected_batch_size"] == 8
    assert report["steps"] == 10 and report["dataset_size"] == 64 and report["num_processes"] == 1
    # the private training loss is released on the same sample: gradient and loss form one Gaussian
    assert report["noise_multiplier"] == 1.0 and report["loss_noise_multiplier"] == pytest.approx(3.2)
    effective = (1.0 + 3.2**-2) ** -0.5
    assert report["effective_noise_multiplier"] == pytest.approx(effective, rel=1e-12)
    _, estimate, _ = independent_epsilon(effective, 0.125, 10, 1e-3)
    assert estimate * 0.995 <= report["epsilon"] <= estimate * 1.03
    replace_one = replace_one_epsilon(effective, 0.125, 10, 1e-3)
    assert report["epsilon_replace_one"] == pytest.approx(replace_one, rel=0.02)
    assert report["epsilon_replace_one"] > 1.2 * report["epsilon"]


def test_train_loss_off_keeps_the_gradient_noise_of_a_run_that_releases_no_loss(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    off = run(tiny_llama, data, tmp_path / "off", "--target_epsilon", "3", "--train_loss", "off")
    assert off["loss_noise_multiplier"] is None and off["train_loss"] == "off"
    assert off["noise_multiplier"] == off["effective_noise_multiplier"]
    assert off["noise_multiplier"] == privacy.noise_multiplier_for_epsilon(3.0, 0.125, 10, 1e-3)
    assert "train_loss" not in json.loads(open(tmp_path / "off" / "training_log.json").read())[0]
    private = run(tiny_llama, data, tmp_path / "private", "--target_epsilon", "3")
    assert private["effective_noise_multiplier"] == pytest.approx(off["noise_multiplier"], rel=1e-12)
    assert 1.0 < private["noise_multiplier"] / off["noise_multiplier"] <= 1.05  # what releasing the loss costs
    assert private["epsilon"] == pytest.approx(off["epsilon"], rel=1e-9)


def test_replace_one_relation_drives_the_target(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    report = run(tiny_llama, data, tmp_path / "out", "--target_epsilon", "3", "--neighboring_relation", "replace_one")
    assert report["neighboring_relation"] == "replace_one"
    assert 2.99 <= report["epsilon_replace_one"] <= 3.0 and report["epsilon"] < 2.9


def test_target_epsilon_lands_just_under_the_target(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:64])
    report = run(tiny_llama, data, tmp_path / "out", "--target_epsilon", "3")
    assert 2.85 <= report["epsilon"] <= 3.0
    _, _, upper = independent_epsilon(report["noise_multiplier"], 0.125, 10, 1e-3)
    assert upper <= 3.0 * 1.005  # the sigma we used meets the target under the other accountant too


def test_run_stops_before_exceeding_its_target(tiny_llama, text_records, tmp_path, monkeypatch):
    """Defence in depth: even with a sigma too small for the plan, no step goes past the target."""
    data = write_records(tmp_path / "d.json", text_records[:64])
    too_small = privacy.noise_multiplier_for_epsilon(3.0, 0.125, 4, 1e-3)  # calibrated for 4 steps, not 10
    monkeypatch.setattr(privacy, "noise_multiplier_for_epsilon", lambda *a: too_small)
    report = run(tiny_llama, data, tmp_path / "out", "--target_epsilon", "3")
    assert report["epsilon"] <= 3.0
    assert 4 <= report["steps"] < 10


def test_shuffle_runs_from_epochs_and_says_its_epsilon_is_a_poisson_figure(tiny_llama, text_records, tmp_path, capsys):
    data = write_records(tmp_path / "d.json", text_records[:60])
    out = tmp_path / "out"
    sizes = dict(block_size=32, per_device_train_batch_size=8, num_train_epochs=1.5, sampling="shuffle")
    train_clm.main(train_args(tiny_llama, data, out, **sizes, clip_norm=1, noise_multiplier="1.0", delta=1e-3))
    report = json.loads((out / "privacy_report.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    assert report["steps"] == results["steps"] == 12  # 1.5 epochs of ceil(60 / 8) = 8 batches
    caveat = "not a proven guarantee"
    assert caveat in report["note"] and caveat in results["note"]
    assert caveat in capsys.readouterr().out
