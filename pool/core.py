"""The pool itself: construction, the public API, routing, checkout and the plain return.

``Pool`` is assembled from one module per concern, each a mixin with a docstring of its own:
health.py (an endpoint's state changes and the errors that say so), returns.py (every return that
is not the plain case, and the session reset it runs), statements.py (fetchone, fetchall,
execute, reads after a token), housekeeping.py (the jobs between checkouts), sharing.py (the
shared health board). Everything is shared by both modes; ``modes.py`` supplies only what differs
(the lock, waiting, who runs housekeeping, process mode's lock-free fast path; see "what the
modes provide" below). Methods documented "lock held" run under the pool lock in threaded mode;
in process mode a single thread uses the pool and there is no lock.

Checkout path::

    connection() ─► _checkout ─► _take: route (writes: the primary; reads: a replica chosen by
                        │               the balancer, or the primary if none is up), then pop an
                        │               idle connection, reserve a slot for a new one, or (threaded,
                        │               nothing free) queue the caller
                        ├─ fresh idle connection (used < check_after ago) ─► handed out
                        └─ _checkout_slow ─┬─ none free: _wait (threaded: FIFO, deadline;
                                           │                   process: PoolTimeout at once)
                                           ├─ reserved slot: _open, outside the lock
                                           └─ idle a while: _is_usable (local socket check,
                                                            a ping if idle very long)

Return path: a loan that made no cursor, changed no setting and, by libpq's account, left no
transaction open goes straight back (``_checkin``); anything else takes ``_checkin_slow``
(returns.py). An idle connection may be in autocommit, left so by fetchone & co (statements.py);
a block's loan always starts with it off (``_lend``).

Asynchronous exceptions (a signal handler's timeout, ^C) may land between any two bytecodes. Every
step that moves a connection or a slot catches ``BaseException`` and puts things back, and what no
handler can reach (a value between a C call and the next store) is covered by the slots' weak
references (endpoint.py): a connection or reservation dropped on the floor frees its slot when it
is collected.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from threading import get_ident
from typing import Any, Callable, Sequence

import psycopg2
import psycopg2.extensions as ext

from .balance import make_balancer
from . import lag, monitor
from .config import (PRIMARY, EndpointSpec, Options, Redactor, endpoint_configs, libpq_seconds,
                     node_configs, options_from_env)
from .connection import RAN, PooledConnection, connect, connect_failure, describe_error
from .resolve import Resolution
from .endpoint import Endpoint, Reservation
from .errors import EndpointUnavailable, PoolError
from .health import Health
from .housekeeping import Housekeeping
from .returns import Returns
from .sharing import Sharing
from .statements import Statements, _fetchall, _fetchone, _first_value, _rowcount
from .probe import OK, Probe, wait_for
from .session import Baseline
from .board import after_fork_in_child as board_after_fork
from .watchdog import WATCHDOG, cancel_at_close

log = logging.getLogger("pool")
monotonic = time.monotonic


_TX_IDLE = ext.TRANSACTION_STATUS_IDLE
_TX_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_TX_INERROR = ext.TRANSACTION_STATUS_INERROR
_STATUS_BEGIN = ext.STATUS_BEGIN
_STATUS_READY = ext.STATUS_READY
from .config import DEFAULT as _DEFAULT  # noqa: E402  ("the pool's own setting")
ISSUED = object()  # a reusable Checkout handed out by connection() and not yet entered
BOARD_EVERY = 0.001  # seconds between a checkout's looks at the shared board
INFINITY = float("inf")
PRECHECK_SLACK = 0.1  # seconds libpq's whole-second count may overshoot a connect's bound before
#                       the pool prechecks (a second login) to keep the bound exactly


class Pool(Housekeeping, Sharing, Health, Returns, Statements):
    """A PostgreSQL connection pool over one primary and zero or more read replicas.

    Writes go to the primary; ``readonly=True`` work goes to a healthy replica, balanced, in a
    read-only session. An endpoint that fails is skipped by everyone at once and re-admitted
    after a successful probe. ``mode="threaded"`` shares one pool between the threads of a
    process (lock, FIFO wait with deadline, a housekeeping thread); ``mode="process"`` gives each
    single-threaded worker process its own pool (no lock; exhaustion fails at once).

    Example::

        p = Pool("host=db1 dbname=app user=app", replicas=["host=db2 ...", "host=db3 ..."])
        with p.connection() as conn:                  # the primary; commits on success
            conn.cursor().execute("INSERT ...")
        row = p.fetchone("SELECT ...", (42,), readonly=True)   # a replica; retried once

    Or give every node as a candidate and let the pool find the primary, and follow it through
    a promotion: ``Pool(["host=db1 ...", "host=db2 ...", "host=db3 ..."])`` (roles.py).
    """

    def __new__(cls, *args: Any, mode: str = "threaded", **kwargs: Any) -> "Pool":
        if cls is Pool:  # pick the mode's class; Options() rejects an unknown mode
            from .modes import mode_class
            cls = mode_class(mode) or cls
        return super().__new__(cls)

    def __init__(
        self,
        primary: EndpointSpec | Sequence[EndpointSpec] | None = None,
        replicas: Sequence[EndpointSpec] = (),
        *,
        nodes: Sequence[EndpointSpec] | None = None,
        mode: str = "threaded",
        max_size: int = 10,
        min_size: int = 0,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        query_timeout: float | None = 30.0,
        max_lifetime: float = 1800.0,
        max_idle: float = 300.0,
        check_after: float = 0.1,
        ping_after: float = 30.0,
        balance: str = "round_robin",
        read_fallback: bool = True,
        max_waiting: int = 0,
        reset_session: bool = True,
        max_lag: float | None = 10.0,
        shared_state: bool | str | None = None,
        configure: Callable[[Any], None] | None = None,
        reset: Callable[[Any], None] | None = None,
    ) -> None:
        self.options = opts = Options(
            mode=mode, max_size=max_size, min_size=min_size, timeout=timeout,
            connect_timeout=connect_timeout, query_timeout=query_timeout,
            max_lifetime=max_lifetime, max_idle=max_idle, check_after=check_after,
            ping_after=ping_after, balance=balance, read_fallback=read_fallback,
            max_waiting=max_waiting, reset_session=reset_session, max_lag=max_lag,
            shared_state=shared_state, configure=configure, reset=reset)
        if isinstance(primary, list):  # Pool([dsn, dsn, dsn]): every node a candidate
            primary, nodes = None, primary
        if nodes is not None:
            if primary is not None or replicas:
                raise ValueError("give either nodes (every node a candidate) or a primary and "
                                 "its replicas, not both")
            configs = node_configs(nodes, opts)
        elif primary is None:
            raise ValueError("no endpoints: give the primary's DSN (and replicas=[...]), or "
                             "nodes=[...] with every node as a candidate")
        else:
            configs = endpoint_configs(primary, replicas, opts)
        self._discover = nodes is not None  # roles found by asking, not declared (roles.py)
        self._redact = Redactor([c.password for c in configs])
        self._endpoints = [Endpoint(c, opts.max_size) for c in configs]
        self._primary: Endpoint | None = None if self._discover else self._endpoints[0]
        self._lag = lag.LagTracker()
        self._lag_source: Endpoint | None = None
        self._judgements = 0  # bumped whenever the replicas must be judged anew (lag.py)
        self._fast_until = 0.0  # every node asked every lag.RECHECK until then
        self._floor_ok = True  # may the monitor read the replicas' control files (monitor.py)
        self._surveyed_at = -1.0  # when every node was last asked out of turn (Pool._survey)
        self._all_answered_at = -1.0  # ...by a survey every node answered
        self._monitoring = self._discover or opts.max_lag is not None
        self._route_locked()
        self._balance = make_balancer(opts.balance)
        self._closed = False
        self._pid = os.getpid()
        self._waits = self._timeouts = 0
        self._check_after = opts.check_after  # read on every checkout: keep it one lookup away
        self._init_mode()
        _LIVE_POOLS.add(self)  # the module's one at-fork hook resets every live pool
        self._open_board()  # before the first probes: their results go on it
        self._probe_all_at_start()
        if opts.min_size:
            self._wake_filler()  # open min_size connections per endpoint

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Pool":
        """Build a pool from environment variables; keyword arguments override them.

        ``POOL_PRIMARY`` (required) and ``POOL_REPLICAS`` (comma-separated) hold DSNs or URLs;
        ``POOL_<OPTION>`` sets any option, e.g. ``POOL_MODE=process``, ``POOL_MAX_SIZE=4``,
        ``POOL_READ_FALLBACK=false``, ``POOL_QUERY_TIMEOUT=none``.
        """
        primary, replicas, kwargs = options_from_env(os.environ if environ is None else environ)
        kwargs.update(overrides)
        return cls(primary, replicas, **kwargs)

    # -- public API --------------------------------------------------------------------------

    def connection(self, readonly: bool = False, timeout: float | None = None,
                   query_timeout: Any = _DEFAULT, after: str | None = None) -> "Checkout":
        """A context manager lending a psycopg2 connection for the ``with`` block.

        Leaving the block normally commits; an exception rolls back and propagates. With
        ``readonly=True`` the connection is to a replica (or the primary if none is up and
        ``read_fallback``) and nothing it does can write. ``timeout`` overrides the checkout's
        deadline (the wait for a connection, a ping, a connect); ``query_timeout`` the deadline
        of each statement in the block (``None``: no deadline, for a long report or a bulk
        COPY). ``after`` (a read): a token from ``write_token()``; the block reads from a server
        that has that write.
        """
        return Checkout(self, readonly, timeout, query_timeout,
                        lag.parse_token(after) if after is not None and readonly else None)

    def fetchone(self, sql: str, params: Any = None, readonly: bool = False,
                 after: str | None = None) -> tuple | None:
        """Run one statement and return its first row (or None). Reads are retried once;
        ``after=token`` reads from a server that has the writes the token stands for."""
        if after is not None and readonly:  # (a write goes to the primary, which has it all)
            return self._run(sql, params, readonly, _fetchone, lag.parse_token(after))
        return self._run(sql, params, readonly, _fetchone)

    def fetchall(self, sql: str, params: Any = None, readonly: bool = False,
                 after: str | None = None) -> list[tuple]:
        """Run one statement and return all its rows. Reads are retried once."""
        if after is not None and readonly:
            return self._run(sql, params, readonly, _fetchall, lag.parse_token(after))
        return self._run(sql, params, readonly, _fetchall)

    def execute(self, sql: str, params: Any = None) -> int:
        """Run one statement on the primary and commit; return the row count. Never retried."""
        return self._run(sql, params, False, _rowcount)

    def write_token(self) -> str:
        """A short string standing for every write committed so far (the primary's timeline and
        WAL position, "2:0/3000148"): pass it as ``after=`` to a later read, in this process or
        another (it fits in a header or a cookie), and that read sees those writes. One round
        trip on the primary.

            p.execute("INSERT ...")
            response.headers["X-Read-After"] = p.write_token()
            ...
            p.fetchone("SELECT ...", args, readonly=True, after=request.headers.get("X-Read-After"))
        """
        return self._run(lag.TOKEN_SQL, None, False, _first_value)

    @property
    def last_endpoint(self) -> str | None:
        """Name of the endpoint that served this thread's latest checkout (for logs, headers);
        None after a fetchone/fetchall/execute that failed."""
        ep = getattr(self._local, "endpoint", None)
        return ep.name if ep is not None else None

    def stats(self, scope: str = "process", housekeep: bool = True) -> dict[str, Any]:
        """Counters and gauges for the pool and each endpoint. Never contains a password.

        ``scope="host"``: every process sharing this pool's health board (board.py), each with
        its own endpoint states and counters, and per endpoint how many of them see it up.
        Waits for nothing: a health check must not hang on the server it reports on.
        """
        if scope not in ("process", "host"):
            raise ValueError('scope must be "process" or "host"')
        now = monotonic()
        if housekeep:  # (what is due, with no time to spend: process mode's min_size connect and
            self._tick(now, now)  # a cancel request's wait are left to the next request)
        with self._lock:
            eps = [ep.stats(now) for ep in self._endpoints]
            waiting = self._waiting_count()
        total = lambda key: sum(e[key] for e in eps)  # noqa: E731
        opts = self.options
        result = {
            "mode": opts.mode, "pid": os.getpid(), "closed": self._closed,
            "max_size_per_endpoint": opts.max_size, "capacity": opts.max_size * len(eps),
            "min_size": opts.min_size,
            "size": total("size"), "idle": total("idle"), "in_use": total("in_use"),
            "connecting": total("connecting"), "waiting": waiting,
            "checkouts": total("checkouts"), "waits": self._waits,
            "timeouts": self._timeouts, "connects": total("connects"),
            "connect_errors": total("connect_errors"), "ejections": total("ejections"),
            "query_timeouts": total("query_timeouts"),
            "shared_state": self._board.path if self._board is not None else None,
            "roles": "discovered" if self._discover else "declared",
            "primary": self._primary.name if self._primary is not None else None,
            "reads_to": self._reads_to, "max_lag": opts.max_lag,
            "endpoints": eps,
        }
        return self._host_stats(result) if scope == "host" else result

    def close(self) -> None:
        """Close idle connections, stop housekeeping, fail waiters. In-use ones close on return."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._due = 0.0
            doomed, probes = [], []
            for ep in self._endpoints:
                doomed += self._drop_idle_locked(ep)
                if ep.probe is not None:
                    probes.append(ep.probe)
                    ep.probe = None
                if ep.errand is not None:  # (the server has no one to answer any more)
                    probes.append(ep.errand)
                    ep.errand = None
            self._serve_waiters()
        self._wake_housekeeper()
        for probe in probes:
            probe.cancel()
        for ep in self._endpoints:
            self._end_probe(ep)
        if self._board is not None:
            self._board.forget(id(self))
        monitor.close_monitors(self)
        cancel_at_close(self)
        for rec in doomed:
            rec.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        eps = ", ".join(f"{ep.name} {ep.role} {ep.state}" for ep in self._endpoints)
        return f"<pool.Pool {self.options.mode} [{eps}]{' closed' if self._closed else ''}>"

    # -- checkout -----------------------------------------------------------------------------
    #
    # _checkout and _checkin are the hot path: a fresh idle connection goes out and comes back
    # with one clock read, a handful of attribute checks and no call deeper than _take/_put.
    # Anything unusual (no idle connection, a check to run, a dirty loan) takes the *_slow path,
    # which handles every case and is where correctness is argued.

    def _checkout(self, readonly: bool, timeout: float | None,
                  among: tuple | None = None) -> PooledConnection:
        now = monotonic()
        if now >= self._due:  # housekeeping due (process mode), a look at the board, or closed
            deadline = now + (self.options.timeout if timeout is None else timeout)
            self._tick(now, deadline)  # (what it spends on the pool's work is the caller's time)
            now = monotonic()  # (a probe may have waited; `now` also starts the statement's clock)
            timeout = max(0.0, deadline - now)
        if self._owner is not None and get_ident() != self._owner:  # process mode: one thread
            self._check_owner()
        rec = None
        try:
            try:
                rec = self._take(readonly, among)
            except EndpointUnavailable:
                rec = self._take_after_probe(
                    readonly, now + (self.options.timeout if timeout is None else timeout))
            if not (rec.__class__ is PooledConnection and rec.generation == rec.endpoint.generation
                    and now - rec.last_used <= self._check_after and now < rec.expires):
                grant, rec = rec, None  # from here on _checkout_slow owns it, and cleans up
                deadline = now + (self.options.timeout if timeout is None else timeout)
                rec = self._checkout_slow(readonly, deadline, grant, now)
                now = monotonic()  # after any wait, connect or ping: fetchone & co time their
                #                    statement from last_used (statements.py)
                rec.lent_by = (now, deadline)  # (for _lend: PooledConnection.deadline)
            rec.last_used = now  # idle time counts from the checkout: errs towards checking more
            ep = rec.endpoint
            ep.checkouts += 1
            self._local.endpoint = ep
            return rec
        except BaseException:
            if rec is not None:
                self._give_back(rec)
            self._abandon_wait()  # a place in line an interrupt left behind (threaded mode)
            raise

    def _checkout_slow(self, readonly: bool, deadline: float, grant: Any,
                       now: float) -> PooledConnection:
        """Wait if need be, connect in a reserved slot, or vet an idle connection; loop until a
        connection is ready, an error says why none can be, or the deadline passes."""
        while True:
            if grant is None or grant.__class__ is not PooledConnection \
                    and grant.__class__ is not Reservation:  # None, or already queued (threaded)
                grant = self._wait(readonly, deadline, now, grant)
                if grant.__class__ is PooledConnection and grant.generation == \
                        grant.endpoint.generation and now < grant.expires and not grant.raw.closed:
                    return grant  # handed over by the caller who just used it: nothing to vet
            if grant.__class__ is Reservation:
                rec = self._open(grant, deadline)
            else:
                rec = grant if self._is_usable(grant, now, deadline) else None
            grant = None
            if rec is not None:
                return rec
            # A connection was dropped or an endpoint ejected: route again. Each turn discards an
            # idle connection or ejects an endpoint, and _wait keeps the deadline; an endpoint
            # that a probe keeps re-admitting and a connect keeps ejecting must not loop forever.
            now = monotonic()
            if now >= deadline:
                with self._lock:
                    raise self._unavailable(readonly)
            try:
                grant = self._take(readonly)
            except EndpointUnavailable:
                grant = self._take_after_probe(readonly, deadline)

    def _take_after_probe(self, readonly: bool, deadline: float) -> Any:
        """No endpoint is up for this request. If one is being probed right now (say, after a
        lost session), give the probe a moment (Endpoint.grace), then route once more: raises
        EndpointUnavailable, with the state as it is then, if nothing came back. PoolTimeout if
        the caller's ``deadline`` came first, with the probe still worth waiting for: its
        server may be fine, and is merely slower to answer than the caller could wait."""
        self._probe_on_demand(monotonic(), deadline, readonly)
        try:
            return self._take(readonly)
        except EndpointUnavailable:
            now = monotonic()
            if now >= deadline:
                with self._lock:
                    awaited = [ep for ep in self._endpoints
                               if ep.awaiting_probe(now) and self._could_serve(ep, readonly)]
                if awaited:
                    self._deadline_spent("waiting for the probe of " + ", ".join(
                        f"{ep.role} {ep.name} (down {now - ep.down_since:.2f}s)" for ep in awaited))
            raise

    def _take_locked(self, readonly: bool, among: tuple | None = None) -> Any:
        """Lock held. An idle connection, a Reservation for a new one, or None if all are full.
        ``among``: the replicas a read prefers (those known to have a read-after token's writes).

        Raises EndpointUnavailable when no endpoint can serve the request at all.
        """
        if self._closed:
            raise PoolError("the pool is closed")
        first = 0
        if readonly and self._readable:
            candidates = among or self._readable
            first = self._balance(candidates)
        elif self._writable and (not readonly or self.options.read_fallback):
            candidates = self._writable
        else:
            raise self._unavailable(readonly)
        # The preferred endpoint first, then the others in turn. Busy replicas make a read wait;
        # it does not spill onto the primary.
        i = first
        while True:
            ep = candidates[i]
            if ep.idle:
                return ep.idle.pop()
            if len(ep.slots) + len(ep.pending) < ep.max_size:
                return ep.reserve()
            i = i + 1 if i + 1 < len(candidates) else 0
            if i == first:
                return None

    def _wait_target(self, readonly: bool) -> Endpoint:
        """The endpoint a waiter is counted against in stats (waits, timeouts)."""
        if readonly and self._readable:
            return min(self._readable, key=lambda ep: ep.in_use)
        return self._primary or self._endpoints[0]

    def _open(self, res: Reservation, deadline: float = INFINITY,
              hosted: bool = False) -> PooledConnection | None:
        """Connect in a slot _take reserved. None if the endpoint failed (and was ejected).

        The attempt is bounded by connect_timeout and by the caller's deadline, whichever comes
        first. The host name is looked up first, once for the whole attempt (resolve.py); what
        is left of the bound is the server's share. libpq counts whole seconds, for each of the
        name's addresses in turn: when its count would overshoot that share by more than
        PRECHECK_SLACK, a non-blocking probe reaches the server first, within it exactly
        (_precheck); with less of the caller's time left after it than it took, the caller gets
        PoolTimeout (the second login would overrun). A connect
        cut short by the caller's deadline (a share smaller than both a probe's grace and
        connect_timeout) is evidence of nothing, as for a ping: the caller gets PoolTimeout, and
        the endpoint stays up. So is any connect the deadline cut short if the caller only
        ``hosted`` it (process mode's min_size connects run on requests): it must not fail the
        request that hosts it. One the caller's deadline ended later than that makes the
        endpoint suspect (a slow login as likely as an outage); only connect_timeout
        unanswered, or a failure, is proof.

        Only a failed connect, or a statement setting the connection up that got no answer
        within query_timeout, is evidence against the server. Any other error from the user's
        configure() closes that one connection and reaches the caller; the endpoint stays up.
        """
        ep = res.endpoint
        opts = self.options
        self._start_housekeeping()  # connections now exist: they will need looking after
        started = served = monotonic()
        limit = max(0.001, min(opts.connect_timeout, deadline - started))
        try:
            resolution = Resolution(ep.dsn, started, limit)  # the host's addresses (resolve.py)
            resolution.wait()
            params = resolution.params()
            served = monotonic()  # the server's share of the attempt starts here
            rest = max(0.001, limit - (served - started))
            seconds = libpq_seconds(rest)
            # libpq gives each address connect_timeout in turn: a name with several (resolve.py)
            # is bounded by them all, which overshoots even a whole-second bound: precheck it.
            tries = params["hostaddr"].count(",") + 1 if "hostaddr" in params else 1
            if seconds * tries - rest > PRECHECK_SLACK:
                self._precheck(ep, rest, params)
                login = monotonic()
                if deadline - login < login - served:
                    # Less of the caller's time left than the precheck's login took: the real
                    # one would overrun it by libpq's whole seconds. The server answered. (The
                    # caller's deadline, whichever bound the precheck kept: connect_timeout=0.6
                    # and timeout=0.7 leave 0.1 s after a 0.6 s precheck.)
                    self._deadline_spent(f"connecting to {ep.role} {ep.name}, which answered "
                                         f"in {login - served:.3f}s", count=not hosted)
            login = monotonic()
            raw = connect(ep.dsn, ep.name, opts.query_timeout, params,
                          None if seconds == opts.libpq_connect_timeout else seconds)
            ep.logged_in(monotonic() - login)
        except BaseException as exc:
            self._release(res)
            if not isinstance(exc, psycopg2.OperationalError):
                raise  # not the server's fault: a bad option, ^C
            spent = monotonic() - started
            share = limit - (served - started)  # the server's, or the lookup's if it failed
            unanswered = spent >= limit and connect_failure(describe_error(exc)) == "down"
            if unanswered and (ep.cut_short(share, opts.connect_timeout)
                               or hosted and limit < opts.connect_timeout):
                self._deadline_spent(  # the caller's time ran out first: proof of nothing
                    f"connecting to {ep.role} {ep.name} ({limit:.3f}s were left"
                    f"{f', {share:.3f}s after the name lookup' if share < limit else ''})",
                    count=not hosted)
            with self._lock:
                ep.connect_errors += 1
            if unanswered and limit < opts.connect_timeout:
                # Unanswered within the caller's time, not connect_timeout: a login slower than
                # that caller could wait (logins slowed by load) as likely as an outage. A
                # suspicion, as for a missed statement deadline, which the probe decides.
                self._eject(ep, f"connect failed, in the {limit:.2f}s its caller had left: "
                                f"{self._redact(describe_error(exc))}", probe_now=True, keep=True)
            else:
                self._connect_failed(ep, exc, fast=ep.at_once(spent))
            return None
        try:
            res.raw = raw  # watched from now on: configure() and the baseline may wait for it
            WATCHDOG.watch(self)
            if opts.configure is not None:
                opts.configure(raw)
                if raw.get_transaction_status() != _TX_IDLE:
                    raw.commit()  # what configure did is part of the session from now on
            baseline = Baseline.capture(raw, opts.configure is not None)
            raw.dirty = 0
            rec = PooledConnection(raw, ep, baseline, monotonic(), opts.max_lifetime)
        except BaseException as exc:
            ext.connection.close(raw)  # (psycopg2's: PoolConnection.close is a borrower's)
            self._release(res)
            if not raw.timed_out:
                raise  # configure()'s own error: the caller's to see, not the server's fault
            self._missed_deadline(ep, raw, "a statement setting up a new connection")
            return None
        with self._lock:
            ep.adopt(res, rec)
            ep.connects += 1
        log.debug("opened a connection to %s %s (size %d)", ep.role, ep.name, ep.size)
        return rec

    def _precheck(self, ep: Endpoint, limit: float, params: dict[str, str]) -> None:
        """The connect's bound is finer than libpq can count (connect_timeout=0.5, or a caller
        with 0.3 s left): reach the server first with a non-blocking probe that keeps the exact
        bound, then connect for real. It costs a second login, and only then; a server that
        stalls between the two costs libpq's whole-second timeout."""
        probe = Probe(ep.dsn, monotonic(), limit, params=params)
        wait_for([probe], monotonic)
        if probe.status != OK:
            raise psycopg2.OperationalError(probe.reason or "no answer")

    def _is_usable(self, rec: PooledConnection, now: float, deadline: float) -> bool:
        """Cheap local checks always; a socket check or a ping only after idling a while.

        The ping is bounded by the checkout's deadline and by connect_timeout, whichever comes
        first: a server that stalls cannot hold a caller past its timeout.
        """
        ep = rec.endpoint
        opts = self.options
        if ep.verifying(rec) and now < rec.expires and not rec.raw.closed:
            return self._verify_kept(rec, deadline)
        if rec.generation != ep.generation or now >= rec.expires or rec.raw.closed:
            self._discard(rec)
            return False
        idle_for = now - rec.last_used
        if idle_for <= opts.check_after:
            return True
        if rec.closed_by_server():
            # The server ended an idle session: it may be shutting down or restarting. Probe it
            # before anyone waits on a connect to it (a dead host can take connect_timeout to
            # refuse).
            self._discard(rec)
            self._eject(ep, "the server closed an idle session", probe_now=True, share=False)
            return False
        if idle_for <= opts.ping_after:
            return True
        budget = min(deadline - monotonic(), opts.connect_timeout)
        if rec.ping(max(0.001, budget)):
            return True
        self._discard(rec)
        if not rec.raw.timed_out:  # an error: the session is gone, as if the server closed it
            self._eject(ep, "a ping found the session lost", probe_now=True, share=False)
        elif not ep.cut_short(budget, opts.connect_timeout):
            # No answer within the pool's own deadline, or the time a login on a server that is
            # fine takes (Endpoint.grace): evidence
            self._missed_deadline(ep, rec.raw, "a ping")
        else:  # the caller's time ran out first: proof of nothing but a deadline spent
            self._deadline_spent(f"pinging an idle connection to {ep.role} {ep.name} "
                                 f"(idle {idle_for:.0f}s)")
        return False

    def _verify_kept(self, rec: PooledConnection, deadline: float) -> bool:
        """A session kept through a suspicion, or through an outage another process saw
        (Endpoint.to_verify): the server answered, but on a new connection. One ping within a
        probe's grace says whether this session still reaches it; if not, the path to the
        server lost its sessions (a firewall, a NAT), and every other one kept with it is
        presumed lost too. The server is not ejected: it has just answered. A ping cut short
        by the caller's deadline (less time left than the grace) says nothing of the others:
        the caller gets PoolTimeout, and they stay kept for the next one to verify."""
        ep = rec.endpoint
        if rec.closed_by_server():  # (this one only: say, idle_session_timeout)
            self._discard(rec)
            return False
        generation = ep.generation  # (one that changes during the ping leaves it stale)
        budget = min(deadline - monotonic(), ep.grace)
        if rec.ping(max(0.001, budget)):
            rec.generation = generation
            return True
        if rec.raw.timed_out and ep.cut_short(budget, None):
            self._discard(rec)
            self._deadline_spent(f"pinging a connection to {ep.role} {ep.name} kept through an "
                                 f"outage or a suspicion")
        with self._lock:
            if ep.verifying(rec):
                ep.verify_until = -1  # the rest are stale now: discarded as they come
        self._discard(rec)
        log.info("%s %s: a session kept through an outage or a suspicion did not answer a ping; "
                 "the others kept with it are dropped", ep.role, ep.name)
        return False

    # -- return -------------------------------------------------------------------------------

    def _checkin(self, rec: PooledConnection, exc: BaseException | None,
                 readonly: bool = False) -> None:
        # The generation check sends to the slow path both a connection made before its
        # endpoint's last failure and one lent before a fork() (the child bumps generations).
        raw = rec.raw
        if exc is None and not raw.dirty and rec.generation == rec.endpoint.generation:
            if raw.status == _STATUS_READY and not raw.get_transaction_status():  # (IDLE is 0)
                if self._put(rec):
                    return
            else:
                # psycopg2's word and the server's cover what `dirty` cannot see: statements sent
                # by a cursor made from psycopg2's class directly (RealDictCursor(conn)), with a
                # COMMIT of their own or not, or a BEGIN in a helper's SQL. The slow path ends the
                # transaction on both sides and, since anything may have run, resets the session.
                raw.dirty |= RAN
        elif exc is not None and not raw.closed:
            raw.mark_if_open()  # the same, for a block that raised: its rollback ends no lock
        self._checkin_slow(rec, exc, readonly)

    def _put_locked(self, rec: PooledConnection) -> bool:
        """Lock held. Make an idle connection available; False if the pool is closed."""
        if self._closed:
            return False
        rec.endpoint.idle.append(rec)  # (threaded mode's _put then serves its waiters)
        return True

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        now = monotonic()
        for ep in self._endpoints:
            for rec in ep.idle:
                rec.abandon()
            # Connections lent at the fork are not counted: those of other threads never come
            # back here (the threads do not exist in the child), and the forking thread's are
            # abandoned if they do (the new generation sends them to _checkin_slow).
            ep.idle = []
            ep.slots = {}
            ep.pending = {}
            ep.generation += 1
            ep.reset_counters()
            if ep.probe is not None:
                ep.probe.abandon()
                ep.probe = None
                ep.retry_at = now
            if ep.monitor is not None:
                ep.monitor.abandon()
                ep.monitor = None
            if ep.errand is not None:  # (its orphans stay: the parent, say a gunicorn master,
                ep.errand.abandon()      # may never look after them; a second cancel is harmless)
                ep.errand = None
        self._waits = self._timeouts = 0
        if self._board is not None:  # reopened by board.after_fork_in_child (the module hook)
            self._board_seq = self._board.seq_view
            self._board_seen = -1
        self._reset_after_fork()

    # -- what the modes provide --------------------------------------------------------------
    #
    # _lock          the pool lock (process mode: a no-op stand-in)
    # _take, _put    _take_locked and _put_locked, under the lock (process mode: themselves)
    # _owner         process mode: the thread using the pool (threaded mode: None)
    # _waiting_count how many callers wait for a connection (process mode: none, ever)
    # _hk_due        when housekeeping must next run on a checkout (threaded mode: never)
    # _local         per-thread data (process mode: a plain namespace)

    _owner: int | None = None

    def _init_mode(self) -> None:
        raise NotImplementedError

    def _check_owner(self) -> None:
        """Process mode: a thread other than the owner takes a loan."""
        raise NotImplementedError

    def _abandon_wait(self) -> None:
        """After an interrupted checkout: leave any place in line this thread still holds."""

    def _wait(self, readonly: bool, deadline: float, now: float, queued: Any = None) -> Any:
        """Block until _take would succeed; a grant, or PoolTimeout / EndpointUnavailable.
        ``queued``: the caller is already in line (threaded _take queues it when nothing is free)."""
        raise NotImplementedError

    def _serve_waiters(self) -> None:
        """Lock held. Hand freed connections or slots to waiters, oldest first."""
        raise NotImplementedError

    def _start_housekeeping(self) -> None:
        """Make sure housekeeping will run (threaded mode: start the thread if need be)."""
        raise NotImplementedError

    def _wake_housekeeper(self) -> None:
        """Something changed (an endpoint went down, ...): run housekeeping soon."""
        raise NotImplementedError

    def _hurry_housekeeper(self) -> None:
        """Jobs fell due early (lag.forget_judgements): run housekeeping soon if it runs at all
        (threaded mode: no thread is started for it; a pool still being built has none)."""
        raise NotImplementedError

    def _wake_filler(self) -> None:
        """Connections are missing below min_size: open them soon, off the probes' path."""
        raise NotImplementedError

    def _reset_after_fork(self) -> None:
        raise NotImplementedError

    def _probe_on_demand(self, now: float, deadline: float, readonly: bool) -> None:
        """A request found no endpoint up: if a probe of an endpoint that could serve it is due
        or just started, give it up to its grace to re-admit its endpoint, and no later than
        the request's ``deadline`` (process mode runs it; threaded mode waits)."""
        raise NotImplementedError

    def _could_serve(self, ep: Endpoint, readonly: bool) -> bool:
        """Is a probe of ``ep`` worth a request's wait? A write needs the primary; in the
        candidate form any node's probe may find it (roles.py). A read may fall back to it."""
        return readonly or self._discover or ep.role == PRIMARY

    def _housekeep_now(self, now: float, deadline: float = INFINITY) -> None:
        """Housekeeping run by a caller (process mode), which may spend on it no later than
        ``deadline``."""
        self._hk_due = self._housekeep(now)

    # One comparison on the hot path, ``now >= self._due``, covers all that a checkout may have
    # to do first: housekeeping that is due (process mode), a look at the shared board (at most
    # every BOARD_EVERY: a change another process made is seen within a millisecond, for a few
    # nanoseconds a checkout), and a closed pool (_due stays 0).
    _due = 0.0
    _hk_due = float("inf")

    def _tick(self, now: float, deadline: float = INFINITY) -> None:
        """What a caller does when ``_due`` comes: ``deadline`` is its own."""
        if self._board is not None and self._board_seq[0] != self._board_seen:
            self._sync_board()
        if now >= self._hk_due and not self._closed:
            self._housekeep_now(now, deadline)
        if self._closed:
            self._due = 0.0
        else:
            self._due = min(self._hk_due, now + BOARD_EVERY) if self._board is not None else self._hk_due


