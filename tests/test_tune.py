"""Accounted hyperparameter tuning (scripts/tune.py): the procedure's epsilon against Papernot and
Steinke's bound, the number of trials follows its distribution, only the best trial survives, and
the ledger charges the procedure once, before any trial, whatever the number of trials."""

import json
import math
import os
import random
import statistics

import pytest
from helpers import cli_flags, train_args, write_records
from scipy.stats import norm

import train_clm
from scripts import tune
from utils.cli import UserInputError
from utils.privacy.accounting import composed_epsilon, compute_epsilon, compute_epsilon_rdp
from utils.privacy.ledger import PrivacyLedger


def papernot_steinke(sigma, steps, mean, delta):
    """Theorem 2 of Papernot and Steinke (2022) for K ~ Poisson(mean) repetitions of `steps` Gaussian
    steps (q = 1, so the trial is one Gaussian of mu = sqrt(steps) / sigma): the trial's RDP
    lambda mu^2 / 2, its exact (epshat, deltahat) curve, then the RDP-to-DP conversion, over orders."""
    mu = math.sqrt(steps) / sigma
    best = math.inf
    for order in [1.5 + 0.25 * i for i in range(400)]:
        epshat = math.log1p(1 / (order - 1))
        deltahat = norm.cdf(-epshat / mu + mu / 2) - math.exp(epshat) * norm.cdf(-epshat / mu - mu / 2)
        rdp = order * mu * mu / 2 + mean * deltahat + math.log(mean) / (order - 1)
        best = min(best, rdp + math.log1p(-1 / order) - math.log(delta * order) / (order - 1))
    return best


@pytest.mark.parametrize("sigma, steps, mean", [(4.0, 10, 3), (2.0, 5, 10), (8.0, 50, 4)])
def test_procedure_epsilon_against_the_papers_bound(sigma, steps, mean):
    ours = composed_epsilon({(1.0, sigma, steps, mean, math.inf): 1}, 1e-5)
    bound = papernot_steinke(sigma, steps, mean, 1e-5)
    # dp-accounting takes deltahat from the trial's RDP (an upper bound on the exact one used above)
    assert bound <= ours <= 1.25 * bound
    assert ours < compute_epsilon(sigma, 1.0, steps * mean, 1e-5)  # below `mean` trials composed naively


@pytest.mark.parametrize("distribution, mean", [("poisson", 3.0), ("geometric", 3.0), ("geometric", 1.5)])
def test_the_number_of_trials_follows_its_distribution(distribution, mean):
    rng = random.Random(7)
    draws = [tune.draw_trials(mean, distribution, rng) for _ in range(6000)]
    assert abs(statistics.mean(draws) - mean) < 0.1
    if distribution == "poisson":  # variance = mean, and K = 0 with probability e^-mean
        assert abs(statistics.variance(draws) - mean) < 0.3
        assert abs(draws.count(0) / len(draws) - math.exp(-mean)) < 0.015
    else:  # geometric on {1, 2, ...}: P(K = 1) = 1 / mean, variance (1 - p) / p^2
        p = 1 / mean
        assert min(draws) == 1 and abs(draws.count(1) / len(draws) - p) < 0.02
        assert abs(statistics.variance(draws) - (1 - p) / p**2) < 0.4


