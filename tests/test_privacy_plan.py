"""utils/privacy/plan.py: the privacy flags typed and checked in one place, the plan decided once,
and the sampler and DP gradient built from them."""

import dataclasses
import math

import pytest
import torch

import train_clm
from utils.cli import UserInputError
from utils.dp_randomness import DPRandomness
from utils.dp_utils import DPGradient
from utils.privacy.plan import PrivacyArguments, make_privacy_plan
from utils.privacy.sampling import PoissonSampler, UnitPoissonSampler, make_sampler
from utils.train_utils import tracker_config

BASE = ["--model_name_or_path", "m", "--output_dir", "o", "--train_file", "t"]


def parsed(*extra):
    return train_clm.parse_args([*BASE, *extra])


def test_privacy_flags_have_one_home():
    args = parsed("--target_epsilon", "3", "--delta", "1e-6", "--privacy_unit_key", "author", "--insecure_dp_seed", "7")
    privacy = args.privacy
    assert isinstance(privacy, PrivacyArguments)
    assert (privacy.target_epsilon, privacy.delta, privacy.privacy_unit_key) == (3.0, 1e-6, "author")
    # no second copy on the namespace that code could read instead
    for field in dataclasses.fields(PrivacyArguments):
        assert not hasattr(args, field.name), field.name
    # the unit flags are privacy flags: --help lists them in the privacy group
    parser_help = _help_text()
    privacy_section = parser_help[parser_help.index("privacy:") :]
    assert "--privacy_unit_key" in privacy_section and "--max_records_per_unit" in privacy_section
    # the tracker sees the public flags, never the testing seed
    config = tracker_config(args)
    assert config["target_epsilon"] == 3.0 and config["privacy_unit_key"] == "author"
    assert "insecure_dp_seed" not in config and "7" not in str(config.get("privacy", ""))


def _help_text():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        train_clm.parse_args(["--help"])
    return out.getvalue()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--noise_multiplier", "1", "--max_records_per_unit", "0"], "--max_records_per_unit 0"),
        (["--noise_multiplier", "1", "--privacy_unit_key", "a", "--sampling", "shuffle"], "excludes --sampling"),
        (["--clip_norm", "-1", "--noise_multiplier", "1"], "non-private mode needs both"),
    ],
)
def test_privacy_flags_are_checked_together(flags, message):
    with pytest.raises(UserInputError, match=message):
        parsed(*flags)


def _sampler(n=1000, units=None, sampling="poisson"):
    return make_sampler(sampling, n, 4, 2, 1, 0, DPRandomness(insecure_seed=0), units=units, max_records_per_unit=2)


def test_make_sampler_builds_the_unit_sampler_from_units():
    units = [[0, 1, 2], [3], [4, 5]]
    sampler = _sampler(6, units)
    assert isinstance(sampler, UnitPoissonSampler) and sampler.n == 3 and sampler.records_beyond_cap() == 1
    assert type(_sampler()) is PoissonSampler and _sampler().records_beyond_cap() == 0
    with pytest.raises(ValueError, match="Poisson"):
        _sampler(6, units, "shuffle")
    # each micro-batch comes with its records' unit slots, so the step clips each unit once
    for step in range(20):
        for indices, slots in sampler.record_batches(step):
            if slots is not None:
                assert len(slots) == len(indices) and int(slots.max()) + 1 < len(indices)


def test_plan_calibrates_sigma_to_the_target_and_builds_the_dp_gradient(tiny_llama):
    from transformers import AutoModelForCausalLM

    from utils.lora_utils import add_lora

    args = parsed("--target_epsilon", "2", "--delta", "1e-5", "--train_loss", "off")
    sampler = _sampler()
    plan = make_privacy_plan(args.privacy, sampler, 50, 1.0, say=lambda *_: None)
    assert plan.private and plan.noise_multiplier > 0
    assert math.isclose(plan.epsilon(plan.steps), 2.0, rel_tol=1e-2) and plan.epsilon(plan.steps) <= 2.0 + 1e-9
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), r=2, alpha=2)
    dp = DPGradient.from_plan(model, plan, DPRandomness(insecure_seed=0))
    assert dp.private and dp.noise_multiplier == plan.noise_multiplier and dp.clip_norm == args.privacy.clip_norm
    assert dp.expected_batch_size == sampler.expected_batch_size == 8
    dp.detach()

    off = parsed("--clip_norm", "-1", "--noise_multiplier", "-1")
    plain = make_privacy_plan(off.privacy, sampler, 50, 1.0, say=lambda *_: None)
    assert not plain.private and plain.noise_multiplier is None and plain.accountant is None
    dp = DPGradient.from_plan(model, plain, None)
    assert not dp.private and dp.noise_multiplier == 0 and dp.store.buffer is None


def test_dp_gradient_takes_no_sentinels(tiny_llama):
    from transformers import AutoModelForCausalLM

    from utils.lora_utils import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), r=2, alpha=2)
    for clip, sigma in ((-1, -1), (0.0, 1.0), (None, 1.0), (1.0, -1)):
        with pytest.raises(ValueError):
            DPGradient(model, clip, sigma, 4)
    assert all(not hasattr(m, "forward") or "forward" not in vars(m) for m in model.modules())
    assert torch.is_grad_enabled()
