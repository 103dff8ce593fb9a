"""The pool's policy: routing, checkout and return, ejection and re-admission.

Everything here is shared by both modes; ``modes.py`` supplies only what differs (the lock,
waiting, and who runs housekeeping; see "what the modes provide" below). Methods documented
"lock held" run under the pool lock in threaded mode; in process mode a single thread uses the
pool and there is no lock.

Checkout path::

    connection() ─► _checkout ─► _take: route (writes: the primary; reads: a replica chosen by
                        │               the balancer, or the primary if none is up), then pop an
                        │               idle connection or reserve a slot for a new one
                        ├─ fresh idle connection (used < check_after ago) ─► handed out
                        └─ _checkout_slow ─┬─ none free: _wait (threaded: FIFO, deadline;
                                           │                   process: PoolTimeout at once)
                                           ├─ reserved slot: _open, outside the lock
                                           └─ idle a while: _is_usable (local socket check,
                                                            a ping if idle very long)
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any, Callable, Sequence

import psycopg2
import psycopg2.extensions as ext

from .balance import make_balancer
from .config import EndpointSpec, Options, Redactor, endpoint_configs, options_from_env
from .connection import PooledConnection, describe_error, is_disconnect, open_connection
from .endpoint import UP, Endpoint
from .errors import EndpointUnavailable, PoolError, PoolTimeout
from .housekeeping import Housekeeping
from .probe import OK, Probe, wait_for

log = logging.getLogger("pool")
monotonic = time.monotonic

_STATUS_READY = ext.STATUS_READY  # psycopg2: no transaction open on this connection
_TX_IDLE = ext.TRANSACTION_STATUS_IDLE
_TX_INERROR = ext.TRANSACTION_STATUS_INERROR


class Pool(Housekeeping):
    """A PostgreSQL connection pool over one primary and zero or more read replicas.

    Writes go to the primary; ``readonly=True`` work goes to a healthy replica, balanced, in a
    read-only session. An endpoint that fails is skipped by everyone at once and re-admitted
    after a successful probe. ``mode="threaded"`` shares one pool between the threads of a
    process (lock, FIFO wait with deadline, a housekeeping thread); ``mode="process"`` gives each
    single-threaded worker process its own pool (no lock, no thread; exhaustion fails at once).

    Example::

        p = Pool("host=db1 dbname=app user=app", replicas=["host=db2 ...", "host=db3 ..."])
        with p.connection() as conn:                  # the primary; commits on success
            conn.cursor().execute("INSERT ...")
        row = p.fetchone("SELECT ...", (42,), readonly=True)   # a replica; retried once
    """

    def __new__(cls, *args: Any, mode: str = "threaded", **kwargs: Any) -> "Pool":
        if cls is Pool:  # pick the mode's class; Options() rejects an unknown mode
            from .modes import mode_class
            cls = mode_class(mode) or cls
        return super().__new__(cls)

    def __init__(
        self,
        primary: EndpointSpec,
        replicas: Sequence[EndpointSpec] = (),
        *,
        mode: str = "threaded",
        max_size: int = 10,
        min_size: int = 0,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_lifetime: float = 1800.0,
        max_idle: float = 300.0,
        check_after: float = 0.1,
        ping_after: float = 30.0,
        balance: str = "round_robin",
        read_fallback: bool = True,
        max_waiting: int = 0,
        configure: Callable[[Any], None] | None = None,
        reset: Callable[[Any], None] | None = None,
    ) -> None:
        self.options = opts = Options(
            mode=mode, max_size=max_size, min_size=min_size, timeout=timeout,
            connect_timeout=connect_timeout, max_lifetime=max_lifetime, max_idle=max_idle,
            check_after=check_after, ping_after=ping_after, balance=balance,
            read_fallback=read_fallback, max_waiting=max_waiting, configure=configure, reset=reset)
        configs = endpoint_configs(primary, replicas, opts)
        self._redact = Redactor([c.password for c in configs])
        self._endpoints = [Endpoint(c, opts.max_size) for c in configs]
        self._primary = self._endpoints[0]
        self._replicas = tuple(self._endpoints[1:])
        self._writable = (self._primary,)
        self._readable = self._replicas  # the replicas that are up, rebuilt on every state change
        self._balance = make_balancer(opts.balance)
        self._closed = False
        self._pid = os.getpid()
        self._waits = self._timeouts = 0
        self._check_after = opts.check_after  # read on every checkout: keep it one lookup away
        self._reset = opts.reset
        self._init_mode()
        # A pool inherited through fork() (gunicorn --preload) must not use the parent's
        # connections. The weak reference lets the pool be collected; the hook then does nothing.
        os.register_at_fork(after_in_child=lambda ref=weakref.ref(self): _after_fork(ref))
        self._probe_all_at_start()
        if opts.min_size:
            self._wake_housekeeper()  # open min_size connections per endpoint

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Pool":
        """Build a pool from environment variables; keyword arguments override them.

        ``POOL_PRIMARY`` (required) and ``POOL_REPLICAS`` (comma-separated) hold DSNs or URLs;
        ``POOL_<OPTION>`` sets any option, e.g. ``POOL_MODE=process``, ``POOL_MAX_SIZE=4``,
        ``POOL_READ_FALLBACK=false``.
        """
        primary, replicas, kwargs = options_from_env(os.environ if environ is None else environ)
        kwargs.update(overrides)
        return cls(primary, replicas, **kwargs)

    # -- public API --------------------------------------------------------------------------

    def connection(self, readonly: bool = False, timeout: float | None = None) -> "Checkout":
        """A context manager lending a psycopg2 connection for the ``with`` block.

        Leaving the block normally commits; an exception rolls back and propagates. With
        ``readonly=True`` the connection is to a replica (or the primary if none is up and
        ``read_fallback``) and its transactions are read-only. ``timeout`` overrides the pool's.
        """
        return Checkout(self, readonly, timeout)

    def fetchone(self, sql: str, params: Any = None, readonly: bool = False) -> tuple | None:
        """Run one statement and return its first row (or None). Reads are retried once."""
        return self._run(sql, params, readonly, _fetchone)

    def fetchall(self, sql: str, params: Any = None, readonly: bool = False) -> list[tuple]:
        """Run one statement and return all its rows. Reads are retried once."""
        return self._run(sql, params, readonly, _fetchall)

    def execute(self, sql: str, params: Any = None) -> int:
        """Run one statement on the primary and commit; return the row count. Never retried."""
        return self._run(sql, params, False, _rowcount)

    @property
    def last_endpoint(self) -> str | None:
        """Name of the endpoint that served this thread's latest checkout (for logs, headers);
        None after a fetchone/fetchall/execute that failed."""
        return getattr(self._local, "endpoint", None)

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for the pool and each endpoint. Never contains a password."""
        now = monotonic()
        if now >= self._due and not self._closed:
            self._housekeep_now(now)
        with self._lock:
            eps = [ep.stats(now) for ep in self._endpoints]
            waiting = len(self._waiters)
        total = lambda key: sum(e[key] for e in eps)  # noqa: E731
        return {
            "mode": self.options.mode, "pid": os.getpid(), "closed": self._closed,
            "max_size": self.options.max_size, "min_size": self.options.min_size,
            "size": total("size"), "idle": total("idle"), "in_use": total("in_use"),
            "waiting": waiting, "checkouts": total("checkouts"), "waits": self._waits,
            "timeouts": self._timeouts, "connects": total("connects"),
            "connect_errors": total("connect_errors"), "ejections": total("ejections"),
            "endpoints": eps,
        }

    def close(self) -> None:
        """Close idle connections, stop housekeeping, fail waiters. In-use ones close on return."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            doomed, probes = [], []
            for ep in self._endpoints:
                doomed += self._drop_idle_locked(ep)
                if ep.probe is not None:
                    probes.append(ep.probe)
                    ep.probe = None
            self._serve_waiters()
        self._wake_housekeeper()
        for probe in probes:
            probe.cancel()
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
    # Anything unusual (no idle connection, a check to run, an open transaction) takes the
    # *_slow path, which handles every case and is where correctness is argued.

    def _checkout(self, readonly: bool, timeout: float | None) -> PooledConnection:
        now = monotonic()
        if now >= self._due:  # process mode: housekeeping rides on checkouts
            self._housekeep_now(now)
        try:
            rec = self._take(readonly)
        except EndpointUnavailable:
            rec = self._take_after_probe(readonly)
        if not (rec.__class__ is PooledConnection and rec.generation == rec.endpoint.generation
                and now - rec.last_used <= self._check_after and now < rec.expires
                and not rec.raw.closed):
            rec = self._checkout_slow(readonly, timeout, rec, now)
        rec.last_used = now  # idle time counts from the checkout: errs towards checking more
        ep = rec.endpoint
        ep.checkouts += 1
        self._local.endpoint = ep.name
        if readonly:
            if rec.readonly is None and ep is self._primary:  # fallback read on the primary
                rec.raw.readonly = rec.readonly = True
        elif rec.readonly is not None:
            rec.raw.readonly = rec.readonly = None
        return rec

    def _checkout_slow(self, readonly: bool, timeout: float | None, grant: Any,
                       now: float) -> PooledConnection:
        """Wait if need be, connect in a reserved slot, or vet an idle connection; loop until a
        connection is ready, an error says why none can be, or the deadline passes."""
        deadline = now + (self.options.timeout if timeout is None else timeout)
        while True:
            if grant is None:
                grant = self._wait(readonly, deadline, now)
            if grant.__class__ is Endpoint:
                rec = self._open(grant)
            else:
                rec = grant if self._is_usable(grant, now) else None
            if rec is not None:
                return rec
            # A connection was dropped or an endpoint ejected: route again. This ends: each turn
            # discards an idle connection or ejects an endpoint, and _wait keeps the deadline.
            now = monotonic()
            try:
                grant = self._take(readonly)
            except EndpointUnavailable:
                grant = self._take_after_probe(readonly)

    def _take_after_probe(self, readonly: bool) -> Any:
        """No endpoint is up for this request. If one is being probed right now (say, after a
        lost session), give the probe a moment (PROBE_GRACE), then route once more: raises
        EndpointUnavailable, with the state as it is then, if nothing came back."""
        self._probe_on_demand(monotonic())
        return self._take(readonly)

    def _take_locked(self, readonly: bool) -> Any:
        """Lock held. An idle connection, an endpoint with a slot reserved, or None if all full.

        Raises EndpointUnavailable when no endpoint can serve the request at all.
        """
        if self._closed:
            raise PoolError("the pool is closed")
        first = 0
        if readonly and self._readable:
            candidates = self._readable
            first = self._balance(candidates)
        elif self._primary.state is UP and (not readonly or self.options.read_fallback):
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
            if ep.size < ep.max_size:
                ep.size += 1
                ep.connecting += 1
                return ep
            i = i + 1 if i + 1 < len(candidates) else 0
            if i == first:
                return None

    def _wait_target(self, readonly: bool) -> Endpoint:
        """The endpoint a waiter is counted against in stats (waits, timeouts)."""
        if readonly and self._readable:
            return min(self._readable, key=lambda ep: ep.in_use)
        return self._primary

    def _open(self, ep: Endpoint) -> PooledConnection | None:
        """Connect in a slot _take reserved. None if the endpoint failed (and was ejected)."""
        self._start_housekeeping()  # connections now exist: they will need looking after
        try:
            raw = open_connection(ep, self.options.configure)
        except BaseException as exc:
            with self._lock:
                ep.size -= 1
                ep.connecting -= 1
                ep.connect_errors += 1
                self._serve_waiters()
            if not isinstance(exc, psycopg2.OperationalError):
                raise  # not the server's fault: a bug in configure(), a bad option, ^C
            self._eject(ep, f"connect failed: {describe_error(exc)}")
            return None
        rec = PooledConnection(raw, ep, monotonic(), self.options.max_lifetime)
        with self._lock:
            ep.connecting -= 1
            ep.connects += 1
        log.debug("opened a connection to %s %s (size %d)", ep.role, ep.name, ep.size)
        return rec

    def _is_usable(self, rec: PooledConnection, now: float) -> bool:
        """Cheap local checks always; a socket check or a ping only after idling a while."""
        ep = rec.endpoint
        if rec.generation != ep.generation or now >= rec.expires or rec.raw.closed:
            self._discard(rec)
            return False
        idle_for = now - rec.last_used
        if idle_for > self.options.check_after and (
                rec.closed_by_server() or idle_for > self.options.ping_after and not rec.ping()):
            # The server ended an idle session: it may be shutting down or gone. Probe it before
            # anyone waits on a connect to it (a dead host can take connect_timeout to refuse).
            self._discard(rec)
            self._eject(ep, "the server closed an idle session", probe_now=True)
            return False
        return True

    # -- return -------------------------------------------------------------------------------

    def _checkin(self, rec: PooledConnection, exc: BaseException | None) -> None:
        # The generation check sends to the slow path both a connection made before its
        # endpoint's last failure and one lent before a fork() (the child bumps generations).
        raw = rec.raw
        if not (exc is None and rec.generation == rec.endpoint.generation and not raw.closed
                and raw.status == _STATUS_READY and not raw.autocommit
                and raw.readonly is rec.readonly and self._reset is None and self._put(rec)):
            self._checkin_slow(rec, exc)

    def _checkin_slow(self, rec: PooledConnection, exc: BaseException | None) -> None:
        """End the transaction (commit on success, rollback on error) and give the connection
        back, or discard it if it is broken or in a state we cannot vouch for."""
        raw = rec.raw
        if rec.pid != self._pid:  # lent before a fork(): the parent's, and not counted here
            rec.abandon()
            return
        if raw.closed:
            self._discard(rec, cause=exc if raw.closed == 2 else None)
            if exc is None and raw.closed == 2:
                ep = rec.endpoint
                raise EndpointUnavailable(
                    f"{ep.role} {ep.name}: the connection was lost inside the block; work not "
                    f"yet committed was lost", ep.name)
            return
        error: BaseException | None = None
        if raw.status != _STATUS_READY:  # a transaction is open
            try:
                if exc is not None:
                    raw.rollback()
                elif raw.get_transaction_status() == _TX_INERROR:
                    raw.rollback()
                    error = PoolError("the transaction had failed inside the block (an error was "
                                      "caught and ignored), so it was rolled back, not committed")
                else:
                    raw.commit()
            except psycopg2.Error as e:
                if exc is None:
                    error = e  # a failed commit must reach the caller; a failed rollback
                    #            must not hide the caller's own exception
        try:
            if raw.closed or raw.get_transaction_status() != _TX_IDLE:
                raise _Broken
            if raw.autocommit:  # restore what the block may have changed
                raw.autocommit = False
            if raw.readonly is not rec.readonly:
                raw.readonly = rec.readonly
            if self._reset is not None:
                self._reset(raw)
                if raw.get_transaction_status() != _TX_IDLE:
                    raise _Broken
            if rec.generation != rec.endpoint.generation or not self._put(rec):
                raise _Broken  # made before its endpoint's last failure, or the pool is closed
        except Exception:
            self._discard(rec, cause=error or exc)
        if error is not None:
            raise error

    def _put_locked(self, rec: PooledConnection) -> bool:
        """Lock held. Make an idle connection available; False if the pool is closed."""
        if self._closed:
            return False
        rec.endpoint.idle.append(rec)
        if self._waiters:
            self._serve_waiters()
        return True

    def _discard(self, rec: PooledConnection, cause: BaseException | None = None) -> None:
        """Drop a connection for good; if its session was lost, eject its endpoint too."""
        ep = rec.endpoint
        with self._lock:
            ep.size -= 1
            ep.discards += 1
            self._serve_waiters()
        rec.close()
        if cause is not None and is_disconnect(cause, rec.raw):
            self._eject(ep, f"connection lost: {describe_error(cause)}", probe_now=True)

    # -- endpoint state -----------------------------------------------------------------------

    def _eject(self, ep: Endpoint, error: str, probe_now: bool = False) -> None:
        """Mark an endpoint down: everyone skips it until a probe succeeds (see Endpoint)."""
        now = monotonic()
        error = self._redact(error)
        with self._lock:
            if not ep.mark_down(now, error, probe_now):
                return
            doomed = self._drop_idle_locked(ep)
            self._state_changed_locked()
        log.warning("%s %s is down, skipping it until a probe succeeds: %s", ep.role, ep.name, error)
        self._wake_housekeeper()
        for rec in doomed:
            rec.close()

    def _readmit(self, ep: Endpoint, now: float) -> None:
        with self._lock:
            ep.mark_up()
            self._state_changed_locked()
        log.info("%s %s is back after %.1fs down", ep.role, ep.name, now - ep.down_since)

    def _drop_idle_locked(self, ep: Endpoint) -> list[PooledConnection]:
        """Lock held. Take every idle connection of ep out of the pool, for closing outside."""
        doomed, ep.idle = ep.idle, []
        ep.size -= len(doomed)
        return doomed

    def _state_changed_locked(self) -> None:
        """Lock held. An endpoint went up or down: re-route reads, re-serve the waiters."""
        self._readable = tuple(r for r in self._replicas if r.state is UP)
        self._serve_waiters()

    def _probe_all_at_start(self) -> None:
        """Probe every endpoint at once and wait (at most connect_timeout) for the answers, so a
        pool starts knowing which servers are down without failing because of them."""
        now = monotonic()
        probes = [Probe(ep.dsn, now, self.options.connect_timeout) for ep in self._endpoints]
        wait_for(probes, monotonic)
        for ep, probe in zip(self._endpoints, probes):
            if probe.status != OK:
                self._eject(ep, f"unreachable at start: {probe.error}")

    # -- errors -------------------------------------------------------------------------------

    def _unavailable(self, readonly: bool) -> EndpointUnavailable:
        """Lock held. The error for a request no endpoint can serve, with every endpoint's state."""
        self._wake_housekeeper()
        now = monotonic()
        ep = self._primary
        if not readonly:
            return EndpointUnavailable(self._redact(
                f"primary {ep.name} is down (for {now - ep.down_since:.1f}s; next probe in "
                f"{max(0.0, ep.retry_at - now):.1f}s); last error: {ep.last_error}"), ep.name)
        if not self._replicas:
            why = "the primary is down and there are no replicas"
        elif ep.state is UP:
            why = "no replica is up and read_fallback is off"
        else:
            why = "no replica is up and the primary is down"
        states = "; ".join(e.describe(now) for e in self._endpoints)
        return EndpointUnavailable(self._redact(f"cannot serve reads: {why} [{states}]"))

    def _timeout_error(self, readonly: bool, waited: float | None) -> PoolTimeout:
        """Lock held. Exhaustion, with the pool's state so the reader can tell why."""
        now = monotonic()
        kind = "read" if readonly else "write"
        if waited is None:
            head = (f"no {kind} connection free in process mode: all connections are in use by "
                    f"this process, and nothing else could return one (a leak, or a nested "
                    f"checkout beyond max_size={self.options.max_size}?)")
        else:
            head = f"no {kind} connection became free within {waited:.2f}s"
        states = "; ".join(e.describe(now) for e in self._endpoints)
        return PoolTimeout(self._redact(
            f"{head} [mode={self.options.mode} waiting={len(self._waiters)}; {states}]"))

    # -- one-statement helpers ----------------------------------------------------------------

    def _run(self, sql: str, params: Any, readonly: bool, fetch: Callable[[Any], Any]) -> Any:
        """Run one statement in its own transaction; retry a read once if its endpoint is lost.

        A single statement needs no BEGIN/COMMIT round trips: it runs in autocommit, which
        PostgreSQL executes as one implicit transaction. Replicas' sessions are read-only by
        default; a read that falls back to the primary keeps psycopg2's BEGIN READ ONLY instead.
        """
        attempts = 2 if readonly else 1
        self._local.endpoint = None  # if this fails, last_endpoint must not name an older call's
        for attempt in range(attempts):
            rec = self._checkout(readonly, None)
            raw = rec.raw
            autocommit = rec.readonly is None
            try:
                if autocommit:
                    raw.autocommit = True
                with raw.cursor() as cur:
                    cur.execute(sql, params)
                    result = fetch(cur)
                if autocommit:
                    raw.autocommit = False
            except BaseException as exc:
                lost = raw.closed == 2 or is_disconnect(exc, raw)
                self._checkin(rec, exc)
                if not lost:
                    raise
                ep = rec.endpoint
                if attempt + 1 < attempts:
                    log.info("read on %s %s lost its connection; retrying elsewhere", ep.role, ep.name)
                    continue
                raise EndpointUnavailable(self._redact(
                    f"{ep.role} {ep.name}: connection lost during the statement "
                    f"({describe_error(exc)})" + ("" if readonly else
                                                  "; it may or may not have been applied")),
                    ep.name) from exc
            self._checkin(rec, None)
            return result
        raise AssertionError("unreachable")

    def _after_fork_in_child(self) -> None:
        self._pid = os.getpid()
        now = monotonic()
        for ep in self._endpoints:
            for rec in ep.idle:
                rec.abandon()
            # Connections lent at the fork are not counted: those of other threads never come
            # back here (the threads do not exist in the child), and the forking thread's are
            # abandoned if they do (the new generation sends them to _checkin_slow).
            ep.size = 0
            ep.idle = []
            ep.connecting = 0
            ep.generation += 1
            ep.reset_counters()
            if ep.probe is not None:
                ep.probe.abandon()
                ep.probe = None
                ep.retry_at = now
        self._waits = self._timeouts = 0
        self._reset_after_fork()

    # -- what the modes provide --------------------------------------------------------------
    #
    # _lock          the pool lock (process mode: a no-op stand-in)
    # _take, _put    _take_locked and _put_locked, under the lock (process mode: themselves)
    # _waiters       the FIFO of waiting callers (process mode: always empty)
    # _due           when housekeeping must next run on a checkout (threaded mode: never)
    # _local         per-thread data (process mode: a plain namespace)

    def _init_mode(self) -> None:
        raise NotImplementedError

    def _wait(self, readonly: bool, deadline: float, now: float) -> Any:
        """Block until _take would succeed; a grant, or PoolTimeout / EndpointUnavailable."""
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

    def _reset_after_fork(self) -> None:
        raise NotImplementedError

    def _probe_on_demand(self, now: float) -> None:
        """A request found no endpoint up: if a probe is due or just started, give it up to
        PROBE_GRACE to re-admit its endpoint (process mode runs it; threaded mode waits)."""
        raise NotImplementedError

    def _housekeep_now(self, now: float) -> None:
        self._due = self._housekeep(now)


