"""One server's state: up, down or refused, its connection slots, its counters, and its probes.

State machine (changed only by the pool, under its lock in threaded mode)::

        connect fails, a probe fails,        probe due (retry_at)
        a session is lost (probe now)
    UP ─────────────────────────► DOWN ──────────────────────────► probing
     ▲   generation += 1,          ▲  backoff: 0.1 s doubling,         │
     │   idle connections closed   │  capped at 0.5 s, ±20% jitter      │
     │                             └────────── probe fails ◄───────────┤
     │   the server refuses us (password, database, pg_hba):           │
     │   REFUSED, probed every 5 s at most, logged once ◄──────────────┤
     └──────────────────────────── probe succeeds ◄────────────────────┘

A lost session or a statement past ``query_timeout`` is only indirect evidence (one backend may
have been terminated, one query may be slow), so it ejects with the probe due at once, and the
endpoint is ``suspect``: a request of this process that needs it meanwhile waits a moment for
that probe (``PROBE_GRACE``, below), so a false alarm costs milliseconds, a dead server no
connect timeout (a stalled one: that moment, once). On the shared board it is suspect too, so
another process's request gives its own probe that moment as well; the first probe that lets it
pass unanswered makes the endpoint plainly down everywhere. A missed deadline (a statement or a
ping) leaves the other sessions open while it is suspect (``keeping``: the generation is bumped
only if the suspicion is confirmed), since one slow query must not cost every process its
connections. Re-admitted, each kept session is pinged before it is lent (``to_verify``): the
probe answered on a new connection. The statement the watchdog cut off (``orphans``), which the
server would otherwise run to its end, is cancelled there (watchdog.py). A lost session drops
them at once: the server may have restarted. A request also waits for a probe after a
quiet spell (nobody saw the endpoint down for ``QUIET`` seconds: it may be back). An outage
someone confirmed just now by a slow failure (a connect or probe that spent its deadline, or
another process's such evidence on the board) is not worth a wait, since its next probe will
most likely fail too, and as slowly: requests fail fast while it runs (``worth_waiting``). A
failure that came at once (refused: the host is up, the server not yet) is not such news: the
next probe costs a waiting request milliseconds, and after a restart it finds the server back.

Slots. Every connection an endpoint has, or is opening, holds one slot: an entry in ``slots``
(open connections) or ``pending`` (connections being opened), keyed by a number and holding a weak
reference to its holder. A slot is freed exactly once: by its owner (``release``), or, if an
asynchronous exception (a signal handler's timeout, ^C) drops the holder on the floor between two
bytecodes, by the weak reference's callback when the holder is collected. Counting that way
cannot drift, however a loan ends.

Invariants:
- ``size`` (slots + pending) counts every connection of this endpoint: idle, in use and being
  opened. It never exceeds ``max_size``.
- A connection whose ``generation`` differs from its endpoint's was made before the last failure
  (or role change) and is never handed out again; bumping the generation invalidates them all in
  O(1).
- While DOWN or REFUSED nobody connects to the endpoint except the probe, so no caller waits on a
  connect timeout for a server already known to be unreachable.
"""

from __future__ import annotations

import itertools
import random
import time
import weakref
from collections import deque
from typing import Any

from .config import PRIMARY, EndpointConfig

UP, DOWN, REFUSED, CONFLICT = "up", "down", "refused", "conflict"

BACKOFF_FIRST = 0.1  # seconds before the first probe of a freshly ejected endpoint
BACKOFF_CAP = 0.5  # so a recovered server is re-admitted within about 0.6 s plus one probe
BACKOFF_JITTER = 0.2  # ±20%, so workers that lost a server together don't probe in step
REFUSED_BACKOFF_CAP = 5.0  # a refusal needs a person to fix it: don't fill the server's log

