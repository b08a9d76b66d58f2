"""The privacy plan of a training run: every privacy decision train_clm.py makes, in one place.

From the arguments and the data set size it settles whether the run is private, the noise of the
gradient and of the released training loss, the accountant and its neighbouring relation, the
number of steps the budget allows, and what the run may publish. `PrivacyPlan.report()` is
privacy_report.json. See docs/DESIGN.md for the rules each part implements.

What a run publishes (its release: the output folder, the tracker, plots) holds only numbers
covered by the reported epsilon, computed on data the user declared public (validation metrics),
or public configuration. The training loss is released through the same subsampled Gaussian as
the gradient (`--train_loss private`, the default), not at all (`off`), or exactly (`exact`: a
curator-only debugging mode whose file says NOT_PRIVATE and whose report says so).
"""

import argparse
import dataclasses
import math

from utils.cli import UserInputError
from utils.privacy.accounting import (
    ACCOUNTANTS,
    NEIGHBORING_RELATIONS,
    PrivacyAccountant,
    check_delta,
    compute_epsilon_rdp,
    effective_noise_multiplier,
    noise_multiplier_for_epsilon,
)
from utils.privacy.ledger import LEDGER_ENV
from utils.privacy.sampling import SAMPLERS

# sigma_loss / sigma. Releasing the loss beside the gradient lowers the effective noise multiplier
# to sigma / sqrt(1 + ratio^-2); for the same epsilon the gradient's own noise must grow by that
# factor: 1.048 at 3.2 (4.8%, within the 5% we allow the loss to cost). The loss noise is then
# 3.2 sigma L / B in the released mean, e.g. 0.016 nats at sigma 1, L = ln(32000), B = 2048.
LOSS_NOISE_RATIO = 3.2

TRAIN_LOSS_MODES = ("private", "off", "exact")
INSECURE_SEED_CAVEAT = (
    "--insecure_dp_seed: whoever knows the seed regenerates every sample and noise draw, so the run has no "
    "guarantee; epsilon_if_seed_secret is what it would be with a secret seed"
)
EXACT_LOG_FILE = "training_log.NOT_PRIVATE_exact_losses.json"


def add_privacy_args(parser: argparse.ArgumentParser):
    privacy = parser.add_argument_group("privacy")
    privacy.add_argument("--clip_norm", type=float, default=1.0, help="per-example clipping norm C (<0: non-private)")
    privacy.add_argument("--noise_multiplier", type=float, default=None, help="sigma of the gradient (<0: non-private)")
    privacy.add_argument(
        "--target_epsilon", type=float, default=None, help="solve sigma for this epsilon over the planned steps"
    )
    privacy.add_argument("--delta", type=float, default=1e-7)
    privacy.add_argument(
        "--privacy_unit_key",
        default=None,
        metavar="KEY",
        help="records carry their privacy unit's id (user, patient, author) under KEY: one unit, "
        "however many records, is what epsilon protects (default: each record)",
    )
    privacy.add_argument(
        "--max_records_per_unit",
        type=int,
        default=4,
        metavar="K",
        help="with --privacy_unit_key: records a sampled unit contributes (a random K when it has more)",
    )
    privacy.add_argument(
        "--accountant",
        choices=sorted(ACCOUNTANTS),
        default="pld",
        help="pld: dp-accounting's privacy loss distribution (tight upper bound)",
    )
    privacy.add_argument(
        "--neighboring_relation",
        choices=list(NEIGHBORING_RELATIONS),
        default="add_remove",
        help="the relation --target_epsilon and the budget guard use (both epsilons are reported)",
    )
    privacy.add_argument(
        "--sampling",
        choices=sorted(SAMPLERS),
        default="poisson",
        help="poisson: the accounted mechanism; shuffle: fixed-size batches (epsilon then assumes Poisson)",
    )
    privacy.add_argument(
        "--train_loss",
        choices=TRAIN_LOSS_MODES,
        default="private",
        help="training loss in the release: a DP estimate (private), none (off), or exact "
        f"(curator-only debugging: written to {EXACT_LOG_FILE}, not covered by epsilon)",
    )
    privacy.add_argument(
        "--loss_clip",
        type=float,
        default=None,
        help="per-record loss bound L of the private loss (default: ln(vocabulary size), the loss of a uniform guess)",
    )
    privacy.add_argument(
        "--secure_noise",
        action="store_true",
        help="noise from the OS's cryptographic generator, each value a sum of four draws "
        "(floating-point attack mitigation)",
    )
    privacy.add_argument(
        "--insecure_dp_seed",
        type=int,
        default=None,
        help="TESTING ONLY: reproducible sampling and noise; the run then has no guarantee (epsilon null)",
    )
    privacy.add_argument(
        "--ledger_dir",
        default=None,
        help=f"the privacy ledger every run on the same data shares (default: ${LEDGER_ENV}, else the user's "
        "cache folder); deleting it forgets what was spent",
    )
    privacy.add_argument(
        "--ledger_budget_epsilon",
        type=float,
        default=None,
        metavar="EPSILON",
        help="cap, at --delta, what any privacy unit may spend over every run on the ledger (a Renyi filter: "
        "valid however runs are chosen); once set for a unit, it binds every later run on it",
    )
    # set by scripts/tune.py on its trials: the ledger's tuning procedures that cover their steps
    privacy.add_argument("--ledger_procedure", default=None, help=argparse.SUPPRESS)
    privacy.add_argument("--ledger_validation_procedure", default=None, help=argparse.SUPPRESS)
    return privacy


