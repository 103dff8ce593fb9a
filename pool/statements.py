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
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import psycopg2.errors

from . import lag
from .config import PRIMARY
from .connection import PooledConnection, describe_error, is_disconnect
from .errors import EndpointUnavailable, PoolError
from .session import commit, own_statement, set_autocommit, set_readonly, within

if TYPE_CHECKING:
    from .core import Pool

log = logging.getLogger("pool")
monotonic = time.monotonic


class Statements:
    """Mixed into Pool: running one statement, retried once if it was a read."""

    def _run(self: "Pool", sql: str, params: Any, readonly: bool, fetch: Callable[[Any], Any],
             after: tuple | None = None) -> Any:
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
                      after: tuple | None) -> Any:
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
                    commit(raw)  # psycopg2's: ours marks the loan (still timed: busy_since)
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

    def _checkout_after(self: "Pool", token: tuple, timeout: float | None = None) -> PooledConnection:
        """A read that must see every write up to a token's position (read-your-writes, lag.py).

        A replica known to have replayed it, if one has room; else the balanced choice is
        asked (a round trip), and if it is behind, the others in turn: first one the monitor has
        seen replay it, then each not asked yet, then the most advanced one asked, again, with a
        growing pause, for up to AFTER_WAIT. A replica that lags (replay paused, a long query
        holding it back) so never holds the read back while another has the write within
        milliseconds, and a read asks each replica about once. Then the primary, which has every
        write: to get there fast, a move goes only to a replica with an idle connection (never a
        connect or a wait), and a replica lost while being asked ends the asking. With
        ``read_fallback=False`` there is no primary: the replicas are asked until the timeout
        (surveyed again every ``RESURVEY`` s, connecting or waiting if need be, and past a lost
        one), then ``PoolTimeout``. Every checkout here gets what is left of one timeout.

        Histories (lag.py): only a replica the monitor has compared with the current primary
        counts (``_judged``); until one has, the read goes to the primary. With no primary up,
        a replica is asked its timeline too, and counts if it is the token's or a later one. A
        token from a newer timeline than the primary's waits first for the pool to see that
        promotion (``_await_timeline``): its replicas and its primary are of an older history."""
        start = monotonic()
        end = start + (self.options.timeout if timeout is None else timeout)
        rec = self._seek_after(token, start, end)
        rec.lent_by = (rec.last_used, end)  # (for _lend: PooledConnection.deadline)
        return rec

    def _seek_after(self: "Pool", token: tuple, start: float, end: float) -> PooledConnection:
        """_checkout_after's search, started at ``start``, with a deadline at ``end``."""
        lsn, timeline = token
        if timeline is not None and self._monitoring:
            self._await_timeline(lsn, timeline, start, end)
        fallback = self.options.read_fallback
        current = self._primary.timeline if self._primary is not None else None
        if timeline is not None and current is not None and current < timeline:
            judged = _never  # judged against a primary of an older history (it changed since)
        else:
            judged = self._judged
        if fallback and self._writable and self._readable and not any(map(judged, self._readable)):
            try:  # no replica compared with this primary yet
                return self._checkout(False, max(0.0, end - monotonic()))
            except EndpointUnavailable:
                if self._writable:
                    raise  # (else it was down after all: the replicas are asked, below)
        roomy = tuple(ep for ep in self._readable if self._askable(ep)
                      and (ep.idle or ep.size < ep.max_size))  # a preference, not a wait
        known = tuple(ep for ep in roomy if judged(ep) and (ep.replay_lsn or 0) >= lsn)
        rec = self._checkout(True, max(0.0, end - monotonic()), known or roomy or None)
        ep = rec.endpoint
        if ep.role == PRIMARY or judged(ep) and (ep.replay_lsn or 0) >= lsn:
            return rec
        deadline = monotonic() + lag.AFTER_WAIT if fallback else end
        asked: dict[Any, int] = {}  # endpoint -> the replay position it answered, this survey
        settled, pause, surveyed = False, lag.AFTER_POLL, start
        try:
            while True:
                if rec is None:  # (no read_fallback) the one asked was lost: any other
                    if monotonic() >= end:
                        break
                    rec = self._checkout(True, max(0.0, end - monotonic()))
                limit = end - monotonic()  # (the checkout's: see _replay_position)
                try:
                    if judged(rec.endpoint):
                        replay, _ = self._replay_position(rec, limit)
                    else:  # no primary to compare it with (else _askable left it out)
                        replay, floor = self._replay_position(rec, limit, vouch=True)
                        if timeline is not None and (floor or 0) < timeline:
                            replay = -1  # of an older history than the token: says nothing
                    asked[rec.endpoint] = replay
                except BaseException as exc:
                    held, rec = rec, None
                    ep = held.endpoint
                    if not isinstance(exc, Exception) or not is_disconnect(exc, held.raw):
                        self._checkin_slow(held, exc, True)  # (an interrupt: the caller's)
                        raise
                    if held.raw.timed_out and ep.cut_short(limit, self.options.query_timeout):
                        self._discard(held)  # the caller's time ran out first: proof of nothing
                        self._deadline_spent(f"asking replica {ep.name} its replay position")
                    self._checkin_slow(held, exc, True)
                    if fallback:
                        break
                    continue
                if replay >= lsn:
                    return rec
                move = self._next_to_ask(lsn, asked, rec.endpoint, fallback, judged)
                if move is None and not settled:  # each one asked: stay with the most advanced
                    settled, best = True, max(asked, key=asked.__getitem__)
                    if best is not rec.endpoint and best in self._readable \
                            and (best.idle or not fallback):
                        move = best
                now = monotonic()
                if move is None:
                    if now >= deadline:
                        break
                    if now >= self._due:  # process mode: the monitors advance on checkouts
                        self._tick(now, end)
                    time.sleep(min(pause, max(0.0, deadline - monotonic())))
                    pause = min(2 * pause, 0.05)
                    if not fallback and now - surveyed >= lag.RESURVEY:  # who caught up?
                        asked, settled, surveyed = {}, False, now
                    continue
                held, rec = rec, None  # (an interrupt in between must not return it twice)
                self._checkin(held, None, True)
                try:
                    rec = self._checkout(True, max(0.0, end - now), (move,))
                except PoolError:
                    if fallback:
                        break
                    continue
                if rec.endpoint.role == PRIMARY:
                    return rec  # every replica went down meanwhile
        except BaseException as exc:
            if rec is not None:
                self._checkin_slow(rec, exc, True)
            raise
        if rec is not None:
            self._checkin(rec, None, True)
        if not fallback:
            self._token_timeout(
                f"no replica had replayed the writes of token {lag.format_token(lsn, timeline)} "
                f"within {monotonic() - start:.2f}s, and read_fallback=False keeps reads off the "
                f"primary")
        # Lent for a read: _run and Checkout keep it read-only.
        return self._checkout(False, max(0.0, end - monotonic()))

    def _await_timeline(self: "Pool", lsn: int, timeline: int, start: float, end: float) -> None:
        """Until the timeout: wait while the primary this pool knows is on an older timeline
        than the token's. The token comes from a primary promoted since, which this pool will
        find: every node is asked at once (``_survey``: the monitor that would see it may be
        another process's, idle), then role discovery and the monitors go on as usual. With no
        primary known, the nodes are asked once; if none is found, the replicas vouch for
        themselves (``_checkout_after``). A survey that every node answered, none on the
        token's timeline, means there is no such promotion: ValueError, as for a bad token."""
        pause, surveyed = lag.AFTER_POLL, False
        while True:
            primary = self._primary
            known = primary.timeline if primary is not None else None
            if known is not None and known >= timeline or known is None and surveyed:
                return
            self._survey(end)
            surveyed = True
            newest = self._newest_timeline() if self._all_answered_at >= start else timeline
            if newest < timeline:
                # Every node answered, after the token was made, and none is on its timeline: no
                # promotion to wait for. A forged token held the caller for its timeout.
                raise ValueError(f"after= token is from timeline {timeline}, which no server has "
                                 f"(every node answered; the newest timeline is {newest}): not a "
                                 f"token of these servers")
            if known is None:
                continue
            now = monotonic()
            if now >= end:
                self._token_timeout(
                    f"token {lag.format_token(lsn, timeline)} is from timeline {timeline}, and "
                    f"within {now - start:.2f}s this pool saw no primary newer than {primary.name} "
                    f"(timeline {known}): a promotion it has not found")
            if now >= self._due:  # process mode: the monitors advance on checkouts
                self._tick(now, end)
            time.sleep(min(pause, max(0.0, end - monotonic())))
            pause = min(2 * pause, 0.05)

    def _token_timeout(self: "Pool", head: str) -> NoReturn:
        with self._lock:
            self._timeouts += 1
            self._wait_target(True).timeouts += 1
            raise self._timeout_error(True, None, head=head)

    def _next_to_ask(self: "Pool", lsn: int, asked: dict, current: Any, fallback: bool,
                     judged: Callable[[Any], bool]) -> Any:
        """The replica to move to, if any: one the monitor has seen replay ``lsn``, else one not
        asked yet. With read_fallback only one with an idle connection (moving must not connect
        or wait while the primary could answer)."""
        usable = [ep for ep in self._readable if ep is not current and (ep.idle or not fallback)
                  and self._askable(ep)]
        return next((ep for ep in usable if judged(ep) and (ep.replay_lsn or 0) >= lsn),
                    None) or next((ep for ep in usable if ep not in asked), None)

    def _judged(self: "Pool", ep: Any) -> bool:
        """May a read with a token count on this replica's position? Once the monitor has
        compared it with the current primary's (not a replica left ahead by a failover: lag.py).
        Without the monitor (max_lag=None, declared roles) nothing is compared: it may."""
        return ep.judged or not self._monitoring

    def _askable(self: "Pool", ep: Any) -> bool:
        """Worth asking its position for a token? If judged; or, with no primary up to compare
        it with, to be asked its timeline too (a pool started during an outage must not fail
        such reads for want of a primary it does not need)."""
        return self._judged(ep) or not self._writable

    @staticmethod
    def _replay_position(rec: PooledConnection, limit: float,
                         vouch: bool = False) -> tuple[int, int | None]:
        """The replica's replay position, asked (one round trip, timed, on a plain cursor). With
        ``vouch``, also the timeline it is on at least (its control file's: the last restartpoint
        and the minimum recovery point lag behind, never ahead); None where those functions are
        not allowed (they are by default). The question is part of a checkout: bounded by what
        is left of its timeout (``limit``) as well as by query_timeout."""
        raw = rec.raw
        if not raw.autocommit:  # left on: whoever uses the connection next sets what it needs
            rec.maybe_autocommit = True
            set_autocommit(raw, True)
        with within(raw, limit):
            try:
                ((text, floor),) = own_statement(raw, _VOUCH_SQL if vouch else _REPLAY_SQL,
                                                 fetch=True)
            except psycopg2.errors.InsufficientPrivilege:
                ((text, floor),) = own_statement(raw, _REPLAY_SQL, fetch=True)
        replay = lag.parse_lsn(text) or 0  # (NULL: not a replica any more; never enough)
        ep = rec.endpoint
        if replay > (ep.replay_lsn or 0):
            ep.replay_lsn = replay  # what the next read with a token can count on
        return replay, floor


def _never(ep: Any) -> bool:
    return False


_REPLAY_SQL = "SELECT pg_last_wal_replay_lsn()::text, NULL::int"
_VOUCH_SQL = f"SELECT pg_last_wal_replay_lsn()::text, {lag.FLOOR_EXPR}"


def _fetchone(cur: Any) -> Any:
    return cur.fetchone()


def _fetchall(cur: Any) -> Any:
    return cur.fetchall()


def _rowcount(cur: Any) -> int:
    return cur.rowcount


def _first_value(cur: Any) -> Any:
    """The one row's first column, whatever rows the cursor factory configure() set makes (a
    RealDictCursor's are keyed by column name)."""
    row = cur.fetchone()
    return row[cur.description[0].name] if isinstance(row, dict) else row[0]


