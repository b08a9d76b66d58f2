"""scripts/audit_privacy.py: the one-run epsilon lower bound, and the audit of real training runs.

With clipping and noise off the audit must find clear leakage (the attack has power); with DP on
its lower bound must stay below the epsilon the run claims."""

import json
import math
import random

import pytest
import torch
from helpers import cli_flags

from scripts import audit_privacy as audit
from scripts import audit_release

# ---- the bound itself ----


@pytest.mark.parametrize("r", [16, 64, 200])
def test_all_guesses_correct_matches_the_closed_form(r):
    # delta 0, v = r: P[Bin(r, p) >= r] = p^r = 0.05  ->  p = 0.05^(1/r), eps = log(p / (1 - p))
    p = 0.05 ** (1 / r)
    assert audit.epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_chance_level_gives_no_evidence_and_the_bound_grows_with_correct_guesses():
    assert audit.epsilon_lower_bound(100, 100, 50, 1e-5) == 0.0
    assert audit.epsilon_lower_bound(100, 100, 58, 1e-5) == 0.0  # within chance at 95%
    bounds = [audit.epsilon_lower_bound(100, 100, v, 1e-5) for v in range(60, 101, 5)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    # delta only ever weakens the conclusion
    assert audit.epsilon_lower_bound(100, 100, 90, 1e-3) < audit.epsilon_lower_bound(100, 100, 90, 0.0)


def test_bound_is_valid_for_randomized_response():
    """eps-DP randomized response on each inclusion bit: the 95% bound exceeds eps in ~5% of trials."""
    rng, eps, m, trials = random.Random(0), 1.0, 200, 400
    p = math.exp(eps) / (1 + math.exp(eps))
    above = 0
    for _ in range(trials):
        correct = sum(rng.random() < p for _ in range(m))
        above += audit.epsilon_lower_bound(m, m, correct, 0.0, 0.95) > eps
    assert above / trials <= 0.08


def test_guessing_takes_top_and_bottom_scores():
    scores = [5, 4, 3, 2, 1, 0]
    included = [True, True, False, True, False, False]
    assert audit.guess_and_count(scores, included, 6) == (3, 3, 4)  # 0, 1 in; 4, 5 out
    assert audit.guess_and_count(scores, included, 4) == (2, 2, 4)  # abstains on the middle two
    assert audit.guess_and_count(scores, included, 1) == (1, 0, 1)


# ---- audits of real runs of train_clm.py ----


def audit_main(*args):
    threads = torch.get_num_threads()
    try:
        return audit.main(list(args))
    finally:
        torch.set_num_threads(threads)  # the script sets 1 for its tiny model


def run_audit(tmp_path, capsys, *extra):
    out = tmp_path / "audit"
    result = audit_main("--output_dir", str(out), "--insecure_dp_seed", "1", *extra)
    printed = capsys.readouterr().out
    assert "claimed epsilon:" in printed and "empirical epsilon lower bound:" in printed
    saved = json.loads((out / "audit.json").read_text())
    assert saved["empirical_epsilon_lower_bound"] == result["empirical_epsilon_lower_bound"]
    assert saved["num_canaries"] == 256 and saved["num_guesses"] == 100 and 0 < saved["num_included"] < 256
    return result


def test_audit_without_privacy_finds_clear_leakage(tmp_path, capsys):
    result = run_audit(tmp_path, capsys, "--non_private")
    assert result["claimed_epsilon"] is None
    assert result["mean_score_included"] > result["mean_score_excluded"] + 1.0
    # 100 of 100 right gives 3.49; seeds 1-4 measured 99-100 right
    assert result["empirical_epsilon_lower_bound"] > 2.0, result["correct_guesses"]


@pytest.mark.slow
def test_audit_with_dp_stays_below_the_claimed_epsilon(tmp_path, capsys):
    result = run_audit(tmp_path, capsys, "--target_epsilon", "4")
    assert result["claimed_epsilon"] == pytest.approx(4, rel=2e-3)
    assert result["noise_multiplier"] > 0 and result["clip_norm"] == 1
    assert result["empirical_epsilon_lower_bound"] <= result["claimed_epsilon"], result["correct_guesses"]


# ---- the release beside the adapter: logged training losses ----


def test_release_audit_bound_from_rates():
    assert audit_release.epsilon_from_rates(5, 5, 10, 1e-5, 0.95) == 0.0
    p = 0.025 ** (1 / 100)  # one-sided Clopper-Pearson bounds at 97.5% each for 100 of 100 and 0 of 100
    assert audit_release.epsilon_from_rates(100, 0, 100, 0.0, 0.95) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    strong = [audit_release.epsilon_from_rates(k, 2, 100, 1e-5, 0.95) for k in (60, 80, 95)]
    assert strong[0] < strong[1] < strong[2]


@pytest.mark.slow
@pytest.mark.parametrize("train_loss", ["exact", "private"])
def test_release_attack_catches_exact_losses_and_not_private_ones(tmp_path, capsys, train_loss):
    """Neighbouring data sets of the same size, one with a high-loss canary: the largest logged loss
    gives the canary away when losses are exact, and is at chance level when they are private."""
    runs = dict(num_runs=12, calibration_runs=8)
    result = audit_main(*cli_flags(output_dir=tmp_path / "audit", attack="release", **runs, train_loss=train_loss))
    assert "empirical epsilon lower bound:" in capsys.readouterr().out
    saved = json.loads((tmp_path / "audit" / "audit_release.json").read_text())
    assert saved == result and result["train_loss"] == train_loss
    claimed = result["claimed_epsilon_replace_one"]
    assert 0.15 < claimed < 0.3  # target 0.1 (add/remove); same-size neighbours are replace-one
    if train_loss == "exact":
        # the canary's runs stand out (the threshold is the largest of 8 calibration runs, so about
        # one run in nine without it is flagged too), beyond what the claim allows
        assert result["flagged_with_canary"] >= 10 and result["flagged_without_canary"] <= 4
        assert result["empirical_epsilon_lower_bound"] > claimed
    else:
        assert result["empirical_epsilon_lower_bound"] == 0.0
        assert abs(result["flagged_with_canary"] - result["flagged_without_canary"]) <= 3


@pytest.mark.parametrize("mode", ["--non_private", "dp"])
def test_unit_level_audit_with_canaries_of_three_records(tmp_path, capsys, mode):
    """Each canary is a privacy unit of three records: without noise the audit sees them, with DP at
    unit level its bound stays below the claim."""
    extra = [mode] if mode != "dp" else ["--target_epsilon", "4"]
    canaries = dict(unit_records=3, num_canaries=64, num_guesses=40)
    result = audit_main(*cli_flags(output_dir=tmp_path / "audit", insecure_dp_seed=1, **canaries), *extra)
    assert "of 3 records each" in capsys.readouterr().out
    assert result["records_per_canary"] == 3 and result["privacy_unit"] == "unit"
    if mode == "dp":
        assert result["empirical_epsilon_lower_bound"] <= result["claimed_epsilon"], result["correct_guesses"]
    else:
        assert result["mean_score_included"] > result["mean_score_excluded"] + 0.5
        assert result["empirical_epsilon_lower_bound"] > 1.0, result["correct_guesses"]
