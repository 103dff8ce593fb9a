"""A non-blocking connection attempt (and, optionally, one query) that says whether a server is
back, and what it is.

Probes use libpq's asynchronous connect (``psycopg2.connect(async_=True)``), after a host name
lookup with a deadline of its own (resolve.py), and are advanced with ``step()``, which never
blocks. That lets one mechanism serve both modes: the threaded pool's
housekeeping thread steps probes, and a process-mode pool steps them on checkout, so a request
never waits on a dead server's connect timeout. The probe uses the endpoint's own DSN, so for
the primary libpq also checks that the server accepts writes.

A probe fails only on evidence: the server refused or reset the attempt, or the probe's deadline
passed *while someone was waiting on it*. Time counts towards the deadline only between steps
that are close together (``ATTENDED``): a process-mode worker that steps its probe at one request
and next at another ten seconds later has not waited ten seconds for the server, and must not
declare a healthy server dead for it.

A probe's grace (how long a request waits for it, ``Endpoint.grace``) is spent by the server's
silence, not by the clock (``silence``). The housekeeping thread steps a pending probe every
10 ms; when a step comes later than ``PROMPT`` and finds the server's answer already waiting, the
prober was off the CPU (request threads holding the GIL, a loaded machine) and the gap counts as
``PROMPT`` only: a server that answered must not fail the request that waits for it. A gap after
which nothing has arrived counts in full, so a stalled server still spends the grace on time.
"""

from __future__ import annotations

import select
from typing import Any, Callable, Sequence

import psycopg2
import psycopg2.extensions as ext

from .connection import abandon, connect_failure, describe_error
from .resolve import STEP, Resolution

PENDING, OK, FAILED, REFUSED, STANDBY = "pending", "ok", "failed", "refused", "standby"
ATTENDED = 0.1  # steps further apart than this count as this much waiting, no more
PROMPT = 0.02  # a step later than this (two housekeeping steps) that finds the answer waiting
#                counts as this much of the server's silence: the rest was the prober's delay


