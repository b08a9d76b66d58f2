"""train_clm.py's sessions on the privacy ledger (docs/DESIGN.md 2.14, 2.15): admitted before the
run touches any data, and the ledger's figures for its report. Process 0 alone calls these."""

import dataclasses
import os

from utils.privacy.ledger import Session, new_id
from utils.privacy.validation import planned_evaluations, validation_report


def admit_to_ledger(args, run, say=print) -> tuple[int, int]:
    """The training session (and the validation session of a private validation loss): a resumed
    run's discarded branch counted first, then --ledger_budget_epsilon checked. Returns (steps of a
    discarded branch in this release, the steps this run may take)."""
    state, plan = run.state, run.plan
    release = os.path.abspath(args.output_dir)
    discarded = run.ledger.steps_off_lineage(state.run_id, release, state.lineage) if state.lineage else 0
    plan.fit_discarded_steps(discarded, state.step, args.output_dir, say)
    session = Session(
        session=state.session_id,
        run=state.run_id,
        parent=state.parent,
        release=release,
        tracked=args.with_tracking,
        sampling_rate=plan.sampling_rate,
        noise_multiplier=plan.effective_noise_multiplier if plan.guaranteed else None,
        relation=args.privacy.neighboring_relation,
        planned=plan.steps - state.step,
        budget=[args.privacy.ledger_budget_epsilon, args.privacy.delta] if args.privacy.ledger_budget_epsilon else None,
        **trial_of(args.privacy.ledger_procedure),
    )
    run.ledgered = run.ledger.admit(session, run.unit_hashes)
    if run.validation:  # its own units, its own Gaussian, one per evaluation
        validation = dataclasses.replace(
            session,
            session=new_id(),
            parent=None,
            sampling_rate=1.0,
            noise_multiplier=None if plan.seed_published else run.validation.noise_multiplier,
            planned=planned_evaluations(state.step, plan.steps, args.eval_freq),
            **({"purpose": "validation"} | trial_of(args.privacy.ledger_validation_procedure)),
        )
        run.validation.admitted = run.ledger.admit(validation, run.ledger.unit_hashes(run.validation.keys))
    return discarded, plan.steps


def trial_of(procedure: str | None) -> dict:
    """A trial of scripts/tune.py: its steps are covered by the procedure's one invocation."""
    return {"purpose": "trial", "procedure": procedure} if procedure else {}


def ledger_report(args, run) -> dict:
    """privacy_report.json's ledger and validation keys."""
    report = run.ledgered.totals(args.privacy.delta)
    if args.privacy.ledger_budget_epsilon:
        report["ledger_budget_epsilon"] = args.privacy.ledger_budget_epsilon
    evaluations = run.ledger.run_steps(run.state.run_id, "validation") if run.validation else 0
    report.update(validation_report(run.validation, evaluations, args.privacy.delta, run.plan.seed_published))
    if run.validation:
        report["validation_ledger_epsilon"] = run.validation.admitted.totals(args.privacy.delta)["ledger_epsilon"]
    return report
