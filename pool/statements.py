"""The one-statement helpers: ``fetchone``, ``fetchall``, ``execute`` and reads after a token.

Mixed into Pool. A single statement needs no BEGIN/COMMIT round trips: it runs in autocommit on
the pool's own cursor (reused, so a session's state cannot leak from the borrower's cursors),
which PostgreSQL executes as one implicit transaction; replicas' sessions are read-only by
default, and a read that falls back to the primary runs in BEGIN READ ONLY. A read whose
connection is lost (or whose statement passes ``query_timeout``) is retried once elsewhere; a
write never is. ``_checkout_after`` is read-your-writes (lag.py).

The connection is left in autocommit afterwards, so a run of these calls switches it once, not
twice a call: psycopg2's switch is cheap on the wire (it sends nothing) but not in the process,
since each one lets go of the GIL twice, and under load every letting go can hand the GIL to
another thread and cost two context switches. A ``with pool.connection()`` block switches
autocommit back off when it borrows such a connection (core.py, ``Checkout``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from . import lag
from .config import PRIMARY
from .connection import PooledConnection, describe_error, is_disconnect
from .errors import EndpointUnavailable
from .session import base_cursor, set_autocommit, set_readonly

if TYPE_CHECKING:
    from .core import Pool

log = logging.getLogger("pool")
monotonic = time.monotonic


class Statements:
    """Mixed into Pool: running one statement, retried once if it was a read."""

    def _run(self: "Pool", sql: str, params: Any, readonly: bool, fetch: Callable[[Any], Any],
             after: int | None = None) -> Any:
        """Run one statement in its own transaction; retry a read once if its endpoint is lost.

        A single statement needs no BEGIN/COMMIT round trips: it runs in autocommit, which
        PostgreSQL executes as one implicit transaction. Replicas' sessions are read-only by
        default; a read that falls back to the primary runs in BEGIN READ ONLY instead.
        """
        try:
            return self._run_attempts(sql, params, readonly, fetch, after)
        except BaseException:
            self._local.endpoint = None  # a failed call: last_endpoint must not name an older one
            raise

    def _run_attempts(self: "Pool", sql: str, params: Any, readonly: bool, fetch: Callable[[Any], Any],
                      after: int | None) -> Any:
        attempts = 2 if readonly else 1
        for attempt in range(attempts):
            rec = self._checkout(readonly, None) if after is None else self._checkout_after(after)
            raw = rec.raw
            fallback = readonly and rec.endpoint.role == PRIMARY
            try:
                if fallback:  # BEGIN READ ONLY: a transaction, so autocommit must be off
                    if raw.autocommit:
                        set_autocommit(raw, False)
                    set_readonly(raw, True)
                elif not raw.autocommit:  # off only after a block or a reset: on, and it stays on
                    rec.maybe_autocommit = True  # first: an interrupt in between errs safe
                    set_autocommit(raw, True)
                raw.busy_since = rec.last_used  # the watchdog's clock for this statement
                cur = rec.cursor or rec.new_cursor()  # the pool's own, reused: not the borrower's
                cur.execute(sql, params)
                result = fetch(cur)
                if cur.rowcount > 100:  # don't keep a large result alive on an idle connection
                    rec.drop_cursor()
                if fallback:
                    raw.commit()
                    set_readonly(raw, None)
                raw.busy_since = 0.0
            except BaseException as exc:
                raw.busy_since = 0.0
                lost = is_disconnect(exc, raw)
                self._checkin_slow(rec, exc, readonly)
                if not lost:
                    raise
                ep = rec.endpoint
                if attempt + 1 < attempts:
                    log.info("read on %s %s lost its connection; retrying elsewhere", ep.role, ep.name)
                    continue
                if raw.timed_out:
                    raise raw.timeout_error() from exc
                raise EndpointUnavailable(
                    f"{ep.role} {ep.name}: connection lost during the statement "
                    f"({self._redact(describe_error(exc))})" + ("" if readonly else
                                                                "; it may or may not have been applied"),
                    ep.name) from exc
            self._checkin(rec, None)
            return result
        raise AssertionError("unreachable")

    def _checkout_after(self: "Pool", lsn: int) -> PooledConnection:
        """A read that must see every write up to ``lsn`` (read-your-writes, lag.py): a replica
        known to have replayed it; else the balanced choice, asked (one round trip) and asked
        again for up to AFTER_WAIT; else the primary, which has every write."""
        known = tuple(ep for ep in self._readable if (ep.replay_lsn or 0) >= lsn)
        rec = self._checkout(True, None, known or None)
        ep = rec.endpoint
        if ep.role == PRIMARY or (ep.replay_lsn or 0) >= lsn:
            return rec
        deadline = monotonic() + lag.AFTER_WAIT
        try:
            while True:
                replay = self._replay_position(rec)
                if replay is not None and replay >= lsn:
                    return rec
                if monotonic() >= deadline:
                    break
                time.sleep(lag.AFTER_POLL)
        except BaseException as exc:
            self._checkin_slow(rec, exc, True)
            if not is_disconnect(exc, rec.raw):
                raise
        else:
            self._checkin(rec, None, True)
        return self._checkout(False, None)  # lent for a read: _run and Checkout keep it read-only

    @staticmethod
    def _replay_position(rec: PooledConnection) -> int | None:
        raw = rec.raw
        if not raw.autocommit:  # left on: whoever uses the connection next sets what it needs
            rec.maybe_autocommit = True
            set_autocommit(raw, True)
        raw.busy_since = monotonic()
        cur = base_cursor(raw)
        try:
            cur.execute("SELECT pg_last_wal_replay_lsn()::text")
            replay = lag.parse_lsn(cur.fetchone()[0])
        finally:
            cur.close()
            raw.busy_since = 0.0
        ep = rec.endpoint
        if replay is not None and replay > (ep.replay_lsn or 0):
            ep.replay_lsn = replay  # what the next read with a token can count on
        return replay


def _fetchone(cur: Any) -> Any:
    return cur.fetchone()


def _fetchall(cur: Any) -> Any:
    return cur.fetchall()


def _rowcount(cur: Any) -> int:
    return cur.rowcount