@dataclasses.dataclass(frozen=True)
class PrivacyArguments:
    """The privacy flags (add_privacy_args), typed and validated in one place: what a run promises
    before it sees the data. `private` is decided here and nowhere else."""

    clip_norm: float
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float
    privacy_unit_key: str | None
    max_records_per_unit: int
    accountant: str
    neighboring_relation: str
    sampling: str
    train_loss: str
    loss_clip: float | None
    secure_noise: bool
    insecure_dp_seed: int | None
    ledger_dir: str | None
    ledger_budget_epsilon: float | None
    ledger_procedure: str | None = None
    ledger_validation_procedure: str | None = None

    @property
    def private(self) -> bool:
        """Clipping and noise (a guarantee, or at least clipping); -1/-1 on the command line: none."""
        return self.clip_norm > 0

    @property
    def seed_published(self) -> bool:
        return self.insecure_dp_seed is not None

    @property
    def unit_name(self) -> str:
        return f"units ('{self.privacy_unit_key}')" if self.privacy_unit_key else "records"


def privacy_arguments(args: argparse.Namespace) -> PrivacyArguments:
    """The parsed privacy flags, checked together; a UserInputError names the first bad one."""
    if args.target_epsilon is not None and args.noise_multiplier is not None:
        raise UserInputError("--target_epsilon and --noise_multiplier exclude each other: give one")
    if args.target_epsilon is not None and args.clip_norm <= 0:
        raise UserInputError("--target_epsilon needs --clip_norm > 0")
    if args.target_epsilon is None and args.noise_multiplier is None:
        raise UserInputError(
            "give --noise_multiplier or --target_epsilon (or --clip_norm -1 --noise_multiplier -1 for non-private)"
        )
    if (args.clip_norm < 0) != (args.noise_multiplier is not None and args.noise_multiplier < 0):
        raise UserInputError("non-private mode needs both --clip_norm -1 and --noise_multiplier -1")
    if not (args.clip_norm > 0 or args.clip_norm < 0):  # 0 (or NaN) would silently train without privacy
        raise UserInputError(f"--clip_norm {args.clip_norm}: must be > 0 (or -1 for non-private training)")
    if args.target_epsilon is not None and not args.target_epsilon > 0:
        raise UserInputError(f"--target_epsilon {args.target_epsilon}: must be positive")
    if not 0 < args.delta < 1:
        raise UserInputError(f"--delta {args.delta}: must be in (0, 1)")
    if args.loss_clip is not None and not args.loss_clip > 0:
        raise UserInputError(f"--loss_clip {args.loss_clip}: must be positive")
    if args.secure_noise and args.insecure_dp_seed is not None:
        raise UserInputError("--secure_noise and --insecure_dp_seed exclude each other")
    if args.ledger_budget_epsilon is not None and not args.ledger_budget_epsilon > 0:
        raise UserInputError(f"--ledger_budget_epsilon {args.ledger_budget_epsilon}: must be positive")
    if args.max_records_per_unit < 1:
        raise UserInputError(f"--max_records_per_unit {args.max_records_per_unit}: must be at least 1")
    if args.privacy_unit_key is not None and args.sampling != "poisson":
        raise UserInputError("--privacy_unit_key samples units with Poisson sampling: it excludes --sampling shuffle")
    return PrivacyArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PrivacyArguments)})


