"""The private validation loss (utils/privacy/validation.py, docs/DESIGN.md 2.15): each validation unit's
mean loss clipped to [0, L], summed, one Gaussian draw of sigma_v L, over the number of units V;
each evaluation on the ledger under the validation units and composed into validation_epsilon."""

import json
import statistics

import pytest
import torch
from helpers import train_args, write_units
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_clm
from utils.cli import UserInputError
from utils.data_utils import Collator, tokenize_record
from utils.dp_randomness import DPRandomness
from utils.dp_utils import per_record_loss
from utils.privacy.accounting import compute_epsilon

VALIDATION = {"ann": ["a short sentence", "another one, a little longer"], "bob": ["three"], "cid": ["four, five"]}


def record_losses(model_path, texts, block_size=32):
    """Each record's loss under the base model (the initial adapter: LoRA B is zero), one at a time."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    losses = []
    for text in texts:
        batch = Collator([tokenize_record(tokenizer, "", text, block_size)], tokenizer.eos_token_id)([0])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.append(float(per_record_loss(logits, batch["labels"])[0][0]))
    return losses


@pytest.fixture
def data(text_records, tmp_path):
    train = {f"t{k}": [text_records[k][1]] for k in range(24)}
    return write_units(tmp_path / "train.jsonl", train), write_units(tmp_path / "val.jsonl", VALIDATION)


def run(model, train, val, out, **options):
    base = dict(validation_file=val, privacy_unit_key="user", block_size=32, per_device_train_batch_size=4)
    base |= dict(noise_multiplier=1, delta=1e-2)
    train_clm.main(train_args(model, train, out, **(base | options)))
    with open(out / "privacy_report.json") as f:
        return json.load(f), json.loads((out / "training_log.json").read_text())


def test_the_private_loss_is_the_mean_of_clipped_unit_losses(tiny_llama, data, tmp_path):
    losses = record_losses(tiny_llama, [t for texts in VALIDATION.values() for t in texts])
    unit_means = [(losses[0] + losses[1]) / 2, losses[2], losses[3]]
    clip = sorted(unit_means)[1]  # between the units' losses: one unit is clipped
    noise = DPRandomness(5).generator("validation_noise", 0)  # the run's one draw, from its known seed
    draw = float(torch.normal(0.0, 2.0 * clip, (1,), generator=noise, dtype=torch.float64))
    report, _ = run(
        tiny_llama,
        *data,
        tmp_path / "out",
        max_train_steps=0,
        validation_noise_multiplier=2.0,
        loss_clip=clip,
        insecure_dp_seed=5,
    )
    expected = (sum(min(m, clip) for m in unit_means) + draw) / 3
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(expected, abs=1e-4)
    assert report["validation"] == "private" and report["validation_units"] == 3  # units, not records
    assert report["validation_loss_clip"] == clip and report["validation_evaluations"] == 1


def test_evaluations_are_gaussian_of_sigma_l_over_v_and_accounted(tiny_llama, data, tmp_path):
    """30 evaluations of one unchanging adapter (learning rate 0): their noise, scaled by V / (sigma_v L),
    is standard normal; every evaluation is on the ledger and in validation_epsilon."""
    clip, sigma, steps = 20.0, 2.0, 30
    options = dict(max_train_steps=steps, eval_freq=1, learning_rate=0, validation_noise_multiplier=sigma)
    options["insecure_dp_seed"] = 8  # a fixed draw: the bounds below hold for it, not by chance
    report, log = run(tiny_llama, *data, tmp_path / "out", loss_clip=clip, **options)
    losses = record_losses(tiny_llama, [t for texts in VALIDATION.values() for t in texts])
    exact = ((losses[0] + losses[1]) / 2 + losses[2] + losses[3]) / 3
    evaluated = [row["eval_loss"] for row in log if "eval_loss" in row]
    final = json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_loss"]
    noise = [(loss - exact) * 3 / (sigma * clip) for loss in evaluated + [final]]
    assert len(noise) == steps and report["validation_evaluations"] == steps
    assert abs(statistics.mean(noise)) < 0.6 and 0.7 < statistics.stdev(noise) < 1.35
    composed = compute_epsilon(sigma, 1.0, steps, 1e-2)
    assert report["validation_epsilon_if_seed_secret"] == pytest.approx(composed, rel=1e-12)
    assert report["validation_epsilon"] is None and report["validation_ledger_epsilon"] is None  # a known seed
    assert report["ledger_steps"] == steps  # the training units' own spend: validation composes in parallel


def test_validation_epsilon_is_on_the_ledger(tiny_llama, data, tmp_path):
    options = dict(max_train_steps=4, eval_freq=2, validation_noise_multiplier=3.0)
    report, _ = run(tiny_llama, *data, tmp_path / "out", **options)
    assert report["validation_evaluations"] == 2  # after step 2, and the final one
    assert report["validation_epsilon"] == pytest.approx(compute_epsilon(3.0, 1.0, 2, 1e-2), rel=1e-12)
    # the same composition through dp_accounting's event path (its own Gaussian PLD: 5e-7 apart)
    assert report["validation_ledger_epsilon"] == pytest.approx(report["validation_epsilon"], rel=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(validation_noise_multiplier=1, validation_is_public=True), "not public: drop one"),
        (dict(validation_noise_multiplier=0), "must be positive"),
        (dict(), "or --validation_noise_multiplier for a private validation loss"),
        (dict(validation_noise_multiplier=1, delta=0.5), "below 1/N = 0.333 for a data set of 3 validation units"),
    ],
)
def test_validation_data_is_public_or_private_never_both(tiny_llama, data, tmp_path, options, message):
    with pytest.raises(UserInputError, match=message):
        run(tiny_llama, *data, tmp_path / "out", max_train_steps=0, **options)