class Probe:
    __slots__ = ("started", "timeout", "waited", "silence", "stepped", "status", "error", "rows",
                 "awaited", "leased", "_conn", "_wants", "_query", "_cur", "_dsn", "_resolution")

    def __init__(self, dsn: str, now: float, timeout: float,
                 query: str | Callable[[], str] | None = None,
                 params: dict[str, str] | None = None) -> None:
        """``query``, if any, is sent once connected (a callable: built then, not now).
        ``params``: the host's addresses if the caller looked them up already (resolve.py)."""
        self.started = self.stepped = now
        self.timeout = timeout
        self.waited = self.silence = 0.0  # seconds, towards the deadline and towards the grace
        self.status = PENDING
        self.error: str | None = None
        self.rows: list[tuple] | None = None
        self.awaited = True  # may a request wait for its verdict? (Endpoint.worth_waiting)
        self.leased = True  # started under the board's probe lease (or with no board at all)
        self._conn: Any = None
        self._cur: Any = None
        self._query = query
        self._wants = ext.POLL_WRITE
        self._dsn = dsn
        self._resolution: Resolution | None = None
        if params is None:
            self._resolution = Resolution(dsn, now, timeout)
            # A lookup that answers within a few ms (a local or cluster resolver usually does)
            # lets the connect start now: in process mode the next step may be a request away.
            self._resolution.wait(STEP)
        self._connect(now, params)

    def _connect(self, now: float, params: dict[str, str] | None = None) -> None:
        """Start the connect once the host name is resolved (or has waited long enough)."""
        resolution = self._resolution
        if resolution is not None:
            if not resolution.settled(now):
                return
            self._resolution = None
        elif params is None:  # (close() cancelled it from another thread meanwhile)
            return
        try:
            conn = psycopg2.connect(self._dsn, async_=True,
                                    **(params if resolution is None else resolution.params()))
        except psycopg2.Error as exc:
            self._fail(exc)
            return
        self._conn = conn
        if self.status != PENDING:  # cancelled by close() from another thread meanwhile
            self._finish(self.status, self.error)

    def step(self, now: float) -> str:
        """Advance the handshake (and the query) as far as it goes without waiting. A finished
        probe stays as it finished: ``waited`` is then how long its login took (wait_for steps
        every probe until the slowest is done)."""
        if self.status != PENDING:
            return self.status
        gap = max(0.0, now - self.stepped)
        self.waited += min(gap, ATTENDED)
        if self._resolution is None:  # (a name server's silence is not the server's)
            late = gap > PROMPT and self._ready(self._wants)
            self.silence += PROMPT if late else gap
        self.stepped = now
        while self.status == PENDING:
            conn = self._conn  # close() may cancel the probe from another thread meanwhile
            if conn is None:
                if self._resolution is None:
                    break
                self._connect(now)  # (still looking its host up: nothing to poll yet)
                if self._conn is None:
                    break
                continue
            try:
                state = conn.poll()
            except psycopg2.Error as exc:
                self._fail(exc)
                break
            if state == ext.POLL_OK:
                try:
                    if not self._next_phase(conn):
                        break
                except psycopg2.Error as exc:
                    self._fail(exc)
                    break
            elif self.waited >= self.timeout:
                self._finish(FAILED, f"no answer within {round(self.timeout, 2) or self.timeout:g}s")
            elif not self._ready(state):
                self._wants = state
                break
        return self.status

    def _next_phase(self, conn: Any) -> bool:
        """Connected, or the query answered: send the query, or finish. True to keep polling."""
        if self._query is None:
            self._finish(OK, None)
            return False
        if self._cur is None:
            cur = conn.cursor()
            query = self._query
            cur.execute(query() if callable(query) else query)
            self._cur = cur  # only once sent: a step cut short before sends it again
            return True
        self.rows = self._cur.fetchall()
        self._finish(OK, None)
        return False

    def _ready(self, state: int) -> bool:
        """Is the socket ready for what the handshake waits on? True also when the connection
        went away meanwhile (close() from another thread): the next poll() says what happened."""
        conn = self._conn
        if conn is None:
            return False
        try:
            fd = conn.fileno()
            r, w, _ = select.select([fd] if state == ext.POLL_READ else [],
                                    [fd] if state == ext.POLL_WRITE else [], [], 0)
        except (psycopg2.Error, OSError, ValueError):
            return True
        return bool(r or w)

    def fileno_and_events(self) -> tuple[int, bool]:
        """The socket and whether the probe waits to read (True) or to write (False)."""
        return self._conn.fileno(), self._wants == ext.POLL_READ

    @property
    def reason(self) -> str | None:
        """The error without its class name (to raise it again as one)."""
        error = self.error
        return error.split(": ", 1)[1] if error and error.startswith("OperationalError: ") else error

    @property
    def remaining(self) -> float:
        return max(0.0, self.timeout - self.waited)

    def abandon(self) -> None:
        """After fork(): drop the parent's half-open probe without writing to its socket."""
        if self._conn is not None:
            abandon(self._conn)
            self._conn = None
        self.status, self.error = FAILED, "abandoned after fork"

    def cancel(self) -> None:
        if self.status == PENDING:
            self._finish(FAILED, "cancelled")

    def _fail(self, exc: BaseException) -> None:
        text = describe_error(exc)
        kind = connect_failure(text)
        self._finish(REFUSED if kind == "refused" else STANDBY if kind == "standby" else FAILED, text)

    def _finish(self, status: str, error: str | None) -> None:
        self.status, self.error = status, error
        self._resolution = None
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None
            self._cur = None


class Monitor(Probe):
    """A probe that keeps its connection once it answered, to ask the same query again later
    (about once a second: see monitor.py). ``ask()`` is False when the connection is gone and a
    new Monitor is needed."""

    __slots__ = ()

    def ask(self, now: float) -> bool:
        if self._conn is None or self.status == PENDING:
            return False
        self.status, self.error, self.rows, self._cur = PENDING, None, None, None
        self.started = self.stepped = now
        self.waited = self.silence = 0.0
        return True

    def close(self) -> None:
        Probe._finish(self, FAILED, "closed")

    def _finish(self, status: str, error: str | None) -> None:
        if status == OK:  # keep the connection for the next question
            self.status, self.error, self._cur = OK, None, None
        else:
            Probe._finish(self, status, error)


def wait_any(probes: Sequence[Probe], timeout: float) -> None:
    """Sleep until one of the pending probes' sockets is ready, or for at most `timeout` (a
    probe still looking its host up has no socket: then for a few ms at a time)."""
    reads, writes = [], []
    resolving = None
    for p in probes:
        if p.status == PENDING and p._conn is not None:
            fd, wants_read = p.fileno_and_events()
            (reads if wants_read else writes).append(fd)
        elif p.status == PENDING and p._resolution is not None:
            resolving = p._resolution
    if reads or writes:
        select.select(reads, writes, [], max(0.0, min(timeout, STEP if resolving else ATTENDED)))
    elif resolving is not None:
        resolving.wait(max(0.0, min(timeout, ATTENDED)))  # (wakes as its lookup answers)


def wait_for(probes: Sequence[Probe], clock: Any, until: float = float("inf")) -> None:
    """Block until every probe has finished or passed its deadline, or until `until`."""
    while True:
        now = clock()
        pending = [p for p in probes if p.step(now) == PENDING]
        if not pending or now >= until:
            return
        wait_any(pending, min(min(p.remaining for p in pending), until - now, 0.05))
