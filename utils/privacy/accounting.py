"""Epsilon for DP-SGD with Poisson sampling (docs/DESIGN.md section 2, item 6): each step is a
Poisson-subsampled Gaussian (rate q, noise sigma * C), composed with the privacy loss
distribution (PLD) accountant of Google's maintained `dp_accounting`. Its rounding is
pessimistic, so every figure here is an upper bound on the true epsilon, never an estimate.

Two neighbouring relations (docs/DESIGN.md 2.11): "add_remove" (one record added or removed, the
figure every peer reports) and "replace_one" (one record replaced by another, the consistent one
when the data set size N is published, as privacy_report.json does); the same run has a larger
replace-one epsilon."""

import contextlib
import logging
import math
import operator
from functools import lru_cache

import dp_accounting
from dp_accounting import pld, rdp

NEIGHBORING_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}

ACCOUNTANT_NAME = "dp_accounting.pld (Poisson-subsampled Gaussian, pessimistic PLD)"

# Search range for noise_multiplier_for_epsilon. Above _SIGMA_MAX training is pure noise; below
# _SIGMA_MIN epsilon is in the hundreds, which protects nothing and makes the PLD huge.
_SIGMA_MIN, _SIGMA_MAX = 0.05, 1e3


def _check(noise_multiplier, sampling_rate, steps, delta):
    steps = operator.index(steps)  # refuses 2.5 steps instead of silently truncating
    if steps < 0 or not 0 <= sampling_rate <= 1 or not 0 < delta < 1:
        raise ValueError(f"invalid accounting input: steps {steps}, sampling rate {sampling_rate}, delta {delta}")
    if not noise_multiplier >= 0:  # also refuses NaN; non-private runs (sigma -1) must not get here
        raise ValueError(f"noise multiplier must be >= 0 for accounting, got {noise_multiplier}")
    return float(noise_multiplier), float(sampling_rate), steps, float(delta)


def _event(sigma, q, steps):
    # q == 1 is the plain Gaussian; dp_accounting then composes it exactly in closed form.
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    step = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _discretization(sigma, q):
    # The PLD rounding error in epsilon is roughly 0.1 * (interval / s)^2 relative, s being the
    # spread of one step's privacy loss: about q * sqrt(e^(1/sigma^2) - 1) (the chi-square
    # divergence), never more than 1/sigma. Measured over q in [1e-3, 1], sigma in [0.5, 10],
    # steps up to 1e4: interval = s/32 keeps the error at most 1e-4 relative and one call under
    # a second; a fixed interval would be 2% off at sigma 5, q 1e-3, or slow at large q.
    spread = min(1 / sigma, q * math.sqrt(math.expm1(min(sigma**-2, 50.0))))
    return min(1e-3, spread / 32)


@lru_cache(maxsize=64)
def _step_pld(sigma, q, relation):
    """One step's privacy loss distribution (pessimistic), kept: a run asks for epsilon after every
    step, and composing a kept PLD costs a third of building it anew."""
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        sampling_prob=q,
        value_discretization_interval=_discretization(sigma, q),
        pessimistic_estimate=True,
        neighboring_relation=NEIGHBORING_RELATIONS[relation],
    )


@lru_cache(maxsize=4096)
def _pld_epsilon(sigma, q, steps, delta, relation="add_remove"):
    if sigma < _SIGMA_MIN:
        # the privacy loss spreads over so wide a range that its PLD would not fit in memory; RDP
        # still bounds epsilon from above (add/remove; replace-one: no bound, so infinite)
        return _rdp_epsilon(sigma, q, steps, delta) if relation == "add_remove" else math.inf
    return float(_step_pld(sigma, q, relation).self_compose(steps).get_epsilon_for_delta(delta))


# Integer orders only: fractional ones below 2 fail to converge (and log warnings) at small sigma.
_BRACKET_ORDERS = tuple(range(2, 64)) + (80, 96, 128, 256, 512, 1024)


@lru_cache(maxsize=4096)
def _rdp_epsilon(sigma, q, steps, delta, orders=None):
    accountant = rdp.RdpAccountant(orders=orders)
    accountant.compose(_event(sigma, q, steps))
    return float(accountant.get_epsilon(delta))


def _epsilon(exact, noise_multiplier, sampling_rate, steps, delta, *extra):
    sigma, q, steps, delta = _check(noise_multiplier, sampling_rate, steps, delta)
    if steps == 0 or q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    return exact(sigma, q, steps, delta, *extra)


def _check_relation(relation):
    if relation not in NEIGHBORING_RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r} (known: {', '.join(NEIGHBORING_RELATIONS)})")
    return relation


