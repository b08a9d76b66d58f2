"""Which records form each logical step, and how they split into micro-batches (docs/DESIGN.md 2.5).

Each sampler states what the privacy plan needs: its sampling rate q (the accountant composes the
Poisson-subsampled Gaussian at that rate), its planned steps for a number of epochs, the number of
privacy units `n` it samples from, and the caveat every report must carry when its epsilon is not
a proven guarantee for it. A new sampler is one class registered in SAMPLERS.

Record-level samplers give micro-batches of record indices; the unit-level sampler gives
micro-batches of units, each a list of its record indices (docs/DESIGN.md 2.13). `record_batches`
gives both as the training step needs them: record indices, and each record's unit slot.
"""

import math

import torch

SHUFFLE_CAVEAT = (
    "epsilon is computed for Poisson sampling; this run used shuffled fixed-size batches, "
    "for which it is not a proven guarantee"
)


class StepSampler:
    """The records of each logical step, split into this process's micro-batches.

    Each process gets every P-th chosen record, cut into micro-batches of at most
    `per_device_batch_size`; every process runs the same number K >= accumulation_steps of
    micro-batches (empty ones hold one masked dummy record), so collective operations stay in step
    even when a draw exceeds the nominal capacity."""

    name = None
    caveat = None

    def __init__(
        self,
        dataset_size: int,
        per_device_batch_size: int,
        accumulation_steps: int,
        num_processes: int,
        process_index: int,
        randomness,
    ):
        self.n = dataset_size
        self.per_device = per_device_batch_size
        self.accumulation_steps = accumulation_steps
        self.num_processes = num_processes
        self.process_index = process_index
        self.randomness = randomness
        self.expected_batch_size = per_device_batch_size * accumulation_steps * num_processes
        self.sampling_rate = min(1.0, self.expected_batch_size / dataset_size)

    def planned_steps(self, num_epochs: float) -> int:
        raise NotImplementedError

    def steps_for(self, max_steps: int | None, num_epochs: float) -> int:
        """The steps a run asks for: --max_train_steps if given, else its epochs' worth."""
        return max_steps if max_steps is not None else self.planned_steps(num_epochs)

    def step_indices(self, step: int) -> list:
        """All records of logical step `step` (the same list on every process)."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list:
        """This process's micro-batches for `step`: lists of record indices (possibly empty)."""
        chosen = self.step_indices(step)
        share = chosen[self.process_index :: self.num_processes]
        largest_share = math.ceil(len(chosen) / self.num_processes)
        count = max(self.accumulation_steps, math.ceil(largest_share / self.per_device))
        return [share[i * self.per_device : (i + 1) * self.per_device] for i in range(count)]

    def record_batches(self, step: int) -> list:
        """This process's micro-batches for `step` as (record indices, unit slot of each record or
        None when every record is its own unit): what the DP gradient needs to clip each unit once."""
        return [(batch, None) for batch in self.micro_batches(step)]

    def records_beyond_cap(self) -> int:
        return 0


class PoissonSampler(StepSampler):
    """Each record joins step t independently with probability q = B / N, drawn from the DP
    generator for (seed, t), so every process sees the same draw: the accounted mechanism.

    The draw compares float64 uniforms (multiples of 2^-53) with q, which includes a record with
    probability ceil(q 2^53) / 2^53: that exact rate is what the sampler states and the accountant
    composes (at most 2^-53 above B / N)."""

    name = "poisson"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampling_rate = math.ceil(self.sampling_rate * 2**53) / 2**53

    def planned_steps(self, num_epochs):
        # each record is seen `num_epochs` times in expectation
        return math.ceil(num_epochs * self.n / self.expected_batch_size - 1e-9)

    def step_indices(self, step):
        gen = self.randomness.generator("sample", step)
        draw = torch.rand(self.n, generator=gen, dtype=torch.float64)
        return (draw < self.sampling_rate).nonzero().flatten().tolist()


class ShuffleSampler(StepSampler):
    """Fixed-size batches of a per-epoch permutation, the last batch of an epoch smaller."""

    name = "shuffle"
    caveat = SHUFFLE_CAVEAT

    def planned_steps(self, num_epochs):
        # a fractional epoch count rounds up to a whole batch
        return math.ceil(num_epochs * self._per_epoch() - 1e-9)

    def _per_epoch(self):
        return math.ceil(self.n / self.expected_batch_size)

    def step_indices(self, step):
        epoch, k = divmod(step, self._per_epoch())
        perm = torch.randperm(self.n, generator=self.randomness.generator("shuffle", epoch)).tolist()
        return perm[k * self.expected_batch_size : (k + 1) * self.expected_batch_size]


class UnitPoissonSampler(PoissonSampler):
    """Poisson sampling of privacy units (a user, patient or author with several records): each
    unit joins step t independently with probability q = B / U (B expected units per step, U units),
    and brings at most `max_records` of its records, a uniformly random subset drawn from the DP
    generator when it has more. A unit's records always share one micro-batch, so the unit is
    clipped once, as a whole; `per_device_batch_size` counts units."""

    name = "poisson_units"

    def __init__(
        self,
        units: list,
        per_device_batch_size: int,
        accumulation_steps: int,
        num_processes: int,
        process_index: int,
        randomness,
        max_records: int,
    ):
        super().__init__(
            len(units), per_device_batch_size, accumulation_steps, num_processes, process_index, randomness
        )
        self.units, self.max_records = units, max_records

    def step_indices(self, step):
        """The sampled units of step `step`, each as the list of its records used in this step."""
        return [self._records_of(unit, step) for unit in super().step_indices(step)]

    def _records_of(self, unit, step):
        records = self.units[unit]
        if len(records) <= self.max_records:
            return records
        gen = self.randomness.generator(f"unit_records:{unit}", step)
        return [records[i] for i in sorted(torch.randperm(len(records), generator=gen)[: self.max_records].tolist())]

    def record_batches(self, step):
        return [self._flatten(batch) for batch in self.micro_batches(step)]

    @staticmethod
    def _flatten(units):
        indices = [record for unit in units for record in unit]
        if len(indices) == len(units):  # one record per unit: exactly the record-level step
            return indices, None
        return indices, torch.tensor([slot for slot, unit in enumerate(units) for _ in unit])

    def records_beyond_cap(self):
        """Records that no single step can use (an exact statistic of the data: console only)."""
        return sum(max(0, len(records) - self.max_records) for records in self.units)


SAMPLERS = {cls.name: cls for cls in (PoissonSampler, ShuffleSampler)}


def make_sampler(
    name: str,
    dataset_size: int,
    per_device_batch_size: int,
    accumulation_steps: int,
    num_processes: int,
    process_index: int,
    randomness,
    units: list | None = None,
    max_records_per_unit: int = 1,
) -> StepSampler:
    """The sampler `name` over `dataset_size` records; with `units` (each a list of its record
    indices), Poisson sampling of those units instead, at most `max_records_per_unit` records each."""
    layout = (per_device_batch_size, accumulation_steps, num_processes, process_index, randomness)
    if units is None:
        return SAMPLERS[name](dataset_size, *layout)
    if name != PoissonSampler.name:
        raise ValueError(f"privacy units are sampled with Poisson sampling, not {name}")
    return UnitPoissonSampler(units, *layout, max_records_per_unit)
