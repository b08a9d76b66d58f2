"""utils/train_utils.py: the optimizer and its learning-rate schedule, the per-record losses and the
token-weighted evaluation on a tiny Llama, and the configuration handed to the tracker. The DP step
and what each step publishes follow the privacy plan: train_clm.py's tests cover them."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from helpers import cli_flags
from transformers import AutoModelForCausalLM

import train_clm
from utils.cli import UserInputError
from utils.data_utils import Collator, tokenize_record
from utils.model.model_utils import load_tokenizer
from utils.train_utils import build_optimizer, evaluate, forward_losses, tracker_config

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(**options):
    """train_clm.py's arguments as its own parser gives them (every default included)."""
    required = dict(model_name_or_path="unused", train_file="unused.jsonl", output_dir="unused", noise_multiplier=1.0)
    return train_clm.parse_args(cli_flags(**required, **options))


# ---- the optimizer ----------------------------------------------------------------------------


def one_parameter(*values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_adamw_uses_the_given_learning_rate_decoupled_weight_decay_and_epsilon():
    p = one_parameter(1.0, 1.0)
    optimizer, _ = build_optimizer([p], parse(learning_rate=0.1, weight_decay=0.5, adam_epsilon=1.0), 10)
    assert isinstance(optimizer, torch.optim.AdamW)
    p.grad = torch.tensor([0.5, 0.0], dtype=torch.float64)
    optimizer.step()
    # AdamW's first step (bias corrections cancel): p <- p (1 - lr wd) - lr g / (|g| + eps); the
    # default eps 1e-8 would move the first coordinate by lr, not lr / 3
    expected = [1.0 * (1 - 0.1 * 0.5) - 0.1 * 0.5 / (0.5 + 1.0), 1.0 * (1 - 0.1 * 0.5)]
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adamw_momentum_is_adam_beta1(beta1):
    # Two opposite gradients +-g: the bias-corrected second moment is g^2 at both steps, and the
    # bias-corrected first moment at step two is ((1 - b1) b1 g - (1 - b1) g) / (1 - b1^2). Without
    # momentum the second step undoes the first exactly; with 0.9 it moves back only 1/19 of it.
    lr, g = 0.1, 0.5
    p = one_parameter(1.0)
    optimizer, _ = build_optimizer([p], parse(learning_rate=lr, adam_beta1=beta1, adam_epsilon=1e-12), 10)
    for grad in (g, -g):
        p.grad = torch.tensor([grad], dtype=torch.float64)
        optimizer.step()
    momentum = ((1 - beta1) * beta1 * g - (1 - beta1) * g) / (1 - beta1**2)
    expected = 1.0 - lr - lr * momentum / g
    assert p.item() == pytest.approx(expected, abs=1e-9)
    assert (p.item() == pytest.approx(1.0, abs=1e-9)) == (beta1 == 0.0)


@pytest.mark.parametrize("flag, value", [("adam_beta1", 1.0), ("adam_beta2", -0.1)])
def test_adam_betas_outside_zero_one_are_refused(flag, value):
    with pytest.raises(UserInputError, match=f"--{flag} {value}: must be in"):
        parse(**{flag: value})


def test_sgd_is_plain_gradient_descent_with_coupled_weight_decay_and_no_momentum():
    p = one_parameter(1.0, 1.0)
    optimizer, _ = build_optimizer([p], parse(optimizer="sgd", learning_rate=0.1, weight_decay=0.5), 10)
    assert isinstance(optimizer, torch.optim.SGD)
    expected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for _ in range(2):  # the second step equals the first rule again: no momentum carries over
        p.grad = torch.tensor([0.5, 0.0], dtype=torch.float64)
        optimizer.step()
        expected = expected - 0.1 * (torch.tensor([0.5, 0.0], dtype=torch.float64) + 0.5 * expected)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def schedule(kind, lr, warmup, total, k):
    """The learning rate after k scheduler steps, from the schedules' definitions."""
    if kind != "constant" and k < warmup:
        return lr * k / warmup
    progress = (k - warmup) / (total - warmup)
    return {
        "linear": lr * max(0.0, 1 - progress),
        "cosine": lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress))),
        "constant": lr,
        "constant_with_warmup": lr,
    }[kind]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_the_schedule_warms_up_and_spans_exactly_the_total_steps(kind):
    lr, warmup, total = 0.2, 3, 12
    optimizer, scheduler = build_optimizer(
        [one_parameter(0.0)], parse(learning_rate=lr, lr_scheduler_type=kind, num_warmup_steps=warmup), total
    )
    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([schedule(kind, lr, warmup, total, k) for k in range(total + 1)], abs=1e-12)
    if kind in ("linear", "cosine"):
        assert rates[-1] == pytest.approx(0.0, abs=1e-12) and max(rates) == pytest.approx(lr)