# How long a request that needs a down endpoint waits for a probe that is due or has just
# started: a login on a LAN takes about 5 ms, so a server that is fine (a lost session was a false
# alarm) or back answers within it; one that does not is treated as down and requests fail fast.
# It grows with the logins this endpoint was seen to take (a loaded machine, a far server), up to
# PROBE_GRACE_MAX, so a false alarm stays one even when logins are slow (and is that until one
# was seen). Where logins take longer than a third of that (a far server), a request waits for a
# probe LOGINS_WAITED of them instead (``probe_wait``): a probe is a login, and one that cannot
# finish within a request's wait never finishes in process mode, whose requests alone attend it.
PROBE_GRACE = 0.05
PROBE_GRACE_MAX = 0.5
LOGINS_WAITED = 1.5
QUIET = 1.0  # nobody saw the endpoint down for this long: a probe may well find it back

_keys = itertools.count(1)


def backoff_delay(failures: int, rand: float, cap: float = BACKOFF_CAP) -> float:
    """Seconds until the next probe after ``failures`` failed attempts; ``rand`` is in [0, 1)."""
    base = min(cap, BACKOFF_FIRST * 2 ** min(failures, 32))
    return base * (1 - BACKOFF_JITTER + 2 * BACKOFF_JITTER * rand)


class _SlotRef(weakref.ref):
    """A slot's entry: a weak reference to its holder that frees the slot if the holder dies."""

    __slots__ = ("key", "table")


def _free_slot(ref: _SlotRef) -> None:
    # A weakref callback: runs wherever the last reference went, perhaps under the pool lock, so
    # it touches nothing but its own entry (one dict operation each, atomic under the GIL).
    table = ref.table
    if table.get(ref.key) is ref:
        table.pop(ref.key, None)


class Reservation:
    """A slot reserved for a connection being opened; given to ``Endpoint.adopt`` on success."""

    __slots__ = ("endpoint", "key", "raw", "__weakref__")

    def __init__(self, endpoint: "Endpoint", key: int) -> None:
        self.endpoint = endpoint
        self.key = key
        self.raw: Any = None  # the session once connected, while configure() and the baseline run


