"""The privacy ledger: every DP computation on a data set, over every run's whole life (docs/DESIGN.md 2.14).

One durable, append-only store shared by all runs (default: the user's cache folder; --ledger_dir or
DP_LEDGER_DIR elsewhere), never inside a release folder. It is keyed by privacy unit: a salted hash
of each record (or of each unit id under --privacy_unit_key), so adding, dropping or reformatting
records, or reading the same records from another path, leaves every unit's spend in place. The
salt stays in the ledger folder.

Each run (one invocation of train_clm.py, a "session") is admitted under an exclusive lock: its
units, its mechanism and the steps it plans (its reservation) go on the ledger first, and a budget
(--ledger_budget_epsilon) is checked there, so two concurrent runs cannot both pass it. Each step is
written and flushed (by process 0 only) before the step touches the data, so everything it produces
is on the ledger before it reaches a tracker, a log, a checkpoint or an adapter. A crash, a resume,
a fork or a retry is just more sessions.

Folder layout: `salt`, `entries.jsonl` (a header line, then one JSON object per line: `session`,
`step`, `end`, and `repair` after a torn line), `units/<digest>` (the sorted unit hashes of a data
set, shared by every session on it), `sessions/<id>.lock` (held while a session lives: a crashed
session's reservation lapses, its steps stay) and `lock`.
"""

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import Counter

import platformdirs
from filelock import FileLock, Timeout

from utils.cli import UserInputError
from utils.privacy.accounting import composed_epsilon, mechanism_steps, within_renyi_filter

LEDGER_ENV = "DP_LEDGER_DIR"
FORMAT = 1
_ENTRIES, _SALT, _UNITS, _SESSIONS, _LOCK = "entries.jsonl", "salt", "units", "sessions", "lock"
_FIELDS = {
    "session": {"session", "run", "parent", "release", "tracked", "units", "sampling_rate", "noise_multiplier"},
    "step": {"session", "run", "step", "sampling_rate", "noise_multiplier", "relation", "units"},
    "end": {"session", "steps"},
    "repair": set(),
}
_TORN_KIND = re.compile(r'^\{"kind": "(\w+)"')
_TORN_SESSION = re.compile(r'"session": "([0-9a-f]+)"')


def default_ledger_dir() -> str:
    return os.environ.get(LEDGER_ENV) or os.path.join(platformdirs.user_cache_dir("dp-lora-finetuning"), "ledger")


def new_id() -> str:
    return secrets.token_hex(8)


@dataclasses.dataclass
class Session:
    """One invocation of train_clm.py: what the ledger must know before it touches any data."""

    session: str
    run: str  # kept by the run's checkpoints: every resume and fork of them shares it
    parent: list | None  # [session, step] of the checkpoint it resumed from
    release: str  # absolute path of its --output_dir
    tracked: bool  # its steps' figures go to a tracker in that release as they are taken
    sampling_rate: float
    noise_multiplier: float | None  # effective sigma of one step; None: no guarantee
    relation: str
    planned: int  # the steps it may still take: its reservation
    budget: list | None = None  # [epsilon, delta] of --ledger_budget_epsilon
    # "train"; "validation": a private validation loss, one Gaussian per evaluation; "procedure": a
    # tuning procedure, one invocation of `select`; "trial": one of its trials, covered by it
    purpose: str = "train"
    select: list | None = None  # a procedure's [trial steps, mean trials, shape] (RepeatAndSelect)
    procedure: str | None = None  # a trial's procedure
    units: str = ""  # digest of its unit set, filled in by admit()

    @property
    def mechanism(self):
        return _mechanism_of(dataclasses.asdict(self))


def _mechanism_of(entry: dict) -> tuple:
    """(q, sigma), or (q, sigma, steps, mean, shape) for a tuning procedure (accounting.py)."""
    return (entry["sampling_rate"], entry["noise_multiplier"] or None, *(entry.get("select") or ()))