@dataclasses.dataclass
class PrivacyPlan:
    private: bool
    noise_multiplier: float | None  # the gradient's sigma
    loss_noise_multiplier: float | None  # None: no private loss is released
    loss_clip: float | None  # L of the private loss
    train_loss: str
    steps: int  # planned, already cut to what the budget allows
    sampling_rate: float
    expected_batch_size: int
    dataset_size: int
    settings: PrivacyArguments
    sampling_caveat: str | None = None
    accountant: PrivacyAccountant | None = None
    discarded_steps: int = 0  # steps of a discarded branch of this run whose figures reached its release

    @property
    def effective_noise_multiplier(self):
        return effective_noise_multiplier(self.noise_multiplier, self.loss_noise_multiplier) if self.private else None

    @property
    def unit_name(self):
        return self.settings.unit_name

    @property
    def seed_published(self) -> bool:
        return self.settings.seed_published

    @property
    def guaranteed(self) -> bool:
        """Whether the run's steps carry a guarantee at all (on the privacy ledger too)."""
        return self.private and self.noise_multiplier > 0 and not self.seed_published

    @property
    def caveat(self):
        if not self.private:
            return "non-private training: epsilon is infinite"
        if self.noise_multiplier == 0:
            return "noise multiplier 0: clipping only, epsilon is infinite"
        if self.seed_published:
            return INSECURE_SEED_CAVEAT
        return self.sampling_caveat

    def epsilon(self, steps: int | None = None, relation: str | None = None) -> float | None:
        """Epsilon of this release after `steps` steps (default: those taken so far), a discarded
        branch's released steps included; None when non-private. With --insecure_dp_seed this is
        the figure the run would have if its seed were secret: see published_epsilon()."""
        if not self.accountant:
            return None
        steps = self.accountant.steps if steps is None else steps
        return self.accountant.epsilon(steps + self.discarded_steps, relation)

    def published_epsilon(self, steps: int | None = None, relation: str | None = None) -> float | None:
        """What the release may state: None also when the DP seed is known (no guarantee)."""
        return None if self.seed_published else self.epsilon(steps, relation)

    def fit_discarded_steps(self, discarded: int, start_step: int, release: str, say=print) -> None:
        """Count `discarded` released steps of a discarded branch; under --target_epsilon, end the
        run early enough that the release still stays within the target."""
        self.discarded_steps = discarded
        if not discarded:
            return
        say(f"note: {discarded} steps of a discarded branch of this run reached {release}; epsilon counts them")
        target = self.settings.target_epsilon
        if target is not None and self.accountant:
            allowed = self.accountant.steps_within(target, self.steps + discarded) - discarded
            if allowed < self.steps:
                say(f"warning: to stay within --target_epsilon {target:g} this run stops at step {allowed}")
                self.steps = max(start_step, allowed)

    def plan_line(self) -> str:
        if not self.private:
            batch = self.expected_batch_size
            return f"non-private training: epsilon = infinity ({self.steps} steps, expected batch {batch})"
        a = self.settings
        loss = (
            f", loss sigma {self.loss_noise_multiplier:.4g} at L {self.loss_clip:.3g}, effective sigma "
            f"{self.effective_noise_multiplier:.4g}"
            if self.loss_noise_multiplier is not None
            else ""
        )
        line = (
            f"privacy plan: epsilon {self.epsilon(self.steps):.4g} ({a.neighboring_relation}; replace-one "
            f"{self.epsilon(self.steps, 'replace_one'):.4g}) at delta {a.delta:g} (sigma "
            f"{self.noise_multiplier:.4g}{loss}, q {self.sampling_rate:.4g}, {self.steps} steps, expected batch "
            f"{self.expected_batch_size} {self.unit_name}, {a.sampling} sampling)"
        )
        return line + (f"\nnote: {self.caveat}" if self.caveat else "")

    def report(self, steps: int, num_processes: int) -> dict:
        """privacy_report.json: the guarantee of the `steps` steps taken, and how it was obtained."""
        a, private = self.settings, self.private
        released = steps + self.discarded_steps
        report = {
            "epsilon": self.published_epsilon(steps, "add_remove"),
            "epsilon_replace_one": self.published_epsilon(steps, "replace_one"),
            **(
                {
                    "epsilon_if_seed_secret": self.epsilon(steps, "add_remove"),
                    "epsilon_replace_one_if_seed_secret": self.epsilon(steps, "replace_one"),
                }
                if private and self.seed_published
                else {}
            ),
            "neighboring_relation": a.neighboring_relation,
            "epsilon_rdp": compute_epsilon_rdp(self.effective_noise_multiplier, self.sampling_rate, released, a.delta)
            if private and not self.seed_published
            else None,
            "delta": a.delta if private else None,
            "noise_multiplier": self.noise_multiplier if private else None,
            "loss_noise_multiplier": self.loss_noise_multiplier,
            "effective_noise_multiplier": self.effective_noise_multiplier,
            "clip_norm": a.clip_norm if private else None,
            "loss_clip": self.loss_clip,
            "train_loss": self.train_loss,
            "releases_non_private_statistics": self.train_loss == "exact",  # also every non-private run
            "target_epsilon": a.target_epsilon,
            "sampling": a.sampling,
            "sampling_rate": self.sampling_rate,
            "expected_batch_size": self.expected_batch_size,
            "dataset_size": self.dataset_size,  # privacy units: records, or units under --privacy_unit_key
            "privacy_unit": a.privacy_unit_key or "record",
            "num_units": self.dataset_size,
            "max_records_per_unit": a.max_records_per_unit if a.privacy_unit_key else 1,
            "steps": steps,
            "released_steps": released,  # what epsilon composes: a discarded branch's tracked steps too
            "accountant": self.accountant.name if private else None,
            "num_processes": num_processes,
            "noise_source": noise_source(a),
        }
        if self.caveat:
            report["note"] = self.caveat
        return report