class Checkout:
    """One loan of a connection: ``with pool.connection() as conn``. It may be entered again once
    the block is left; in process mode ``connection()`` hands out the same one while it is free."""

    __slots__ = ("_pool", "_readonly", "_timeout", "_query_timeout", "_after", "_special", "_rec")

    def __init__(self, pool: Pool, readonly: bool, timeout: float | None, query_timeout: Any,
                 after: int | None = None) -> None:
        self._pool = pool
        self._readonly = readonly
        self._timeout = timeout
        self._query_timeout = query_timeout
        self._after = after
        self._special = query_timeout is not _DEFAULT  # the loan needs Pool._lend (as does one
        #                                               that fetchone & co left in autocommit)
        self._rec: PooledConnection | None = None

    def __enter__(self) -> Any:
        if self._rec is not None and self._rec is not ISSUED:
            raise PoolError("this connection() context is already in use")
        pool = self._pool
        if self._after is None:
            rec = pool._checkout(self._readonly, self._timeout)
        else:
            rec = pool._checkout_after(self._after, self._timeout)
        if self._special or rec.maybe_autocommit or self._readonly and rec.endpoint.role == PRIMARY:
            pool._lend(rec, self._readonly, self._query_timeout,
                       pool.options.timeout if self._timeout is None else self._timeout)
        self._rec = rec
        return rec.raw

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        rec, self._rec = self._rec, None
        self._pool._checkin(rec, exc, self._readonly)

    @property
    def endpoint(self) -> str | None:
        """The name of the endpoint lending the connection, while in the block."""
        return self._rec.endpoint.name if self._rec is not None else None


# One at-fork hook for the module, over a weak set of live pools: os.register_at_fork() cannot
# unregister, so a hook per pool would pile up for every pool ever made.
_LIVE_POOLS: "weakref.WeakSet[Pool]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Runs in the child of every fork(); each pool starts over with connections of its own."""
    WATCHDOG.after_fork_in_child()
    board_after_fork()
    for pool in list(_LIVE_POOLS):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
