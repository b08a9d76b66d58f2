"""Per-example gradients, clipping and noise (docs/DESIGN.md 2.2-2.4, 2.7) on real tiny models."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.data_utils import Collator, tokenize_record
from utils.dp_randomness import DPRandomness
from utils.dp_utils import DPGradient, per_record_loss
from utils.lora_utils import add_lora
from utils.tiny_models import randomise_lora_b

RECORDS = [
    ("Q:", "a short answer"),
    ("", "a much longer answer with quite a few more tokens in it than the first"),
    ("Question: what now?", "three words here"),
    ("", "x"),
]


def lora_model(path, dtype=torch.float64, gradient_ckpt=False, freeze_a=False):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if gradient_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return randomise_lora_b(add_lora(model, r=4, alpha=8, seed=0, freeze_a=freeze_a)).train()


def batch_of(path, records, block_size=48):
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [tokenize_record(tokenizer, i, a, block_size) for i, a in records]
    return Collator(rows, tokenizer.eos_token_id)


def loss_of(model, batch, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_record_loss(logits, batch["labels"])[0]


def per_example_grads(model, collate, indices, autocast=False):
    dp = DPGradient(model, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=len(indices))
    loss_of(model, collate(indices), autocast).sum().backward()
    grads = [dp.store.grads[p] for p in dp.params]
    assert all(p.grad is None for p in dp.params), "autograd must not also compute the summed LoRA gradient"
    dp.detach()
    return grads


def brute_force_grads(model, collate, indices, autocast=False):
    params = [p for p in model.parameters() if p.requires_grad]
    out = [[] for _ in params]
    for i in indices:
        model.zero_grad(set_to_none=True)
        loss_of(model, collate([i]), autocast).sum().backward()
        for slot, p in zip(out, params):
            slot.append(p.grad.detach().clone().to(torch.float64))
    model.zero_grad(set_to_none=True)
    return [torch.stack(slot) for slot in out]


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_per_example_gradients_equal_one_record_backward(kind, dtype, tol, request):
    path = request.getfixturevalue(kind)
    model, collate = lora_model(path, dtype), batch_of(path, RECORDS)
    indices = list(range(len(RECORDS)))
    ours = per_example_grads(model, collate, indices)
    reference = brute_force_grads(model, collate, indices)
    assert len(ours) == len(reference) > 0
    for g, ref in zip(ours, reference):
        assert g.shape == ref.shape
        assert ref.abs().max() > 0
        assert torch.allclose(g.double(), ref, rtol=tol, atol=tol * ref.abs().max())


def test_with_a_frozen_only_b_gets_per_example_gradients_and_they_are_exact(tiny_llama):
    model, collate = lora_model(tiny_llama, freeze_a=True), batch_of(tiny_llama, RECORDS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    assert any(".lora_A." in n for n, _ in model.named_parameters())
    indices = list(range(len(RECORDS)))
    ours, reference = per_example_grads(model, collate, indices), brute_force_grads(model, collate, indices)
    assert len(ours) == len(reference) == len(trainable)
    for g, ref in zip(ours, reference):
        assert ref.abs().max() > 0
        assert torch.allclose(g.double(), ref, rtol=1e-10, atol=1e-10 * ref.abs().max())


def test_per_example_gradients_with_gradient_checkpointing(tiny_llama):
    """Checkpointing recomputes the forward during backward; each record still counts once."""
    collate = batch_of(tiny_llama, RECORDS)
    indices = list(range(len(RECORDS)))
    plain = per_example_grads(lora_model(tiny_llama), collate, indices)
    ckpt_model = lora_model(tiny_llama, gradient_ckpt=True)
    assert ckpt_model.base_model.model.is_gradient_checkpointing
    ckpt = per_example_grads(ckpt_model, collate, indices)
    reference = brute_force_grads(ckpt_model, collate, indices)
    for g, c, ref in zip(plain, ckpt, reference):
        assert torch.allclose(c, g, rtol=1e-10, atol=1e-12)
        assert torch.allclose(c, ref, rtol=1e-10, atol=1e-12)


def test_per_example_gradients_under_bf16_autocast(tiny_llama):
    model, collate = lora_model(tiny_llama, torch.float32), batch_of(tiny_llama, RECORDS)
    indices = list(range(len(RECORDS)))
    ours = per_example_grads(model, collate, indices, autocast=True)
    assert all(g.dtype == torch.float32 for g in ours), "products must accumulate in float32"
    same_precision = brute_force_grads(model, collate, indices, autocast=True)
    full_precision = brute_force_grads(model, collate, indices, autocast=False)
    for g, ref, exact in zip(ours, same_precision, full_precision):
        # bf16 keeps 8 mantissa bits: ~0.4% per rounding, compounded through the layers
        # measured here: 1.1-1.5% against autograd under the same autocast, 4-6% against float32
        assert (g.double() - ref).norm() / ref.norm() < 3e-2
        assert (g.double() - exact).norm() / exact.norm() < 0.12


def test_masked_dummy_record_changes_nothing(tiny_llama):
    model, collate = lora_model(tiny_llama), batch_of(tiny_llama, RECORDS)
    with_dummy = per_example_grads(model, collate, [0, None, 2])
    without = per_example_grads(model, collate, [0, 2])
    for g, ref in zip(with_dummy, without):
        assert torch.equal(g[1], torch.zeros_like(g[1]))
        assert torch.allclose(g[[0, 2]], ref, rtol=1e-10, atol=1e-14)


def run_step(model, collate, micro_batches, clip_norm, sigma, batch_size, randomness=None, step=0):
    dp = DPGradient(model, clip_norm, sigma, batch_size, randomness)
    dp.logical_step(((loss_of(model, collate(mb)), None) for mb in micro_batches), step)
    grads = [p.grad.detach().clone() for p in dp.params]
    model.zero_grad(set_to_none=True)
    dp.detach()
    return grads, dp


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


def test_clipped_contributions_are_bounded_by_clip_norm(tiny_llama):
    model, collate = lora_model(tiny_llama), batch_of(tiny_llama, RECORDS)
    norms = torch.stack([flat(g) for g in zip(*brute_force_grads(model, collate, range(4)))]).norm(dim=1)
    clip = float(norms.median())
    for i in range(len(RECORDS)):
        grads, _ = run_step(model, collate, [[i]], clip, 0.0, 1)
        contribution = flat(grads).norm()
        assert contribution <= clip * (1 + 1e-6)
        assert math.isclose(contribution, min(clip, float(norms[i])), rel_tol=1e-6)


def test_private_step_without_noise_and_clipping_equals_non_private_step(tiny_llama):
    model, collate = lora_model(tiny_llama), batch_of(tiny_llama, RECORDS)
    micro = [[0, 1], [2, 3]]
    private, _ = run_step(model, collate, micro, clip_norm=1e9, sigma=0.0, batch_size=4)
    plain, _ = run_step(model, collate, micro, clip_norm=None, sigma=0.0, batch_size=4)
    assert torch.allclose(flat(private), flat(plain), rtol=1e-9, atol=1e-14)
    # and clipping does change it when C is small (the test above can fail)
    clipped, _ = run_step(model, collate, micro, clip_norm=1e-3, sigma=0.0, batch_size=4)
    assert not torch.allclose(flat(clipped), flat(plain))


def test_noise_std_is_sigma_c_over_b_and_drawn_once_per_step(tiny_llama):
    model, collate = lora_model(tiny_llama, torch.float32), batch_of(tiny_llama, RECORDS)
    sigma, clip, batch = 1.3, 0.7, 8
    seeded = DPRandomness(insecure_seed=5)
    # only dummy records: the gradient handed to the optimizer is pure noise
    once, dp = run_step(model, collate, [[None]], clip, sigma, batch, seeded, step=3)
    noise = flat(once).double()
    expected = sigma * clip / batch
    assert math.isclose(dp.noise_std(), expected)
    n = noise.numel()
    assert n > 3000
    assert abs(noise.std().item() / expected - 1) < 5 / math.sqrt(2 * n)  # ~5 standard errors
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(n)
    # four micro-batches: still exactly one draw (the same one for the same seed and step)
    four, _ = run_step(model, collate, [[None]] * 4, clip, sigma, batch, seeded, step=3)
    assert torch.equal(flat(four), flat(once))
    other_step, _ = run_step(model, collate, [[None]], clip, sigma, batch, seeded, step=4)
    assert not torch.allclose(flat(other_step), flat(once))


def test_noise_comes_from_the_os_not_the_training_seed(tiny_llama):
    model, collate = lora_model(tiny_llama, torch.float32), batch_of(tiny_llama, RECORDS)
    draws = []
    for _ in range(2):
        torch.manual_seed(42)  # the published training seed
        grads, _ = run_step(model, collate, [[None]], 1.0, 1.0, 4, DPRandomness())
        draws.append(flat(grads))
    assert not torch.allclose(draws[0], draws[1])
    seeded = [flat(run_step(model, collate, [[None]], 1.0, 1.0, 4, DPRandomness(insecure_seed=9))[0]) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])


def test_a_non_finite_record_contributes_zero_and_is_counted(tiny_llama):
    """One NaN loss (e.g. fp16 overflow) must not turn the update into NaN, which would reveal that
    its record was sampled: its row is zeroed before clipping, so the step equals the step without it."""
    model, collate = lora_model(tiny_llama), batch_of(tiny_llama, RECORDS)

    def step(indices, poison=None):
        dp = DPGradient(model, 0.05, 0.0, 8, loss_clip=5.0, loss_noise_multiplier=0.0)
        losses = loss_of(model, collate(indices))
        if poison is not None:
            losses = losses * torch.tensor(
                [math.nan if i == poison else 1.0 for i in range(len(indices))], dtype=losses.dtype
            )
        losses.sum().backward()
        dp.accumulate_micro_batch(losses, torch.ones(len(indices)))
        stats = dp.finish_step(0)
        grads = flat([p.grad.detach().clone() for p in dp.params])
        model.zero_grad(set_to_none=True)
        dp.detach()
        return grads, stats, losses.detach()

    poisoned, stats, losses = step([0, 1, 2], poison=1)
    without, clean_stats, clean_losses = step([0, 2])
    assert torch.isfinite(poisoned).all() and poisoned.abs().max() > 0
    assert torch.allclose(poisoned, without, rtol=1e-12, atol=1e-15)
    assert stats.nonfinite == 1 and clean_stats.nonfinite == 0
    # the released loss counts the non-finite record at the bound L, like any record above it
    clipped = clean_losses.clamp(max=5.0).sum().item()
    assert stats.released_loss == pytest.approx((clipped + 5.0) / 8, rel=1e-12)


def test_released_loss_is_the_clipped_sum_plus_one_noise_draw_over_b(tiny_llama):
    model, collate = lora_model(tiny_llama, torch.float32), batch_of(tiny_llama, RECORDS)
    losses = loss_of(model, collate([0, 1, 2, 3])).detach()
    bound = float(losses.median())  # half of the records are clipped
    dp = DPGradient(model, 1.0, 0.0, 16, loss_clip=bound, loss_noise_multiplier=0.0)
    dp.accumulate_micro_batch(losses, torch.tensor([3, 5, 0, 2]))  # a record without labels is a dummy
    stats = dp.finish_step(0)
    assert stats.released_loss == pytest.approx(float(losses.clamp(max=bound).sum()) / 16, rel=1e-6)
    assert stats.records == 3
    dp.detach()
    # the noise: N(0, (sigma_loss L)^2) on the sum, once per step, reproducible only with the testing seed
    sigma_loss, steps = 2.5, 3000
    dp = DPGradient(
        model, 1.0, 1.0, 16, DPRandomness(insecure_seed=3), loss_clip=bound, loss_noise_multiplier=sigma_loss
    )
    draws = torch.tensor([dp.finish_step(t).released_loss for t in range(steps)], dtype=torch.float64)
    expected = sigma_loss * bound / 16
    assert abs(draws.std().item() / expected - 1) < 5 / math.sqrt(2 * steps)
    assert abs(draws.mean().item()) < 5 * expected / math.sqrt(steps)
    dp.detach()
    again = DPGradient(
        model, 1.0, 1.0, 16, DPRandomness(insecure_seed=3), loss_clip=bound, loss_noise_multiplier=sigma_loss
    )
    assert again.finish_step(7).released_loss == draws[7].item()
    again.detach()


def test_secure_noise_is_gaussian_with_the_right_scale_and_unseeded(tiny_llama):
    from utils.dp_randomness import secure_gaussian

    n = 400_000
    draws = secure_gaussian((n,), 2.0, torch.float64)
    assert abs(draws.mean().item()) < 5 * 2.0 / math.sqrt(n)
    assert abs(draws.std().item() / 2.0 - 1) < 5 / math.sqrt(2 * n)
    z = draws / draws.std()
    assert abs((z**4).mean().item() - 3) < 0.05  # Gaussian kurtosis
    assert abs(((z.abs() > 3).double().mean().item() - 0.0027) / 0.0027) < 0.1  # Gaussian tails
    torch.manual_seed(0)
    first = secure_gaussian((100,), 1.0)
    torch.manual_seed(0)
    assert not torch.equal(first, secure_gaussian((100,), 1.0))  # no seed reproduces it
    # through DPGradient: the same sigma C / B in the averaged gradient
    model = lora_model(tiny_llama, torch.float32)
    dp = DPGradient(model, 0.7, 1.3, 8, secure_noise=True)
    dp.finish_step(0)
    noise = flat([p.grad for p in dp.params]).double()
    assert abs(noise.std().item() / dp.noise_std() - 1) < 5 / math.sqrt(2 * noise.numel())
    dp.detach()