# name -> (what reports call it, epsilon(sigma, q, steps, delta, relation)): every sampler today
# composes the Poisson-subsampled Gaussian, so another accountant (RDP, PRV) is one more entry here.
ACCOUNTANTS = {"pld": (ACCOUNTANT_NAME, _pld_epsilon)}


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    relation: str = "add_remove",
    accountant: str = "pld",
) -> float:
    """Epsilon (PLD: an upper bound tight to ~1e-4 relative) after `steps` Poisson-subsampled
    Gaussian steps. steps == 0 -> 0.0; noise_multiplier == 0 -> inf; sampling_rate 1 allowed."""
    return _epsilon(
        ACCOUNTANTS[accountant][1], noise_multiplier, sampling_rate, steps, delta, _check_relation(relation)
    )


def compute_epsilon_rdp(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The same with the RDP accountant (add/remove only): looser (larger), kept for comparison."""
    with _quiet_absl():
        return _epsilon(_rdp_epsilon, noise_multiplier, sampling_rate, steps, delta)


@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting logs a warning for each fractional RDP order whose series fails to converge
    (small sigma, large q) and then leaves that order out, which can only loosen the bound: the
    result stays an upper bound, so the warning is noise on every run's console."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def effective_noise_multiplier(noise_multiplier: float, loss_noise_multiplier=None) -> float:
    """The noise multiplier of the gradient sum and the loss sum released together.

    Both are sums over the same Poisson sample with one Gaussian draw each (sensitivities C and L,
    noise sigma*C and sigma_loss*L); scaled to unit sensitivity they form one Gaussian mechanism of
    sensitivity sqrt(sigma^-2 + sigma_loss^-2) in units of noise, i.e. noise multiplier
    (sigma^-2 + sigma_loss^-2)^(-1/2). None: no loss is released, the gradient's sigma alone."""
    if loss_noise_multiplier is None:
        return noise_multiplier
    if noise_multiplier == 0 or loss_noise_multiplier == 0:
        return 0.0
    return (noise_multiplier**-2 + loss_noise_multiplier**-2) ** -0.5


def _solve(eps, target, hi):
    """A sigma in (_SIGMA_MIN, hi] with eps(sigma) in [0.999, 1] * target, or None."""
    # Safeguarded secant on log(eps) against log(sigma), nearly a straight line (slope -1 at
    # large sigma, about -2.5 at small sigma and q): 2-5 PLD calls where bisection takes a dozen.
    # [a, b] brackets the goal in log(sigma): too little noise at a, enough at b.
    low, goal = 0.999 * target, math.log(0.9995 * target)
    a, b = math.log(_SIGMA_MIN), math.log(hi)
    sigma, prev = hi, None
    for _ in range(60):
        e = eps(sigma)
        if low <= e <= target:
            return sigma
        x, g = math.log(sigma), math.log(max(e, 1e-12)) - goal
        if prev is None and g > 0:  # hi lacks noise: cannot happen, RDP is far looser than PLD
            return None
        a, b = (x, b) if g > 0 else (a, x)
        if b - a < 1e-9:
            return None
        # First step assumes slope -2; later ones use the last two points; bisect if it leaves [a, b].
        slope = -2.0 if prev is None or g == prev[1] else (g - prev[1]) / (x - prev[0])
        prev, x = (x, g), x - g / slope
        sigma = math.exp(x if a < x < b else (a + b) / 2)
    return None


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    relation: str = "add_remove",
    accountant: str = "pld",
) -> float:
    """Smallest sigma (to 0.1%) whose PLD epsilon over `steps` steps is <= target_epsilon: the
    returned sigma has compute_epsilon in [0.999 * target, target]. Deterministic."""
    _, q, steps, delta = _check(1.0, sampling_rate, steps, delta)
    _check_relation(relation)
    if not target_epsilon > 0:
        raise ValueError(f"--target_epsilon must be positive, got {target_epsilon}")
    if steps == 0 or q == 0:
        raise ValueError("--target_epsilon needs at least one planned step with a positive sampling rate")
    target = float(target_epsilon)
    eps_of = lambda sigma: ACCOUNTANTS[accountant][1](sigma, q, steps, delta, relation)  # noqa: E731
    rdp_eps = lambda sigma: _rdp_epsilon(sigma, q, steps, delta, _BRACKET_ORDERS)  # noqa: E731
    rdp_bound_applies = relation == "add_remove"  # RDP bounds the add/remove PLD from above
    if (not rdp_bound_applies or rdp_eps(_SIGMA_MAX) > target) and eps_of(_SIGMA_MAX) > target:
        raise ValueError(
            f"--target_epsilon {target:g} is unreachable: it would need a noise multiplier "
            f"above {_SIGMA_MAX:g} for {steps} steps at sampling rate {q:g}"
        )
    if rdp_eps(_SIGMA_MIN) <= target:  # RDP is an upper bound, so PLD agrees
        raise ValueError(
            f"--target_epsilon {target:g} is too large to calibrate: it would need a "
            f"noise multiplier below {_SIGMA_MIN:g}, which protects nothing"
        )
    # Bracket cheaply with RDP: it is looser than PLD, so a sigma meeting the target under RDP
    # meets it under PLD too. Bisect in log(sigma) only to a few percent; PLD refines.
    lo, hi = _SIGMA_MIN, _SIGMA_MAX
    for _ in range(12):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if rdp_eps(mid) <= target else (mid, hi)
    # dp_accounting's RDP has no replace-one Poisson event. Replace-one epsilon is at least the
    # add/remove one, so `lo` still bounds sigma from below; widen `hi` under PLD until it suffices.
    while relation != "add_remove" and hi < _SIGMA_MAX and eps_of(hi) > target:
        hi = min(2 * hi, _SIGMA_MAX)
    sigma = _solve(eps_of, target, hi)
    if sigma is None:
        raise ValueError(
            f"--target_epsilon {target:g} could not be calibrated for {steps} steps at sampling rate {q:g}"
        )
    return sigma