@dataclasses.dataclass
class LedgerState:
    """The parsed entries: sessions by id, step invocations, and sessions that ended cleanly."""

    sessions: dict
    steps: list  # (session id, step, units digest, (q, sigma))
    ended: set


class PrivacyLedger:
    """Open (or create on first use) the ledger in `folder`; a damaged one stops the run, it is never
    replaced by a fresh one."""

    def __init__(self, folder: str | None = None):
        self.folder = os.path.abspath(folder or default_ledger_dir())
        try:
            if not os.path.exists(self.folder):
                self._create()
            self._check_layout()
            with open(self._path(_SALT)) as f:
                self.salt = bytes.fromhex(f.read().strip())
            with open(self._path(_ENTRIES)) as f:
                header = json.loads(f.readline())
            self.ledger_id = header["ledger_id"]
            if header.get("format") != FORMAT or len(self.salt) != 32:
                raise ValueError("unknown format")
            open(self._path(_ENTRIES), "a").close()  # unwritable: stop now, before step 1
            self._lock = FileLock(self._path(_LOCK))
        except UserInputError:
            raise
        except (OSError, ValueError, KeyError) as err:
            raise UserInputError(f"privacy ledger {self.folder}: unusable ({_reason(err)}); {_NEVER_FRESH}") from None
        self._open = []  # the Admitted sessions of this process, closed by close()
        self._unit_sets = {}  # digest -> unit set: a digest names its content, so it never goes stale

    def _path(self, *parts):
        return os.path.join(self.folder, *parts)

    def _create(self):
        parent = os.path.dirname(self.folder)
        os.makedirs(parent, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".ledger-", dir=parent)
        try:
            with open(os.path.join(scratch, _SALT), "w") as f:
                f.write(secrets.token_hex(32))
            header = {"kind": "ledger", "format": FORMAT, "ledger_id": new_id(), "created": _now()}
            with open(os.path.join(scratch, _ENTRIES), "w") as f:
                f.write(json.dumps(header) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.makedirs(os.path.join(scratch, _UNITS))
            os.makedirs(os.path.join(scratch, _SESSIONS))
            os.rename(scratch, self.folder)  # all or nothing; another process may have won the race
        except OSError:
            if not os.path.isdir(self.folder):
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _check_layout(self):
        missing = [name for name in (_SALT, _ENTRIES, _UNITS, _SESSIONS) if not os.path.exists(self._path(name))]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing")

    # -- units --------------------------------------------------------------------------------------

    def unit_hashes(self, keys: list[bytes]) -> set[bytes]:
        """Salted hashes of the privacy units' keys (data_utils.unit_keys)."""
        return {hashlib.blake2b(key, digest_size=16, key=self.salt).digest() for key in keys}

    def _store_units(self, hashes: set[bytes]) -> str:
        blob = b"".join(sorted(hashes))
        digest = hashlib.sha256(blob).hexdigest()[:32]
        path = self._path(_UNITS, digest)
        if not os.path.exists(path):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return digest

    def _load_units(self, digest: str) -> set[bytes]:
        if digest not in self._unit_sets:
            try:
                with open(self._path(_UNITS, digest), "rb") as f:
                    blob = f.read()
            except OSError as err:
                raise UserInputError(
                    f"privacy ledger {self.folder}: unit set {digest} unreadable ({_reason(err)}); {_NEVER_FRESH}"
                ) from None
            self._unit_sets[digest] = {blob[i : i + 16] for i in range(0, len(blob), 16)}
        return self._unit_sets[digest]

    # -- reading ------------------------------------------------------------------------------------

    def read(self) -> LedgerState:
        try:
            with open(self._path(_ENTRIES), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as err:
            raise UserInputError(f"privacy ledger {self.folder}: unreadable ({_reason(err)}); {_NEVER_FRESH}") from None
        lines = text.split("\n")
        torn_tail = lines[-1] != ""  # the last line lacks its newline: a write cut short
        lines = lines[1:] if torn_tail else lines[1:-1]
        state = LedgerState({}, [], set())
        for number, line in enumerate(lines, start=2):
            try:
                entry = json.loads(line)
                kind = entry["kind"]
                if kind not in _FIELDS or not _FIELDS[kind] <= set(entry):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                is_last = number == len(lines) + 1
                repaired = number - 1 < len(lines) and lines[number - 1].startswith('{"kind": "repair"')
                if (is_last and torn_tail) or repaired:
                    self._count_torn(line, state)
                    continue
                raise UserInputError(
                    f"privacy ledger {self.folder}: {_ENTRIES} line {number} is corrupt; {_NEVER_FRESH}"
                ) from None
            if kind == "session":
                state.sessions[entry["session"]] = entry
            elif kind == "step":
                state.steps.append((entry["session"], entry["step"], entry["units"], _mechanism_of(entry)))
            elif kind == "end":
                state.ended.add(entry["session"])
        # a tuning procedure's one invocation covers its trials: their steps are on the ledger, not spent twice
        covered = {s for s, e in state.sessions.items() if state.sessions.get(e.get("procedure"), {}).get("select")}
        state.steps = [step for step in state.steps if step[0] not in covered]
        return state

    def _count_torn(self, line, state):
        """A line cut short by a crash is counted, never dropped: a step of its session, or, when even
        the session cannot be read, one step of every session still open at that point."""
        kind = _TORN_KIND.match(line)
        if kind and kind.group(1) in ("session", "end", "repair"):
            return  # a session that never started, or one whose steps are all on their own lines
        session = _TORN_SESSION.search(line)
        owners = [session.group(1)] if session else [s for s in state.sessions if s not in state.ended]
        for owner in owners:
            entry = state.sessions.get(owner)
            if entry:
                state.steps.append((owner, None, entry["units"], _mechanism_of(entry)))

    # -- writing ------------------------------------------------------------------------------------

    def _append(self, entry: dict) -> None:
        """One line, flushed to disk. Call under self._lock."""
        line = json.dumps(entry)
        with open(self._path(_ENTRIES), "rb+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # the last line was torn by a crash: keep it apart, marked
                    f.write(b'\n{"kind": "repair"}\n')
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def admit(self, session: Session, units: set[bytes]) -> "Admitted":
        """Put the session, its units and its reservation on the ledger, after checking under the
        exclusive lock that a resumed checkpoint belongs to the same data and that every budget set
        for these units can pay for the planned steps; returns the handle that records its steps."""
        try:
            with self._lock:
                state = self.read()
                session.units = self._store_units(units)
                self._check_parent(session, state)
                self._check_release(session, state)
                budgets = self._budgets(state, units) + ([session.budget] if session.budget else [])
                if session.procedure:  # its procedure paid for it, and passed every budget
                    self._check_trial(session, state)
                elif budgets:
                    self._check_budgets(session, units, state, budgets)
                lock = FileLock(self._path(_SESSIONS, f"{session.session}.lock"))
                lock.acquire(timeout=0)  # held while this session lives
                try:
                    self._append({"kind": "session", **dataclasses.asdict(session), "time": _now()})
                except BaseException:
                    self._release_session_lock(session.session, lock)
                    raise
        except OSError as err:
            raise UserInputError(f"privacy ledger {self.folder}: cannot write ({_reason(err)})") from None
        admitted = Admitted(self, session, units, lock)
        self._open.append(admitted)
        return admitted

    def close(self) -> None:
        """Every session this process admitted ended (finished or failed): reservations lapse, steps stay."""
        while self._open:
            self._open.pop().close()

    def _release_session_lock(self, session_id, lock):
        lock.release()
        try:
            os.remove(self._path(_SESSIONS, f"{session_id}.lock"))
        except OSError:
            pass

    def _alive(self, session_id: str) -> bool:
        """Whether a session that has not ended still runs: its process holds its lock."""
        path = self._path(_SESSIONS, f"{session_id}.lock")
        if not os.path.exists(path):
            return False
        probe = FileLock(path)
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return True
        self._release_session_lock(session_id, probe)  # it crashed: its lock file goes too
        return False

    # -- checks at admission ------------------------------------------------------------------------

    def _check_parent(self, session, state):
        if session.parent is None:
            return
        parent = state.sessions.get(session.parent[0])
        if parent is None:
            raise UserInputError(
                f"--resume_from_checkpoint: the checkpoint's run is not on the privacy ledger {self.folder}; "
                "resume it with the ledger it was made under (--ledger_dir)"
            )
        if parent["units"] != session.units:
            raise UserInputError(
                "--resume_from_checkpoint: the checkpoint was trained on other data (its privacy units differ)"
            )

    def _check_release(self, session, state):
        """A release belongs to one run: no session writes into a folder holding part of another's."""
        if not (os.path.isdir(session.release) and os.listdir(session.release)):
            return
        if {e["run"] for e in state.sessions.values() if e["release"] == session.release} - {session.run}:
            raise UserInputError(
                f"{session.release}: holds part of another run's release; fork the checkpoint into a new --output_dir"
            )

    def _check_trial(self, session, state):
        """A trial runs only inside a running procedure, on its data, with its mechanism."""
        procedure = state.sessions.get(session.procedure)
        running = procedure and procedure.get("select") and session.procedure not in state.ended
        same = running and procedure["units"] == session.units and _mechanism_of(procedure)[:2] == session.mechanism
        if not same or session.planned > procedure["select"][0]:
            raise UserInputError(
                "a tuning trial outside its procedure (no running procedure on this ledger with the same data, "
                "sampling rate, noise and at least as many steps): run trials through scripts/tune.py"
            )

    def _budgets(self, state, units):
        """Budgets an earlier session set for some of these units: once set, a budget binds every
        later run on them."""
        seen = set()
        for entry in state.sessions.values():
            budget = entry.get("budget")
            if budget and tuple(budget) not in seen and self._load_units(entry["units"]) & units:
                seen.add(tuple(budget))
        return [list(b) for b in sorted(seen)]

    def _check_budgets(self, session, units, state, budgets):
        if session.noise_multiplier is None and session.planned:
            raise UserInputError(
                f"--ledger_budget_epsilon {budgets[0][0]:g}: a run without a guarantee (non-private, noise "
                "multiplier 0 or --insecure_dp_seed) cannot train on privacy units under a budget"
            )
        planned = Counter({session.mechanism: session.planned})
        for spend in self.spend(state, units, reservations=True):
            for epsilon, delta in budgets:
                if not within_renyi_filter(spend + planned, epsilon, delta):
                    spent = composed_epsilon(spend, delta)
                    raise UserInputError(
                        f"--ledger_budget_epsilon {epsilon:g} (delta {delta:g}): this run's {session.planned} "
                        f"planned steps do not fit; some of its privacy units have already spent epsilon "
                        f"{spent:.4g} on the ledger (running runs' planned steps included)"
                    )

    # -- composition --------------------------------------------------------------------------------

    def spend(self, state: LedgerState, units: set[bytes], reservations: bool = False) -> list[Counter]:
        """Mechanism counts of the worst-off groups of `units`: units touched by the same ledger
        sessions form a group; only groups touched by no fewer sessions than another are kept."""
        by_set = {}
        for _, _, digest, mechanism in state.steps:
            by_set.setdefault(digest, Counter())[mechanism] += 1
        if reservations:
            taken = Counter(s for s, _, _, _ in state.steps)
            for sid, entry in state.sessions.items():
                left = entry.get("planned", 0) - taken[sid]
                if sid not in state.ended and left > 0 and not entry.get("procedure") and self._alive(sid):
                    by_set.setdefault(entry["units"], Counter())[_mechanism_of(entry)] += left
        members = {}
        for digest in by_set:
            for unit in self._load_units(digest) & units:
                members.setdefault(unit, set()).add(digest)
        groups = {frozenset(digests) for digests in members.values()}
        maximal = [g for g in groups if not any(g < other for other in groups)]
        return [sum((by_set[d] for d in group), Counter()) for group in maximal] or [Counter()]

    def totals(self, units: set[bytes], delta: float) -> dict:
        """The report's ledger figures for `units`: the worst-off unit's PLD composition of every
        ledgered step that touched it, at `delta`."""
        state = self.read()
        spends = self.spend(state, units)
        worst = max(spends, key=lambda c: (composed_epsilon(c, delta), sum(c.values())))
        add_remove, replace_one = composed_epsilon(worst, delta), composed_epsilon(worst, delta, "replace_one")
        mine = {d for d in {digest for _, _, digest, _ in state.steps} if self._load_units(d) & units}
        return {
            "ledger_epsilon": add_remove if add_remove != float("inf") else None,
            "ledger_epsilon_replace_one": replace_one if replace_one != float("inf") else None,
            "ledger_steps": mechanism_steps(worst),
            "ledger_delta": delta,
            "ledger_id": self.ledger_id,
            "ledger_entries": sum(1 for _, _, digest, _ in state.steps if digest in mine),
        }

    def steps_off_lineage(self, run: str, release: str, lineage: list) -> int:
        """Steps of this run's earlier sessions whose figures reached `release` through its tracker but
        are not in the adapter being continued (a branch discarded by a resume from an older
        checkpoint): they count toward this release's epsilon."""
        state = self.read()
        kept = {}
        for session_id, first, last in lineage:
            kept.setdefault(session_id, set()).update(range(first + 1, last + 1))
        extra = 0
        for session_id, step, _, _ in state.steps:
            entry = state.sessions.get(session_id)
            if (
                entry
                and entry.get("purpose", "train") == "train"
                and entry["run"] == run
                and entry["release"] == release
            ):
                extra += entry["tracked"] and (step is None or step not in kept.get(session_id, ()))
        return extra

    def run_steps(self, run: str, purpose: str) -> int:
        """Steps of every session of `run` with this purpose, on any branch (a crashed one too)."""
        state = self.read()
        ids = {sid for sid, e in state.sessions.items() if e["run"] == run and e.get("purpose", "train") == purpose}
        return sum(1 for session_id, _, _, _ in state.steps if session_id in ids)


class Admitted:
    """An admitted session: it records its steps, gives its units' totals, and ends."""

    def __init__(self, ledger, session, units, lock):
        self.ledger, self.session, self.units, self._lock = ledger, session, units, lock
        self.steps_taken = 0

    def record_step(self, step: int) -> None:
        """Step `step` of this session, on disk before it touches any data."""
        s = self.session
        entry = {"kind": "step", "session": s.session, "run": s.run, "step": step, "sampling_rate": s.sampling_rate}
        entry.update(noise_multiplier=s.noise_multiplier, relation=s.relation, units=s.units)
        entry.update({key: getattr(s, key) for key in ("select", "procedure") if getattr(s, key)})
        with self.ledger._lock:
            self.ledger._append(entry)
        self.steps_taken += 1

    def totals(self, delta: float) -> dict:
        return self.ledger.totals(self.units, delta)

    def close(self) -> None:
        """The session ended (finished or failed): its reservation lapses; its steps stay."""
        if self._lock is None:
            return
        try:
            with self.ledger._lock:
                self.ledger._append({"kind": "end", "session": self.session.session, "steps": self.steps_taken})
        finally:
            self.ledger._release_session_lock(self.session.session, self._lock)
            self._lock = None


def ledger_line(report: dict) -> str:
    """The console line of a finished run: what the worst-off unit of its data has spent."""
    epsilon = report["ledger_epsilon"]
    spent = f"epsilon {epsilon:.4g}" if epsilon is not None else "no guarantee (a run without one touched them)"
    return (
        f"privacy ledger {report['ledger_id']}: this data's worst-off privacy unit has spent {spent} at delta "
        f"{report['ledger_delta']:g} over {report['ledger_steps']} steps of every run on it"
    )


_NEVER_FRESH = "the ledger is never replaced by a fresh one (that would forget what was spent): restore it, or point --ledger_dir at the right one"  # noqa: E501


def _reason(err):
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
