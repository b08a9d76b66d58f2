"""The privacy ledger (utils/privacy/ledger.py): keyed per privacy unit, composed for the worst-off unit,
durable through torn writes, never silently replaced, and a budget that concurrent runs cannot both
pass (docs/DESIGN.md 2.14)."""

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import ROOT, process_env, train_args, write_records
from prv_accountant import PRVAccountant
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

import train_clm
from utils.cli import UserInputError
from utils.data_utils import load_records_file, unit_keys
from utils.privacy.accounting import FILTER_ORDERS, composed_epsilon, within_renyi_filter
from utils.privacy.ledger import PrivacyLedger, Session, new_id


def session(ledger, units, q=0.125, sigma=1.0, planned=10, budget=None, parent=None, run=None):
    s = Session(
        new_id(), run or new_id(), parent, "/release/" + new_id(), False, q, sigma, "add_remove", planned, budget
    )
    return ledger.admit(s, units)


def spend(ledger, units, steps, **kwargs):
    admitted = session(ledger, units, planned=steps, **kwargs)
    for step in range(1, steps + 1):
        admitted.record_step(step)
    admitted.close()
    return admitted


def hashes(ledger, n, start=0):
    return ledger.unit_hashes([f"unit {i}".encode() for i in range(start, start + n)])


def test_units_are_keyed_by_content_whatever_the_file(text_records, tmp_path):
    ledger = PrivacyLedger(str(tmp_path / "ledger"))
    json_file = write_records(tmp_path / "a.json", text_records[:20])
    os.makedirs(tmp_path / "elsewhere")
    jsonl_file = write_records(tmp_path / "elsewhere" / "b.jsonl", text_records[:20][::-1], jsonl=True)
    a = ledger.unit_hashes(unit_keys(load_records_file(json_file)))
    b = ledger.unit_hashes(unit_keys(load_records_file(jsonl_file)))
    assert a == b and len(a) == 20
    # another ledger has another salt: its hashes say nothing about this one's
    assert not a & PrivacyLedger(str(tmp_path / "other")).unit_hashes(unit_keys(load_records_file(json_file)))


def independent_epsilon(mechanisms, delta):
    """The same heterogeneous composition with prv_accountant (another method, another library)."""
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for q, s in mechanisms]
    counts = list(mechanisms.values())
    accountant = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=0.01, delta_error=delta / 1000)
    return accountant.compute_epsilon(delta=delta, num_self_compositions=counts)


def test_ledger_epsilon_is_the_worst_off_units_composition(tmp_path):
    """Two data sets sharing half their units: a shared unit has spent both runs' steps, and the
    second run's report composes both mechanisms (another q, another sigma) for it."""
    ledger = PrivacyLedger(str(tmp_path / "ledger"))
    first, second = hashes(ledger, 64), hashes(ledger, 64, start=32)
    spend(ledger, first, 10, q=0.125, sigma=1.0)
    totals = spend(ledger, second, 6, q=0.25, sigma=1.5).totals(1e-3)
    mixed = {(0.125, 1.0): 10, (0.25, 1.5): 6}
    assert totals["ledger_steps"] == 16 and totals["ledger_entries"] == 16
    assert totals["ledger_epsilon"] == pytest.approx(composed_epsilon(mixed, 1e-3), rel=1e-12)
    low, _, high = independent_epsilon(mixed, 1e-3)
    assert low * 0.99 <= totals["ledger_epsilon"] <= high * 1.01
    assert totals["ledger_epsilon_replace_one"] > totals["ledger_epsilon"]
    # a data set of units only the second run touched has spent only its steps
    assert ledger.totals(hashes(ledger, 32, 64), 1e-3)["ledger_steps"] == 6


def test_a_run_without_a_guarantee_voids_the_figure_of_the_units_it_touched(tmp_path):
    ledger = PrivacyLedger(str(tmp_path / "ledger"))
    touched, untouched = hashes(ledger, 16), hashes(ledger, 16, start=16)
    spend(ledger, touched, 1, sigma=None)  # non-private, sigma 0 or a published DP seed
    assert spend(ledger, touched | untouched, 4).totals(1e-3)["ledger_epsilon"] is None
    assert spend(ledger, untouched, 4).totals(1e-3)["ledger_epsilon"] == pytest.approx(
        composed_epsilon({(0.125, 1.0): 8}, 1e-3)
    )


def entries(ledger):
    return os.path.join(ledger.folder, "entries.jsonl")


def test_torn_lines_are_counted_and_a_corrupt_ledger_stops(tmp_path):
    ledger = PrivacyLedger(str(tmp_path / "ledger"))
    units = hashes(ledger, 8)
    s = spend(ledger, units, 3).session
    with open(entries(ledger), "a") as f:  # a crash in the middle of writing step 4
        f.write(f'{{"kind": "step", "session": "{s.session}", "run": "{s.run}", "st')
    assert ledger.totals(units, 1e-3)["ledger_steps"] == 4
    spend(ledger, units, 1)  # the next write keeps the torn line apart (and marked) and it stays counted
    assert ledger.totals(units, 1e-3)["ledger_steps"] == 5
    open_session = session(ledger, units, planned=2)
    with open(entries(ledger), "a") as f:
        f.write('{"ki')  # not even the session is readable: charged to every session still open
    assert ledger.totals(units, 1e-3)["ledger_steps"] == 6
    open_session.record_step(1)
    open_session.close()
    assert ledger.totals(units, 1e-3)["ledger_steps"] == 7

    lines = open(entries(ledger)).read().split("\n")
    lines[3] = "not json at all"  # damage that no crash makes
    with open(entries(ledger), "w") as f:
        f.write("\n".join(lines))
    with pytest.raises(UserInputError, match="line 4 is corrupt; the ledger is never replaced"):
        ledger.totals(units, 1e-3)