def check_delta(delta: float, dataset_size: int, unit: str = "records") -> None:
    """Refuse delta >= 1/N: such a delta permits releasing one whole record (or unit) outright."""
    if not delta > 0:
        raise ValueError(f"--delta {delta:g} must be positive")
    if delta >= 1 / dataset_size:
        raise ValueError(
            f"--delta {delta:g} must be below 1/N = {1 / dataset_size:.3g} for a data set of {dataset_size} {unit}"
        )


class PrivacyAccountant:
    """Epsilon of one training run: fixed (sigma, q, delta), a step counter, cached epsilons.

    `relation` is the neighbouring relation of `epsilon()` by default (the one the budget guard
    uses); the other relation's figure is one argument away."""

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        relation: str = "add_remove",
        accountant: str = "pld",
    ):
        self.noise_multiplier, self.sampling_rate, _, self.delta = _check(noise_multiplier, sampling_rate, 0, delta)
        self.relation = _check_relation(relation)
        self.accountant = accountant
        self.name = ACCOUNTANTS[accountant][0]
        self.steps = 0  # set it directly to resume
        self._cache = {}

    def step(self) -> None:
        self.steps += 1

    def epsilon(self, steps=None, relation=None) -> float:
        """Epsilon after `steps` steps (default: those taken so far); each count computed once."""
        steps = self.steps if steps is None else steps
        relation = relation or self.relation
        key = (
            self.noise_multiplier,
            self.sampling_rate,
            self.delta,
            steps,
            relation,
        )  # all of it: attributes are plain
        if key not in self._cache:
            self._cache[key] = compute_epsilon(
                self.noise_multiplier, self.sampling_rate, steps, self.delta, relation, self.accountant
            )
        return self._cache[key]

    def steps_within(self, target_epsilon: float, planned: int) -> int:
        """The most steps, up to `planned`, whose epsilon stays within the target (monotone in
        steps, so a bisection); training stops there instead of stepping past the budget."""
        if self.epsilon(planned) <= target_epsilon:
            return planned
        low, high = 0, planned  # epsilon(low) <= target < epsilon(high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.epsilon(mid) <= target_epsilon else (low, mid)
        return low

    def state_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        # Epsilon is only valid for one mechanism repeated; a resumed run that changed sigma or q
        # would be composing different mechanisms, which this accountant cannot report.
        for key in ("noise_multiplier", "sampling_rate", "delta"):
            if not math.isclose(state[key], getattr(self, key), rel_tol=1e-9):
                raise ValueError(
                    f"cannot resume privacy accounting: checkpoint has {key} = {state[key]}, "
                    f"this run has {getattr(self, key)}"
                )
        self.steps = int(state["steps"])


# ----------------------------------------------------------------------------------------------
# Composing a privacy ledger (utils/privacy/ledger.py): many runs, each its own (q, sigma), on one unit
# ----------------------------------------------------------------------------------------------

# A mechanism on the ledger: (sampling rate q, effective noise multiplier sigma) -> invocations; or
# (q, sigma, steps, mean, shape): a tuning procedure (scripts/tune.py) that trains a random number
# of trials of `steps` such steps (its mean and shape: dp_accounting's RepeatAndSelectDpEvent) and
# releases the best one. sigma None stands for a step without a guarantee (non-private, sigma 0, a
# published DP seed).


def _mechanism_event(key, count):
    q, sigma, *select = key
    if not select:
        return _event(sigma, q, count)
    steps, mean, shape = select
    procedure = dp_accounting.dp_event.RepeatAndSelectDpEvent(_event(sigma, q, steps), mean, shape)
    return dp_accounting.SelfComposedDpEvent(procedure, count)


def _ledger_event(mechanisms):
    used = sorted((key, count) for key, count in mechanisms.items() if count and key[0] > 0)
    return dp_accounting.ComposedDpEvent([_mechanism_event(key, count) for key, count in used])


