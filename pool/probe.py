"""A non-blocking connection attempt that tells whether a down endpoint is back.

Probes use libpq's asynchronous connect (``psycopg2.connect(async_=True)``) and are advanced with
``step()``, which never blocks. That lets one mechanism serve both modes: the threaded pool's
housekeeping thread steps probes, and a process-mode pool steps them on checkout and return, so a
request never waits on a dead server's connect timeout. The probe uses the endpoint's own DSN, so
for the primary libpq also checks that the server accepts writes.
"""

from __future__ import annotations

import select
from typing import Any, Sequence

import psycopg2
import psycopg2.extensions as ext

from .connection import abandon, describe_error

PENDING, OK, FAILED = "pending", "ok", "failed"


class Probe:
    __slots__ = ("started", "deadline", "status", "error", "_conn", "_wants")

    def __init__(self, dsn: str, now: float, timeout: float) -> None:
        self.started = now
        self.deadline = now + timeout
        self.status = PENDING
        self.error: str | None = None
        self._conn: Any = None
        self._wants = ext.POLL_WRITE
        try:
            # libpq resolves the host name here, synchronously; the rest is non-blocking.
            self._conn = psycopg2.connect(dsn, async_=True)
        except psycopg2.Error as exc:
            self._finish(FAILED, describe_error(exc))

    def step(self, now: float) -> str:
        """Advance the handshake as far as it goes without waiting; return the status."""
        while self.status == PENDING:
            conn = self._conn  # close() may cancel the probe from another thread meanwhile
            if conn is None:
                break
            try:
                state = conn.poll()
            except psycopg2.Error as exc:
                self._finish(FAILED, describe_error(exc))
                break
            if state == ext.POLL_OK:
                self._finish(OK, None)
            elif now >= self.deadline:
                self._finish(FAILED, "no answer within the connect timeout")
            elif not self._ready(state):
                self._wants = state
                break
        return self.status

    def _ready(self, state: int) -> bool:
        conn = self._conn
        if conn is None:
            return False
        fd = conn.fileno()
        r, w, _ = select.select([fd] if state == ext.POLL_READ else [],
                                [fd] if state == ext.POLL_WRITE else [], [], 0)
        return bool(r or w)

    def fileno_and_events(self) -> tuple[int, bool]:
        """The socket and whether the probe waits to read (True) or to write (False)."""
        return self._conn.fileno(), self._wants == ext.POLL_READ

    def abandon(self) -> None:
        """After fork(): drop the parent's half-open probe without writing to its socket."""
        if self._conn is not None:
            abandon(self._conn)
            self._conn = None
        self.status, self.error = FAILED, "abandoned after fork"

    def cancel(self) -> None:
        if self.status == PENDING:
            self._finish(FAILED, "cancelled")

    def _finish(self, status: str, error: str | None) -> None:
        self.status, self.error = status, error
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None


def wait_any(probes: Sequence[Probe], timeout: float) -> None:
    """Sleep until one of the pending probes' sockets is ready, or for at most `timeout`."""
    reads, writes = [], []
    for p in probes:
        if p.status == PENDING and p._conn is not None:
            fd, wants_read = p.fileno_and_events()
            (reads if wants_read else writes).append(fd)
    if reads or writes:
        select.select(reads, writes, [], max(0.0, timeout))


def wait_for(probes: Sequence[Probe], clock: Any, until: float = float("inf")) -> None:
    """Block until every probe has finished or passed its deadline, or until `until`."""
    while True:
        now = clock()
        pending = [p for p in probes if p.step(now) == PENDING]
        if not pending or now >= until:
            return
        wait_any(pending, min(min(p.deadline for p in pending), until, now + 0.05) - now)