class _Broken(Exception):
    """Internal: the connection cannot go back to the pool."""


class Checkout:
    """One loan of a connection: ``with pool.connection() as conn``. Single use."""

    __slots__ = ("_pool", "_readonly", "_timeout", "_rec")

    def __init__(self, pool: Pool, readonly: bool, timeout: float | None) -> None:
        self._pool = pool
        self._readonly = readonly
        self._timeout = timeout
        self._rec: PooledConnection | None = None

    def __enter__(self) -> Any:
        if self._rec is not None:
            raise PoolError("this connection() context is already in use")
        self._rec = self._pool._checkout(self._readonly, self._timeout)
        return self._rec.raw

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        rec, self._rec = self._rec, None
        self._pool._checkin(rec, exc)

    @property
    def endpoint(self) -> str | None:
        """The name of the endpoint lending the connection, while in the block."""
        return self._rec.endpoint.name if self._rec is not None else None


def _fetchone(cur: Any) -> Any:
    return cur.fetchone()


def _fetchall(cur: Any) -> Any:
    return cur.fetchall()


def _rowcount(cur: Any) -> int:
    return cur.rowcount


def _after_fork(ref: "weakref.ref[Pool]") -> None:
    """Runs in the child of every fork(); the pool starts over with connections of its own."""
    pool = ref()
    if pool is not None:
        pool._after_fork_in_child()
