"""Poisson sampling (docs/DESIGN.md 2.5): inclusion rate, agreement across processes, capacity, dummies."""

import math

import torch
from test_dp_utils import RECORDS, batch_of, flat, lora_model, run_step

from utils.dp_randomness import DPRandomness
from utils.privacy.sampling import PoissonSampler, make_sampler


def samplers(n, per_device, accumulation, processes, seed=7, sampling="poisson"):
    randomness = DPRandomness(insecure_seed=seed)
    return [make_sampler(sampling, n, per_device, accumulation, processes, p, randomness) for p in range(processes)]


def test_inclusion_rate_matches_q_and_batch_size_varies():
    n, steps = 60, 3000
    sampler = samplers(n, per_device=3, accumulation=2, processes=2)[0]
    q = sampler.sampling_rate
    assert math.isclose(q, 12 / 60)
    counts = torch.zeros(n)
    sizes = []
    for step in range(steps):
        chosen = sampler.step_indices(step)
        assert len(set(chosen)) == len(chosen)
        counts[chosen] += 1
        sizes.append(len(chosen))
    sd = math.sqrt(steps * q * (1 - q))
    assert (counts - steps * q).abs().max() < 5 * sd  # every record, ~5 binomial standard deviations
    assert abs(counts.sum() / (n * steps) - q) < 5 * math.sqrt(q * (1 - q) / (n * steps))
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert abs(sizes.mean() - 12) < 0.3 and sizes.std() > 2  # Binomial(60, 0.2): sd 3.1


def test_the_stated_rate_is_exactly_the_inclusion_probability_of_the_draw():
    """A record joins when a float64 uniform (a multiple of 2^-53) falls below q: probability
    ceil(q 2^53) / 2^53. The sampler states that rate, so the accountant composes the one used
    (in float32, rounding 8/63 up to the 2^-24 grid added 5e-9 that nobody accounted)."""
    sampler = samplers(63, per_device=8, accumulation=1, processes=1)[0]
    q = sampler.sampling_rate
    assert (q * 2**53).is_integer() and 8 / 63 <= q < 8 / 63 + 2**-52
    gen = sampler.randomness.generator("sample", 5)
    uniforms = torch.rand(63, generator=gen, dtype=torch.float64)
    assert sampler.step_indices(5) == (uniforms < q).nonzero().flatten().tolist()


def test_processes_agree_and_share_the_draw_exactly_once():
    procs = samplers(50, per_device=2, accumulation=3, processes=2)
    for step in range(200):
        full = procs[0].step_indices(step)
        assert procs[1].step_indices(step) == full
        parts = [procs[p].micro_batches(step) for p in range(2)]
        assert len(parts[0]) == len(parts[1]) >= 3  # same number of passes on every process
        seen = [i for part in parts for mb in part for i in mb]
        assert sorted(seen) == sorted(full)
        assert all(len(mb) <= 2 for part in parts for mb in part)


def test_draw_exceeding_capacity_gets_more_micro_batches():
    sampler = samplers(40, per_device=2, accumulation=2, processes=1)[0]  # q = 0.1, capacity 4
    overfull = [s for s in range(500) if len(sampler.step_indices(s)) > 4]
    assert overfull
    for step in overfull[:20]:
        batches = sampler.micro_batches(step)
        assert len(batches) == math.ceil(len(sampler.step_indices(step)) / 2)
        assert sorted(i for mb in batches for i in mb) == sorted(sampler.step_indices(step))


def test_sampling_is_not_reproducible_from_training_seed_but_is_from_dp_seed():
    torch.manual_seed(0)
    a = PoissonSampler(1000, 4, 1, 1, 0, DPRandomness()).step_indices(0)
    torch.manual_seed(0)
    b = PoissonSampler(1000, 4, 1, 1, 0, DPRandomness()).step_indices(0)
    assert a != b
    assert samplers(1000, 4, 1, 1, seed=3)[0].step_indices(5) == samplers(1000, 4, 1, 1, seed=3)[0].step_indices(5)


def test_draw_depends_on_seed_and_step_only_not_process_count():
    one = samplers(80, per_device=4, accumulation=2, processes=1)[0]
    two = samplers(80, per_device=2, accumulation=2, processes=2)[0]
    assert one.expected_batch_size == two.expected_batch_size == 8
    for step in range(20):
        assert one.step_indices(step) == two.step_indices(step)


def test_shuffle_covers_each_record_once_per_epoch():
    sampler = samplers(10, per_device=2, accumulation=2, processes=1, sampling="shuffle")[0]
    assert sampler.planned_steps(1) == 3
    epoch = [i for step in range(3) for i in sampler.step_indices(step)]
    assert sorted(epoch) == list(range(10))


def test_planned_poisson_steps():
    assert PoissonSampler(75_316, 2048, 1, 1, 0, None).planned_steps(5) == 184
    assert PoissonSampler(64, 4, 2, 1, 0, None).planned_steps(1) == 8


def test_dummy_padding_and_realised_batch_size_do_not_enter_the_update(tiny_llama):
    model, collate = lora_model(tiny_llama), batch_of(tiny_llama, RECORDS)
    base, _ = run_step(model, collate, [[0, 1], [2]], clip_norm=0.05, sigma=0.0, batch_size=8)
    padded, _ = run_step(model, collate, [[0, 1], [2, None]], clip_norm=0.05, sigma=0.0, batch_size=8)
    extra, _ = run_step(model, collate, [[0, 1], [2], [None], [None, None]], clip_norm=0.05, sigma=0.0, batch_size=8)
    assert torch.allclose(flat(padded), flat(base), rtol=1e-12, atol=1e-15)
    assert torch.allclose(flat(extra), flat(base), rtol=1e-12, atol=1e-15)
    # the division is by the expected batch size B, whatever the realised count (3 here)
    other_b, _ = run_step(model, collate, [[0, 1], [2]], clip_norm=0.05, sigma=0.0, batch_size=3)
    assert torch.allclose(flat(other_b) * 3 / 8, flat(base), rtol=1e-12, atol=1e-15)