class Endpoint:
    """The pool-side state of one server. Plain data: the pool drives the transitions."""

    __slots__ = (
        "name", "role", "config", "max_size", "state", "generation", "idle", "slots", "pending",
        "down_since", "retry_at", "failures", "last_error", "last_error_at", "probe",
        "checkouts", "waits", "timeouts", "connects", "connect_errors", "ejections", "discards",
        "query_timeouts", "timeline", "replay_lsn", "lag_s", "lag_bytes", "lagging", "status_at",
        "answers", "answers_since", "floor", "diverged", "judged", "monitor", "monitor_at",
        "board_slot", "board_seq", "board_epoch", "login_s", "suspect", "seen_down_at",
        "failed_fast", "keeping", "verify_from", "verify_until", "orphans", "errand",
    )

    def __init__(self, config: EndpointConfig, max_size: int) -> None:
        self.name = config.name
        self.role = config.role
        self.config = config
        self.max_size = max_size
        self.state = UP  # optimistic until the start-up probe or a first connection says otherwise
        self.generation = 0
        self.idle: list[Any] = []  # a stack: the most recently returned connection goes out first
        self.slots: dict[int, _SlotRef] = {}  # open connections, idle or lent
        self.pending: dict[int, _SlotRef] = {}  # connections being opened
        self.down_since = 0.0
        self.retry_at = 0.0
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall-clock time of last_error (time.time())
        self.probe: Any = None  # the Probe in flight while not UP, if any
        self.monitor: Any = None  # the Monitor asking it where it stands while up (monitor.py)
        self.monitor_at = 0.0
        self.timeline: int | None = None  # a primary's timeline, from the monitor
        self.replay_lsn: int | None = None  # a replica's replay position, from the monitor
        self.lag_s: float | None = None
        self.lag_bytes: int | None = None
        self.lagging = False  # behind by more than max_lag: out of read rotation (lag.py)
        self.status_at = 0.0  # when the newest status applied here was asked (monitor.py)
        self.answers: deque[tuple[float, int]] = deque(maxlen=8)  # (when read, reach) (lag.py)
        self.answers_since = 0.0  # ...only those asked after this count (a new primary since)
        self.floor: int | None = None  # the timeline it is on at least (its control file's)
        self.diverged = False  # ahead of the primary, so not on its history: out of reads (lag.py)
        self.judged = False  # shown to follow the current primary: tokens count on it (lag.py)
        self.board_slot: Any = None  # its board.Slot on the shared health board (board.py)
        self.board_seq = 0  # the slot's sequence number this process last applied
        self.board_epoch = 0  # the slot's outage counter this process last saw
        self.login_s = 0.0  # how long logins take here (a moving average), for the probe grace
        self.suspect = False  # down on indirect evidence only (a lost session): maybe a false alarm
        self.seen_down_at = 0.0  # the last news of a slow failure there: here, or on the board
        self.failed_fast = False  # its last failure came at once (refused, reset): cheap to retry
        self.keeping = False  # suspect on a missed deadline, its sessions kept until confirmed
        self.verify_from = self.verify_until = -1  # generations whose sessions are pinged
        #                                            before they are lent (``to_verify``)
        self.orphans: list[tuple] = []  # statements cut off, to cancel there: (server process
        #                                id, opened at, cut off at, our port: Endpoint.cut_off)
        self.errand: Any = None  # the Probe asking the server to cancel them (watchdog.py)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.checkouts = self.waits = self.timeouts = self.query_timeouts = 0
        self.connects = self.connect_errors = self.ejections = self.discards = 0

    @property
    def dsn(self) -> str:
        """The DSN for this endpoint's current role: read-write for the primary, else read-only."""
        return self.config.write_dsn if self.role == PRIMARY else self.config.read_dsn

    # -- slots (lock held in threaded mode) ----------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.slots) + len(self.pending)

    @property
    def connecting(self) -> int:
        return len(self.pending)

    @property
    def in_use(self) -> int:
        return len(self.slots) - len(self.idle)

    def reserve(self) -> Reservation:
        res = Reservation(self, next(_keys))
        self.pending[res.key] = self._ref(res, self.pending)
        return res

    def adopt(self, res: Reservation, rec: Any) -> None:
        """The reserved connection is open: its slot now belongs to ``rec``."""
        rec.key = res.key
        self.slots[res.key] = self._ref(rec, self.slots)
        self.pending.pop(res.key, None)

    def release(self, key: int) -> None:
        """Free a slot (idempotent: a slot freed twice is freed once)."""
        self.slots.pop(key, None)
        self.pending.pop(key, None)

    def connections(self) -> list[Any]:
        """Every open connection of this endpoint, idle or lent (for the watchdog and stats)."""
        return [r for r in map(_SlotRef.__call__, list(self.slots.values())) if r is not None]

    def being_set_up(self) -> list[Any]:
        """The sessions connected but not yet adopted (for the watchdog: ``configure()`` and the
        baseline run statements on them). ``adopt`` fills the slot before it empties ``pending``,
        so a scan that reads this before ``connections()`` misses no connection."""
        return [r.raw for r in map(_SlotRef.__call__, list(self.pending.values()))
                if r is not None and r.raw is not None]

    @staticmethod
    def _ref(holder: Any, table: dict) -> _SlotRef:
        ref = _SlotRef(holder, _free_slot)
        ref.key, ref.table = holder.key, table
        return ref

    # -- state ---------------------------------------------------------------------------------

    def _record(self, error: str) -> None:
        self.last_error = error
        self.last_error_at = time.time()

    def mark_down(self, now: float, error: str, probe_now: bool = False, fast: bool = False,
                  keep: bool = False) -> bool:
        """Eject the endpoint after a failure. Returns True if it was up (a new outage).

        ``probe_now``: the evidence is indirect (a session was lost or closed by the server, a
        statement timed out: the server may well be fine): probe at once instead of after the
        first backoff, and let requests wait a moment for that probe (``suspect``).
        ``fast``: the failure came within the probe grace (``saw_failure``). Indirect evidence is
        no news of that kind either way: the probe it calls for gives the verdict.
        ``keep``: a missed deadline; the sessions stay valid until the suspicion is confirmed.
        """
        self._record(error)
        self.saw_failure(now, fast or probe_now)
        if self.state in (DOWN, REFUSED):
            self.suspect = self.suspect and probe_now
            if not (keep and self.suspect):
                self.stop_keeping()
            return False
        self.state = DOWN
        self.suspect = probe_now
        self.keeping = keep and probe_now
        if not self.keeping:
            self.generation += 1
        self.down_since = now
        self.failures = 0
        self.ejections += 1
        self.retry_at = now if probe_now else now + backoff_delay(0, random.random())
        return True

    def mark_refused(self, now: float, error: str) -> bool:
        """The server refused us (credentials, database, pg_hba). True if this is news."""
        self._record(error)
        was = self.state
        self.stop_keeping()
        if was not in (DOWN, REFUSED):
            self.generation += 1
            self.down_since = now
            self.ejections += 1
        self.state = REFUSED
        self.suspect = False
        self.saw_failure(now, False)
        self.failures += 1
        self.retry_at = now + backoff_delay(self.failures, random.random(), REFUSED_BACKOFF_CAP)
        return was != REFUSED

    def probe_failed(self, now: float, error: str, fast: bool = False) -> None:
        """A probe got no answer, or a connection error: still down, try again later."""
        self._record(error)
        if self.state == REFUSED:  # the server no longer answers at all: an outage now
            self.state = DOWN
        self.suspect = False
        self.stop_keeping()
        self.saw_failure(now, fast)
        self.failures += 1
        self.retry_at = now + backoff_delay(self.failures, random.random())

    def next_probe_after(self, now: float) -> float:
        """When the next probe is due if the one starting now never answers (a stalled server,
        an unattended process-mode probe): the backoff that a failure would give."""
        cap = REFUSED_BACKOFF_CAP if self.state == REFUSED else BACKOFF_CAP
        return now + backoff_delay(self.failures + 1, random.random(), cap)

    def at_once(self, seconds: float) -> bool:
        """Did a failure after ``seconds`` come at once: within the probe grace?"""
        return seconds < self.grace

    def saw_failure(self, now: float, fast: bool) -> None:
        """A failure that came at once (connection refused, a reset: the host is there, the
        server not yet) costs a request waiting on the next probe milliseconds, so it does not
        make that probe unworthy of a wait: under load the first request after a restart then
        finds the server back. A slow one (a deadline spent: a black hole, a stall) does."""
        self.failed_fast = fast
        if not fast:
            self.seen_down_at = now

    def to_verify(self) -> None:
        """The sessions open now are to be pinged before they are lent: they were kept through
        a suspicion that a probe cleared on a new connection (``mark_up``), or another process
        saw an outage this one slept through (sharing.py). A new generation for those opened
        from now on; earlier rounds not yet pinged stay in the range, and any other change of
        generation (a failure, a role change) closes it: what is in it is stale then."""
        if self.verify_until != self.generation:
            self.verify_from = self.generation
        self.generation += 1
        self.verify_until = self.generation

    def verifying(self, rec: Any) -> bool:
        """Is ``rec`` a session to ping before it is lent (``to_verify``)?"""
        return self.verify_until == self.generation and \
            self.verify_from <= rec.generation < self.generation

    def stale(self, rec: Any) -> bool:
        """Was ``rec`` made before this endpoint's last failure (and is not a session kept
        through it, awaiting its ping)? Then it is closed, not lent."""
        return rec.generation != self.generation and not self.verifying(rec)

    def stop_keeping(self) -> None:
        """The suspicion on a missed deadline is confirmed (or other evidence came): the
        sessions kept meanwhile are as stale as after any other failure."""
        if self.keeping:
            self.keeping = False
            self.generation += 1

    def cut_off(self, raw: Any, now: float) -> None:
        """The watchdog ended a statement of ``raw`` on our side: once the endpoint is up, the
        server is asked to cancel it (watchdog.py). Not if its port is unknown."""
        if raw.client_port is not None:
            del self.orphans[:-15]  # (a bound: they are few, and each cancel request clears them)
            self.orphans.append((raw.backend_pid, raw.opened_at, now, raw.client_port))

    def mark_up(self) -> None:
        if self.keeping:
            # A probe answers on a new connection: it says nothing of the sessions kept (a
            # firewall or NAT may have forgotten them, silently). Each is pinged, within a
            # probe's grace, before it is lent again (Pool._is_usable).
            self.keeping = False
            self.to_verify()
        self.state = UP
        self.suspect = False
        self.failed_fast = False
        self.failures = 0
        self.retry_at = 0.0

    @property
    def grace(self) -> float:
        """Four logins as seen here; before any (an outage found on the board, or there at
        start), the most: a far server's logins must not look like an outage to a new worker."""
        if not self.login_s:
            return PROBE_GRACE_MAX
        return min(PROBE_GRACE_MAX, max(PROBE_GRACE, 4 * self.login_s))

    def cut_short(self, limit: float, own: float | None) -> bool:
        """Was a wait on this server bounded by ``limit`` cut short by a caller's deadline
        (``limit`` under the pool's ``own`` bound for it) sooner than a server that is fine
        answers (a probe's grace)? Then its silence is evidence of nothing."""
        return limit < self.grace and (own is None or limit < own)

    def logged_in(self, seconds: float) -> None:
        """A login (connect or probe) took ``seconds``: remember it, smoothed."""
        self.login_s = seconds if not self.login_s else 0.8 * self.login_s + 0.2 * seconds

    def worth_waiting(self, now: float) -> bool:
        """Is a probe starting now likely to bring good news? Yes if the endpoint is only
        suspect (a false alarm is likely), or if nobody saw it down for QUIET seconds."""
        return self.suspect or now - self.seen_down_at >= QUIET

    def awaiting_probe(self, now: float) -> bool:
        """Down, with a probe worth waiting for due, or running and not yet overdue."""
        if self.state not in (DOWN, REFUSED):
            return False
        probe = self.probe
        if probe is None:
            return self.retry_at <= now and self.worth_waiting(now)
        return probe.awaited and self.probe_left(probe) > 0

    def probe_left(self, probe: Any) -> float:
        """How much longer a request may wait for this probe; none left, and nobody waits for
        it any longer (it is overdue). The server's silence spends the grace (Probe.silence:
        time the prober was off the CPU does not count), and the time it was attended spends
        ``probe_wait`` however slowly the server answers (Probe.waited: not the clock, since a
        process-mode worker attends its probe only on requests, within their own timeouts)."""
        far = LOGINS_WAITED * self.login_s
        return min(max(self.grace, far) - probe.silence, self.probe_wait - probe.waited)

    @property
    def probe_wait(self) -> float:
        """The longest a request waits for a probe here: PROBE_GRACE_MAX, or LOGINS_WAITED
        logins as seen here where that is longer (a far server). Its own deadline, and the
        probe's (connect_timeout), come first."""
        return max(PROBE_GRACE_MAX, LOGINS_WAITED * self.login_s)

    @property
    def shown_state(self) -> str:
        """The state, or why an up replica is out of reads (lag.py)."""
        if self.state is not UP:
            return self.state
        return "diverged" if self.diverged else "lagging" if self.lagging else UP

    def describe(self, now: float) -> str:
        """One line for error messages: the state a reader needs to act on."""
        text = (f"{self.role} {self.name} {self.shown_state} size={self.size}/{self.max_size} "
                f"idle={len(self.idle)} in_use={self.in_use}")
        if self.state in (DOWN, REFUSED):
            text += f" down_for={now - self.down_since:.1f}s next_probe_in={max(0.0, self.retry_at - now):.1f}s"
        if self.last_error:
            text += f" last_error={self.last_error!r}"
        return text

    def stats(self, now: float) -> dict[str, Any]:
        down = self.state not in (UP, CONFLICT)
        return {
            "name": self.name, "role": self.role,
            "state": self.shown_state,
            "size": self.size, "idle": len(self.idle), "in_use": self.in_use,
            "connecting": self.connecting, "max_size": self.max_size,
            "checkouts": self.checkouts, "waits": self.waits, "timeouts": self.timeouts,
            "connects": self.connects, "connect_errors": self.connect_errors,
            "ejections": self.ejections, "discards": self.discards,
            "query_timeouts": self.query_timeouts,
            "down_for": round(now - self.down_since, 3) if down else None,
            "next_probe_in": round(max(0.0, self.retry_at - now), 3) if down else None,
            "last_error": self.last_error,
            "last_error_at": round(self.last_error_at, 3) if self.last_error_at else None,
            "lag_s": None if self.lag_s is None else round(self.lag_s, 3),
            "lag_bytes": self.lag_bytes,
            "timeline": self.timeline,
        }