def noise_source(settings: PrivacyArguments) -> str:
    if settings.seed_published:
        return "insecure (--insecure_dp_seed)"
    return (
        "os cryptographic generator, sum of 4 draws (--secure_noise)"
        if settings.secure_noise
        else "os-seeded generator"
    )


def make_privacy_plan(
    settings: PrivacyArguments, sampler, planned_steps: int, default_loss_clip: float, say=print
) -> PrivacyPlan:
    """Validate against the data, calibrate sigma, apply the budget guard; the run's PrivacyPlan.

    The sampler states the sampling rate q the accountant composes, the number of privacy units and
    its caveat; planned_steps: the steps asked for (--max_train_steps, or the sampler's for the
    epochs); default_loss_clip is L when --loss_clip is not given."""
    a, private = settings, settings.private
    dataset_size, sampling_rate, expected_batch_size = sampler.n, sampler.sampling_rate, sampler.expected_batch_size
    planned = planned_steps
    train_loss = a.train_loss if private else "exact"  # nothing is private without clipping and noise
    loss_clip = (a.loss_clip or default_loss_clip) if train_loss == "private" else None
    plan = PrivacyPlan(
        private,
        a.noise_multiplier if private else None,
        None,
        loss_clip,
        train_loss,
        planned,
        sampling_rate,
        expected_batch_size,
        dataset_size,
        settings,
        sampler.caveat,
    )
    if not private:
        return plan
    try:
        check_delta(a.delta, dataset_size, plan.unit_name)
        if a.target_epsilon is not None:
            effective = noise_multiplier_for_epsilon(
                a.target_epsilon, sampling_rate, planned, a.delta, a.neighboring_relation, a.accountant
            )
            plan.noise_multiplier = (
                effective * math.sqrt(1 + LOSS_NOISE_RATIO**-2) if train_loss == "private" else effective
            )
    except ValueError as err:
        raise UserInputError(str(err)) from None
    if train_loss == "private":
        plan.loss_noise_multiplier = LOSS_NOISE_RATIO * plan.noise_multiplier
    plan.accountant = PrivacyAccountant(
        plan.effective_noise_multiplier, sampling_rate, a.delta, a.neighboring_relation, a.accountant
    )
    if a.target_epsilon is not None:  # defence in depth: never step past the budget
        allowed = plan.accountant.steps_within(a.target_epsilon, planned)
        if allowed < planned:
            say(f"warning: only {allowed} of {planned} steps fit in --target_epsilon {a.target_epsilon:g}")
            plan.steps = allowed
    if plan.noise_multiplier == 0:
        say("warning: --noise_multiplier 0 clips without noise: epsilon is infinite")
    if train_loss == "exact":
        say(
            f"warning: --train_loss exact computes exact training losses, which epsilon does not cover: they go to "
            f"{EXACT_LOG_FILE} in --work_dir (for the data curator only; never publish it)"
        )
    return plan
