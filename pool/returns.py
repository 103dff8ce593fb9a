"""The return path: how a loan ends when it is not the plain case.

Mixed into Pool. ``Pool._checkin`` gives back a connection whose loan made no cursor and changed no
setting in a few nanoseconds; everything else comes here. A loan ends by the server's account of
its transaction (``raw.info.transaction_status``), not psycopg2's: commit on a normal exit, roll
back on an error or for a read-only loan, and say so when a swallowed error or a write in a
read-only block means nothing was committed. Then the session is reset (session.py) and the
connection goes back, or, if it is broken or in a state the pool cannot vouch for, is discarded,
and if its session was lost its endpoint is ejected (health.py).

Asynchronous exceptions: once a connection has been handed to ``_put`` it may be the pool's (or a
waiter's), so no handler here touches it after that point; an interrupt before the hand-over
leaves it to the slot's weak reference (endpoint.py).
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from .config import DEFAULT as _DEFAULT
from .config import PRIMARY
from .connection import (CLOSED_IN_TX, RAN, READ_ONLY_SET, SETTING, WIPED, PooledConnection,
                         describe_error, is_disconnect)
from .endpoint import Reservation
from .errors import EndpointUnavailable, PoolError, QueryTimeout
from .session import (commit, get_autocommit, make_read_only, own_statement, reset_server,
                      rollback, set_autocommit, timed_call, within)

log = logging.getLogger("pool")

_TX_IDLE = ext.TRANSACTION_STATUS_IDLE
_TX_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_TX_INERROR = ext.TRANSACTION_STATUS_INERROR
_STATUS_BEGIN = ext.STATUS_BEGIN
_STATUS_PREPARED = ext.STATUS_PREPARED


class _Broken(Exception):
    """Internal: the connection cannot go back to the pool."""


def _empty(raw: Any, name: str) -> None:
    """Empty psycopg2's notices or notifies: a list, or what the borrower put there instead
    (psycopg2 suggests a deque with a maxlen); anything without clear() becomes a list again."""
    box = getattr(raw, name)
    if hasattr(box, "clear"):
        box.clear()
    else:
        setattr(raw, name, [])



class Returns:
    """Mixed into Pool: the return path, and preparing a loan that is not the plain case."""

    def _checkin_slow(self, rec: PooledConnection, exc: BaseException | None,
                      readonly: bool = False) -> None:
        """End the transaction by the server's account of it (commit on success, rollback on
        error or for a read-only loan), reset the session and give the connection back, or
        discard it if it is broken or in a state the pool cannot vouch for."""
        raw = rec.raw
        if rec.pid != self._pid:  # lent before a fork(): the parent's, and not counted here
            rec.abandon()
            return
        refused = exc is not None and not readonly and getattr(exc, "pgcode", None) == "25006" \
            and rec.endpoint is self._primary  # read_only_sql_transaction (see _refused_write)
        try:
            error = self._end_transaction(rec, exc, readonly)  # under the block's query_timeout
        except BaseException:
            self._discard(rec)
            raise
        try:
            raw.query_timeout = self.options.query_timeout  # the pool's, for what the pool sends
            if raw.closed or raw.info.transaction_status != _TX_IDLE:
                raise _Broken
            if refused:
                self._refused_write(rec)
                raise _Broken  # a SET of the borrower's may be why it refused: a fresh session
            dirty, raw.dirty = raw.dirty, 0
            if dirty & SETTING and get_autocommit(raw):  # the borrower's own autocommit: what a
                dirty |= RAN  # cursor made from psycopg2's class ran under it left no trace
            raw.read_only_loan = False
            rec.baseline.restore_client(raw)
            if dirty & WIPED and not self.options.reset_session:
                raise _Broken  # the session the user kept state in is gone: a fresh one
            if dirty & RAN and self.options.reset_session:
                reset_server(raw, rec.baseline)
            elif dirty & READ_ONLY_SET:  # no reset wanted, but the pool's own SET must go
                reset_server(raw, None)
            rec.maybe_autocommit = False  # restore_client and reset_server leave it off
            _empty(raw, "notifies")  # what a LISTEN in the block received (the reset ended it)
            if self.options.reset is not None:
                self.options.reset(raw)
                rec.maybe_autocommit = True  # the hook may have switched it on: a block looks
                if raw.info.transaction_status != _TX_IDLE:
                    raise _Broken
            _empty(raw, "notices")  # the block's, and what the reset said under its settings
            raw.dirty = 0
            if rec.endpoint.stale(rec):
                raise _Broken  # made before its endpoint's last failure
        except (_Broken, psycopg2.Error, QueryTimeout) as e:  # (QueryTimeout: the reset= hook's)
            self._discard(rec, cause=error or exc or (None if isinstance(e, _Broken) else e))
        except BaseException:  # the reset hook's own error, or an interrupt: the caller's
            self._discard(rec)
            raise
        else:
            # Outside the try: once _put has begun, the connection may be the pool's (or a
            # waiter's) and no handler here may touch it. An interrupt inside _put before the
            # hand-over leaves it to the slot's weak reference.
            if not self._put(rec):
                self._discard(rec)  # the pool was closed meanwhile
        if error is not None:
            raise error

    def _refused_write(self, rec: PooledConnection) -> None:
        """A write on the primary was refused with SQLSTATE 25006 (read_only_sql_transaction):
        the node was demoted (in recovery now, or read-only by its configuration), or the
        borrower asked for a read-only transaction (``set_session(readonly=True)``, ``SET
        TRANSACTION READ ONLY``, a session ``SET``). The server, asked on that session, tells
        which: one round trip, on this path only. Only a demotion is news for every caller
        (and every process); taken for one, a borrower's own read-only transaction had each such
        loan close every session to the primary."""
        if rec.raw.server_read_only():
            self._demoted(rec.endpoint, "refused a write: the server is read-only (demoted?)")

    def _end_transaction(self, rec: PooledConnection, exc: BaseException | None,
                         readonly: bool) -> BaseException | None:
        """Close whatever transaction the server says is open; return the error for the caller.

        psycopg2's own status is not enough: a block that set autocommit and ran BEGIN has a
        transaction psycopg2 does not know about, and its work must not be dropped silently.
        """
        raw = rec.raw
        if raw.closed:
            if raw.closed == 2 and exc is None:
                ep = rec.endpoint
                if raw.timed_out:
                    return raw.timeout_error()
                return EndpointUnavailable(
                    f"{ep.role} {ep.name}: the connection was lost inside the block; work not "
                    f"yet committed was lost", ep.name)
            if raw.dirty & CLOSED_IN_TX and exc is None and not readonly:
                return PoolError(f"{raw.label}: the block closed the connection with its "
                                 f"transaction open, which had written, had failed (an error "
                                 f"was caught and ignored) or did not answer whether it had "
                                 f"written; that work was not committed")
            return None
        if raw.two_phase:  # psycopg2 refuses commit() and rollback() there
            return self._end_two_phase(raw, exc)
        tx = raw.info.transaction_status
        ours = raw.status == _STATUS_BEGIN  # psycopg2 opened it, and will close it
        if tx == _TX_IDLE and not ours:
            return None
        error: BaseException | None = None
        try:
            if exc is not None or tx == _TX_INERROR:
                if exc is None:
                    error = PoolError(f"{raw.label}: the transaction had failed inside the block "
                                      f"(an error was caught and ignored), so it was rolled back, "
                                      f"not committed")
                self._finish(raw, ours, "ROLLBACK")
            elif readonly:
                if rec.endpoint.role == PRIMARY:  # only a primary could have taken a write
                    error = self._readonly_violation(raw)
                self._finish(raw, ours, "ROLLBACK")
            elif tx == _TX_INTRANS or ours:  # (ours, the server idle: SQL ended it; tell psycopg2)
                self._finish(raw, ours, "COMMIT")
        except (psycopg2.Error, QueryTimeout) as e:
            if exc is None and error is None:  # a failed commit must reach the caller; a failed
                # rollback must not hide the caller's own exception
                error = e
        return error

    @staticmethod
    def _end_two_phase(raw: Any, exc: BaseException | None) -> BaseException | None:
        """A two-phase transaction the block neither committed nor rolled back, ended as the
        protocol wants: one not yet prepared is rolled back, and the caller told; a prepared
        one stays on the server for its transaction manager (``tpc_recover()``), and psycopg2's
        reset(), the one call that forgets it without finishing it, makes the connection
        usable again (its DISCARD ALL: ``WIPED``)."""
        prepared = raw.status == _STATUS_PREPARED
        try:
            if prepared:
                raw.reset()
            else:
                raw.tpc_rollback()
        except (psycopg2.Error, QueryTimeout) as e:
            return e if exc is None else None  # never hide the caller's own exception
        if prepared or exc is not None:
            return None
        return PoolError(f"{raw.label}: the block left a two-phase transaction open (tpc_begin() "
                         f"with no tpc_commit() or tpc_rollback()); it was rolled back, not "
                         f"committed")

    @staticmethod
    def _finish(raw: Any, ours: bool, command: str) -> None:
        if ours:  # (psycopg2's own, timed: the connection's mark the loan for a reset)
            timed_call(raw, commit if command == "COMMIT" else rollback, raw)
        else:  # a BEGIN psycopg2 never saw (autocommit was on): end it in SQL
            own_statement(raw, command)

    @staticmethod
    def _readonly_violation(raw: Any) -> BaseException | None:
        """A read-only loan on the primary (the fallback) ends with a transaction open: did it
        write, by SQL of its own (BEGIN READ WRITE, SET transaction_read_only)? One round trip,
        on the fallback only; the write is rolled back and the caller told."""
        if raw.wrote():
            return PoolError(f"{raw.label}: a readonly=True block wrote on the primary (it made "
                             f"its transaction read-write); the transaction was rolled back, not "
                             f"committed")
        return None

    def _give_back(self, rec: Any) -> None:
        """An interrupted checkout or wait holds a connection, a slot or a place in line nobody
        will use: return it (a connection goes back only if it is clean, else it is closed)."""
        if rec.__class__ is Reservation:
            self._release(rec)
        elif rec.__class__ is not PooledConnection:
            self._leave(rec)  # a place in line (threaded mode)
        elif rec.pid == self._pid and not rec.raw.dirty and not rec.raw.closed \
                and rec.raw.info.transaction_status == _TX_IDLE and self._put(rec):
            return
        else:
            self._discard(rec)

    def _release(self, res: Reservation) -> None:
        with self._lock:
            res.endpoint.release(res.key)
            self._serve_waiters()

    def _discard(self, rec: PooledConnection, cause: BaseException | None = None) -> None:
        """Drop a connection for good; if its session was lost, eject its endpoint too."""
        ep = rec.endpoint
        with self._lock:
            ep.release(rec.key)
            ep.discards += 1
            self._serve_waiters()
        rec.close()
        if cause is not None and is_disconnect(cause, rec.raw):
            if rec.raw.timed_out:  # no answer for that long: evidence for every process
                self._missed_deadline(ep, rec.raw, "a statement")
            else:  # one lost session is only a hint: probe at once, share the probe's result
                self._eject(ep, f"connection lost: {self._redact(describe_error(cause))}",
                            probe_now=True, share=False)

    def _lend(self, rec: PooledConnection, readonly: bool, query_timeout: Any,
              timeout: float) -> Any:
        """Prepare a connection for a ``with`` block: autocommit off (a block is one transaction),
        its own statement deadline if it has one. A read-only block on the primary (the
        fallback) makes the whole session read-only, so that switching psycopg2's settings
        (autocommit, readonly) inside the block cannot make it write. On failure the connection
        goes back by the slow path (or is dropped) before the error reaches the caller.

        That SET is part of the checkout: bounded by what is left of its ``timeout`` too (a
        stalled primary held a read with timeout=0.1 for query_timeout). Unanswered within it,
        the primary is ejected as for a ping; cut short sooner than a probe's grace, it proves
        nothing (PoolTimeout). A session lost meanwhile says so (EndpointUnavailable)."""
        raw = rec.raw
        ep = rec.endpoint
        own = limit = raw.query_timeout
        try:
            if rec.maybe_autocommit:  # fetchone & co leave it on (statements.py); a block is a
                if raw.autocommit:    # transaction
                    set_autocommit(raw, False)
                rec.maybe_autocommit = False
            if readonly and ep.role == PRIMARY:
                raw.dirty |= READ_ONLY_SET  # the SET below is undone on return
                raw.read_only_loan = True  # and psycopg2's read-only flag stays on (connection.py)
                with within(raw, rec.deadline(timeout) - monotonic()) as limit:
                    make_read_only(raw)  # (if the SET fails, the return path sets autocommit back)
        except BaseException as exc:
            if not isinstance(exc, Exception) or not is_disconnect(exc, raw):
                self._checkin_slow(rec, exc)  # (an interrupt, say, is the caller's to see)
                raise
            if raw.timed_out and ep.cut_short(limit, own):  # the caller's time ran out first
                self._discard(rec)
                self._deadline_spent(f"making a session of {ep.role} {ep.name} read-only")
            self._checkin_slow(rec, exc)  # evidence: ejected, or probed at once
            what = f"no answer within {limit:g}s to" if raw.timed_out else "the session was lost in"
            raise EndpointUnavailable(
                f"{ep.role} {ep.name}: {what} the pool's read-only SET for a read that fell back "
                f"to it; probing it ({self._redact(describe_error(exc))})", ep.name) from exc
        if query_timeout is not _DEFAULT:  # the block's own, from here on (not for the SET above)
            raw.query_timeout = query_timeout
            raw.dirty |= SETTING  # restored on return
        return raw