def test_only_the_best_trial_is_released_and_the_procedure_is_charged_once(
    tiny_llama, text_records, tmp_path, monkeypatch
):
    data = write_records(tmp_path / "d.json", text_records[:64])
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": [1e-3, 3e-2], "lora_r": [2, 4]}))
    monkeypatch.setattr(tune, "draw_trials", lambda mean, distribution: 3)  # K is secret: fixed here
    sizes = dict(block_size=32, per_device_train_batch_size=8, max_train_steps=4, target_epsilon=4, delta=1e-3)
    out = tmp_path / "runs" / "tuned"
    options = dict(search_space=str(space), mean_trials=2, output_dir=str(out))
    report = tune.main([*cli_flags(train_file=data, model_name_or_path=tiny_llama, **sizes), *cli_flags(**options)])
    assert sorted(os.listdir(tmp_path / "runs")) == ["tuned"]  # no trial, work folder or scratch survives
    assert "adapter_model.safetensors" in os.listdir(out)
    saved = json.loads((out / "privacy_report.json").read_text())
    assert saved == report and saved["epsilon"] == saved["procedure_epsilon"]
    q, sigma = saved["sampling_rate"], saved["effective_noise_multiplier"]
    assert saved["procedure_epsilon"] == pytest.approx(composed_epsilon({(q, sigma, 4, 2.0, 1.0): 1}, 1e-3))
    assert saved["trial_epsilon"] <= 4 < saved["procedure_epsilon"]
    assert saved["naive_epsilon_at_mean"] == pytest.approx(compute_epsilon_rdp(sigma, q, 2 * 4, 1e-3))
    assert saved["tuning"]["chosen"]["lora_r"] in (2, 4)
    # three trials ran on the data, yet the ledger (and the report) count the procedure once
    assert saved["ledger_steps"] == 4 and saved["ledger_epsilon"] == pytest.approx(saved["epsilon"], rel=1e-9)
    ledger = PrivacyLedger(os.environ["DP_LEDGER_DIR"])
    trials = [e for e in ledger.read().sessions.values() if e["purpose"] == "trial"]
    assert len(trials) == 3
    # K itself is in no key of the release: only the distribution's public parameters are
    public = {"trial_distribution", "mean_trials", "search_space", "score", "target_procedure_epsilon", "chosen"}
    assert set(saved["tuning"]) == public
    assert not [key for key in saved if "trials" in key]


def test_a_trial_outside_its_procedure_is_refused(tiny_llama, text_records, tmp_path):
    data = write_records(tmp_path / "d.json", text_records[:32])
    args = train_args(
        tiny_llama, data, tmp_path / "out", max_train_steps=1, noise_multiplier=1, delta=1e-3, block_size=32
    )
    with pytest.raises(UserInputError, match="a tuning trial outside its procedure"):
        train_clm.main([*args, "--ledger_procedure", "0123456789abcdef"])


@pytest.mark.parametrize(
    "space, message",
    [
        ({"noise_multiplier": [1, 2]}, "'noise_multiplier' cannot be searched"),
        ({"per_device_train_batch_size": [4, 8]}, "'per_device_train_batch_size' cannot be searched"),
        ({"learning_rate": []}, "must list at least one value"),
    ],
)
def test_a_search_space_may_not_change_the_mechanism(tmp_path, space, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    with pytest.raises(UserInputError, match=message):
        tune.parse_args(["--search_space", str(path), "--output_dir", str(tmp_path / "o")])


def test_a_procedure_target_sets_the_trials_noise_so_the_whole_procedure_costs_it(
    tiny_llama, text_records, tmp_path, monkeypatch
):
    data = write_records(tmp_path / "d.json", text_records[:64])
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": [1e-3, 3e-2]}))
    monkeypatch.setattr(tune, "draw_trials", lambda mean, distribution: 2)
    sizes = dict(block_size=32, per_device_train_batch_size=8, max_train_steps=3, delta=1e-3)
    options = dict(search_space=str(space), mean_trials=3, output_dir=str(tmp_path / "tuned"))
    flags = [*cli_flags(train_file=data, model_name_or_path=tiny_llama, **sizes), *cli_flags(**options)]
    report = tune.main([*flags, "--target_procedure_epsilon", "5"])
    assert 0.999 * 5 <= report["procedure_epsilon"] <= 5 and report["epsilon"] == report["procedure_epsilon"]
    q, sigma = report["sampling_rate"], report["effective_noise_multiplier"]
    assert report["procedure_epsilon"] == pytest.approx(composed_epsilon({(q, sigma, 3, 3.0, 1.0): 1}, 1e-3))
    assert report["trial_epsilon"] < 5 and report["tuning"]["target_procedure_epsilon"] == 5
    with pytest.raises(UserInputError, match="--target_epsilon: not with --target_procedure_epsilon"):
        tune.parse_args([*flags, "--target_procedure_epsilon", "5", "--target_epsilon", "3"])