@pytest.mark.parametrize("damage", ["salt", "entries.jsonl"])
def test_a_damaged_ledger_is_never_replaced_by_a_fresh_one(tmp_path, damage):
    folder = tmp_path / "ledger"
    PrivacyLedger(str(folder))
    os.remove(folder / damage)
    with pytest.raises(UserInputError, match=f"{damage} missing.*never replaced by a fresh one"):
        PrivacyLedger(str(folder))
    assert not (folder / damage).exists()


def test_renyi_filter_against_the_gaussian_closed_form():
    """Plain Gaussian steps (q = 1) have order-a RDP n a / (2 sigma^2): the filter admits n steps iff
    some order keeps that within its budget (the conversion of Canonne, Kamath and Steinke 2020 at
    delta / K)."""
    epsilon, delta, sigma, k = 2.0, 1e-5, 4.0, len(FILTER_ORDERS)

    def by_hand(n):
        return any(
            n * a / (2 * sigma**2) <= epsilon - math.log1p(-1 / a) + (math.log(delta / k) + math.log(a)) / (a - 1)
            for a in FILTER_ORDERS
        )

    admitted = [n for n in range(1, 40) if within_renyi_filter({(1.0, sigma): n}, epsilon, delta)]
    assert admitted == [n for n in range(1, 40) if by_hand(n)] and 0 < len(admitted) < 39
    # never more than one run planned in advance could take at the same epsilon (PLD, tight)
    most = max(admitted)
    assert composed_epsilon({(1.0, sigma): most}, delta) <= epsilon
    assert not within_renyi_filter({(0.01, 1.0): 10, (0.01, None): 1}, 100.0, delta)


def test_a_budget_admits_only_what_fits_running_runs_included(tmp_path):
    folder = str(tmp_path / "ledger")
    first, second = PrivacyLedger(folder), PrivacyLedger(folder)  # two runs, each its own handle
    units = hashes(first, 32)
    budget = [2.0, 1e-5]
    steps_fitting = max(n for n in range(1, 400) if within_renyi_filter({(1.0, 10.0): n}, *budget))
    half = steps_fitting // 2 + 1
    session(first, units, q=1.0, sigma=10.0, planned=half, budget=budget)  # running: its plan is reserved
    with pytest.raises(UserInputError, match="--ledger_budget_epsilon 2 .*planned steps do not fit"):
        session(second, units, q=1.0, sigma=10.0, planned=half, budget=budget)
    first.close()  # finished without taking a step: its reservation lapses
    session(second, units, q=1.0, sigma=10.0, planned=half, budget=budget)
    second.close()

    # a crashed run's reservation lapses too (its lock dies with it), its steps stay
    crash = (
        "import sys; sys.path.insert(0, sys.argv[1]); import os\n"
        "from utils.privacy.ledger import PrivacyLedger, Session, new_id\n"
        "ledger = PrivacyLedger(sys.argv[2])\n"
        "units = ledger.unit_hashes([f'unit {i}'.encode() for i in range(32)])\n"
        "admitted = ledger.admit(Session(new_id(), new_id(), None, '/r', False, 1.0, 10.0, 'add_remove', 2), units)\n"
        "admitted.record_step(1)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", crash, ROOT, folder], check=True, env=process_env())
    assert first.totals(units, 1e-5)["ledger_steps"] == 1
    session(first, units, q=1.0, sigma=10.0, planned=steps_fitting - 1, budget=budget)
    first.close()
    # once set for these units, the budget binds a later run that does not repeat it
    with pytest.raises(UserInputError, match="--ledger_budget_epsilon 2 "):
        session(second, units, q=1.0, sigma=10.0, planned=steps_fitting)
    with pytest.raises(UserInputError, match="cannot train on privacy units under a budget"):
        session(second, units, sigma=None, planned=1)


def test_a_run_stops_on_a_spent_budget_and_on_an_unusable_ledger(tiny_llama, text_records, tmp_path):
    """Both before the first step, leaving no folder behind (one line and exit status 2 from the
    command line, like every UserInputError: test_bad_input.py)."""
    data = write_records(tmp_path / "d.json", text_records[:64])
    sizes = dict(block_size=32, per_device_train_batch_size=8, max_train_steps=4, noise_multiplier=1.0, delta=1e-3)

    def run(out, **options):
        reset_accelerate()
        train_clm.main(train_args(tiny_llama, data, out, **(sizes | options)))

    run(tmp_path / "first", ledger_budget_epsilon=3)
    report = json.loads((tmp_path / "first" / "privacy_report.json").read_text())
    assert report["ledger_budget_epsilon"] == 3 and report["ledger_steps"] == 4
    with pytest.raises(UserInputError, match=r"^--ledger_budget_epsilon 3 \(delta 0.001\): this run's 4 planned"):
        run(tmp_path / "second", ledger_budget_epsilon=3)
    with pytest.raises(UserInputError, match="^--ledger_budget_epsilon 3 "):  # the budget binds without the flag
        run(tmp_path / "second", max_train_steps=3)
    assert not (tmp_path / "second").exists() and not (tmp_path / "second.work").exists()

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(UserInputError, match="^privacy ledger .*: unusable"):
        run(tmp_path / "third", ledger_dir=str(not_a_folder / "ledger"))
    assert not (tmp_path / "third").exists()


def reset_accelerate():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