def _unbounded(mechanisms) -> bool:
    return any(count and key[0] > 0 and not key[1] for key, count in mechanisms.items())


def mechanism_steps(mechanisms: dict) -> int:
    """Training steps the mechanisms stand for: a tuning procedure counts as one trial's steps."""
    return sum(count * (key[2] if len(key) > 2 else 1) for key, count in mechanisms.items())


def composed_epsilon(mechanisms: dict, delta: float, relation: str = "add_remove") -> float:
    """Epsilon at `delta` of every invocation in `mechanisms` composed (inf when one of them has no
    guarantee): PLD, tight for runs whose settings were fixed in advance; RDP where PLD cannot (a
    tuning procedure, or a sigma too small for a PLD in memory), then add/remove only."""
    _check_relation(relation)
    if _unbounded(mechanisms):
        return math.inf
    used = [key for key, count in mechanisms.items() if count and key[0] > 0]
    if not used:
        return 0.0
    if any(len(key) > 2 for key in used) or min(key[1] for key in used) < _SIGMA_MIN:
        if relation != "add_remove":  # dp_accounting's RDP has no replace-one Poisson sampling
            return math.inf
        rdp_accountant = rdp.RdpAccountant()
        with _quiet_absl():
            rdp_accountant.compose(_ledger_event(mechanisms))
            return float(rdp_accountant.get_epsilon(delta))
    interval = min(_discretization(key[1], key[0]) for key in used)
    accountant = pld.PLDAccountant(NEIGHBORING_RELATIONS[relation], value_discretization_interval=interval)
    accountant.compose(_ledger_event(mechanisms))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for_procedure(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, mean_trials: float, shape: float
) -> float:
    """Smallest sigma (to 0.1%) at which a tuning procedure (a random number of trials of `steps`
    steps, mean `mean_trials`, the best released) costs at most target_epsilon: tuning within a
    budget. RDP, as the procedure is composed; deterministic."""
    key = lambda sigma: {(sampling_rate, sigma, steps, mean_trials, shape): 1}  # noqa: E731
    eps_of = lambda sigma: composed_epsilon(key(sigma), delta)  # noqa: E731
    if not target_epsilon > 0:
        raise ValueError(f"--target_procedure_epsilon must be positive, got {target_epsilon}")
    if eps_of(_SIGMA_MAX) > target_epsilon:
        raise ValueError(
            f"--target_procedure_epsilon {target_epsilon:g} is unreachable for {steps} steps at sampling "
            f"rate {sampling_rate:g} with a mean of {mean_trials:g} trials"
        )
    # the bound is an upper one: aim a hair below the target so rounding cannot cross it
    sigma = _solve(eps_of, target_epsilon * (1 - 1e-9), _SIGMA_MAX)
    if sigma is None:
        raise ValueError(f"--target_procedure_epsilon {target_epsilon:g} could not be calibrated")
    return sigma


# Orders of the Renyi filter. The privacy loss L after any adaptively chosen sequence of mechanisms
# obeys E[exp((a-1)(L - sum of their order-a RDP))] <= 1 at every stopping time, for every order a
# at once (a supermartingale; Feldman and Zrnic 2021 use one order). Admitting a run only if SOME
# order a keeps the sum within B_a = eps - log(1 - 1/a) + (log(delta / K) + log a) / (a - 1) (the
# RDP-to-DP conversion of Canonne, Kamath and Steinke 2020, at delta / K) bounds the hockey-stick
# divergence by K terms of delta / K: (eps, delta)-DP however resumes and retries were chosen.
# Few orders keep log K small; these cover the optimal order of DP-SGD from sigma 0.5 to 10.
FILTER_ORDERS = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


def _filter_budget(order: float, epsilon: float, delta: float) -> float:
    k = len(FILTER_ORDERS)
    return epsilon - math.log1p(-1 / order) + (math.log(delta / k) + math.log(order)) / (order - 1)


def within_renyi_filter(mechanisms: dict, epsilon: float, delta: float) -> bool:
    """True when `mechanisms` (spent, reserved and planned together) stay within an (epsilon,
    delta) budget under the Renyi filter above: the admission test of a run on the ledger."""
    if _unbounded(mechanisms):
        return False
    event = _ledger_event(mechanisms)
    k = len(FILTER_ORDERS)
    for order in FILTER_ORDERS:
        if _filter_budget(order, epsilon, delta) <= 1e-9:
            continue  # this order cannot pay for the conversion at all
        accountant = rdp.RdpAccountant(orders=[order])
        # with one order, dp_accounting's epsilon at delta / K is the conversion above, so this is
        # exactly "order-a RDP <= B_a" (public API only)
        with _quiet_absl():
            accountant.compose(event)
            if accountant.get_epsilon(delta / k) <= epsilon:
                return True
    return False