def test_no_planned_steps_keeps_the_learning_rate_it_was_given():
    """--max_train_steps 0 saves the initial adapter: building the optimizer must not fail."""
    optimizer, _ = build_optimizer([one_parameter(0.0)], parse(learning_rate=0.05), 0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


# ---- losses and evaluation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def records(tiny_llama, text_records):
    """Seven tokenized records of different lengths, some with a prompt (no loss on its tokens)."""
    tokenizer = load_tokenizer(tiny_llama)
    rows = [tokenize_record(tokenizer, instruction, answer, 128) for instruction, answer in text_records[:7]]
    assert len({len(r["input_ids"]) for r in rows}) > 3 and len({r["prompt_len"] for r in rows}) > 1
    return rows, tokenizer.pad_token_id


def record_token_losses(model, row):
    """Next-token losses of one record alone (no padding), on its answer tokens only."""
    ids = row["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return [-float(log_probs[t - 1, ids[t]]) for t in range(max(row["prompt_len"], 1), len(ids))]


def test_forward_losses_are_each_records_own_mean_whatever_its_batch(model, records):
    rows, pad = records
    batch = Collator(rows, pad)([0, 5, None, 3])  # right-padded, with a masked dummy record
    with torch.no_grad():
        losses, counts = forward_losses(model.eval(), batch, Accelerator(cpu=True))
    for k, i in ((0, 0), (1, 5), (3, 3)):
        alone = record_token_losses(model, rows[i])
        assert int(counts[k]) == len(alone)
        assert float(losses[k]) == pytest.approx(sum(alone) / len(alone), rel=1e-5)
    assert float(losses[2]) == 0.0 and int(counts[2]) == 0  # the dummy record adds nothing


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10])
def test_eval_loss_is_the_mean_loss_per_token_and_perplexity_its_exponential(model, records, batch_size):
    rows, pad = records
    per_record = [record_token_losses(model, row) for row in rows]
    per_token = sum(map(sum, per_record)) / sum(map(len, per_record))
    per_record_mean = sum(sum(r) / len(r) for r in per_record) / len(per_record)
    assert abs(per_token - per_record_mean) > 1e-3  # records of different lengths tell the two apart

    model.train()
    result = evaluate(model, rows, Collator(rows, pad), batch_size, Accelerator(cpu=True))
    assert model.training  # evaluation hands the model back in training mode
    assert result["eval_loss"] == pytest.approx(per_token, rel=1e-5)
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-12)


# ---- the tracker's configuration --------------------------------------------------------------


def test_tracker_config_holds_plain_values_and_neither_the_token_nor_the_dp_seed():
    token, seed = "hf_TEST_token_never_published", 918273645
    args = parse(access_token=token, insecure_dp_seed=seed, learning_rate=0.01, lr_scheduler_type="cosine")
    config = tracker_config(args)
    assert all(isinstance(v, (int, float, str, bool)) for v in config.values())
    published = json.dumps(config)  # what a tracker stores
    assert token not in published and str(seed) not in published
    assert config["learning_rate"] == 0.01 and config["lr_scheduler_type"] == "cosine"
    assert config["model_name_or_path"] == "unused" and config["max_train_steps"] == "None"
