"""The two modes: the only places where locking, waiting and housekeeping differ.

``threaded``: one pool shared by a process's threads. A lock guards the state; a caller that
finds no connection joins a FIFO queue and blocks until one is handed to it directly (so a
newcomer cannot barge ahead) or its deadline passes. A daemon thread, started on first need,
runs the non-blocking housekeeping jobs; another, started only when there is something to fill,
opens ``min_size`` connections, so a slow connect never delays a probe.

``process``: one pool per single-threaded worker process. No lock, no housekeeping thread:
housekeeping runs on checkouts when it is due, and exhaustion raises PoolTimeout at once, because
no other thread of this process could ever return a connection. A second thread taking a loan
while one is out is refused with PoolError: without a lock the pool would lend one connection
twice. (The watchdog thread, watchdog.py, is the one thread every mode has.)
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
import weakref
from typing import Any

from .config import MODES, REPLICA
from .balance import RoundRobin
from .connection import PooledConnection
from .core import _DEFAULT, _STATUS_READY, INFINITY, ISSUED, Checkout, Pool
from .endpoint import PROBE_GRACE, UP, Reservation
from .errors import EndpointUnavailable, PoolError, PoolTimeout
from .housekeeping import log_failure
from .probe import wait_any, wait_for

log = logging.getLogger("pool")
monotonic = time.monotonic
get_ident = threading.get_ident


def mode_class(mode: Any) -> type[Pool] | None:
    name = MODES.get(mode) if isinstance(mode, str) else None
    return {"threaded": ThreadedPool, "process": ProcessPool}.get(name)  # type: ignore[arg-type]


class _NoLock:
    """Process mode's stand-in for the lock in the shared slow paths."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _Last:
    """Process mode's "thread-local" data: there is one thread."""

    __slots__ = ("endpoint",)

    def __init__(self) -> None:
        self.endpoint: str | None = None


class _Loan(Checkout):
    """Process mode's reusable ``with pool.connection()`` handle, with the lock-free fast path.

    The steady state (nothing due, the owner thread, a fresh idle connection on the endpoint
    the loan goes to, a clean return) runs in ``__enter__`` and ``__exit__`` themselves, with none
    of the calls the threaded mode needs for its lock; anything else takes the shared way
    (Checkout.__enter__ and Pool._checkin), which decides everything again from scratch, so the
    fast path only ever takes what the shared one would have.
    """

    __slots__ = ()

    def __enter__(self) -> Any:
        pool = self._pool
        now = monotonic()
        if now < pool._due and self._rec is ISSUED and get_ident() == pool._owner:
            rr = None
            if not self._readonly:
                eps = pool._writable
                ep = eps[0] if eps else None
            elif pool._readable and pool._round_robin:
                eps = pool._readable
                rr = pool._balance
                ep = eps[rr.next % len(eps)]
                if ep.role != REPLICA:  # a read the primary lends is made read-only: _lend
                    ep = None
            else:
                ep = None
            idle = ep.idle if ep is not None else None
            if idle:
                rec = idle[-1]
                if rec.generation == ep.generation and now - rec.last_used <= pool._check_after \
                        and now < rec.expires and not rec.maybe_autocommit:  # (helpers: _lend)
                    idle.pop()
                    if rr is not None:
                        rr.next += 1
                    rec.last_used = now
                    ep.checkouts += 1
                    pool._local.endpoint = ep
                    self._rec = rec
                    return rec.raw
        return Checkout.__enter__(self)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        # The handle lets go first: an interrupt from here on leaves the connection to the
        # slot's weak reference, not to a handle the pool keeps (ProcessPool.connection).
        rec, self._rec = self._rec, None
        raw = rec.raw
        ep = rec.endpoint
        # psycopg2's word that no transaction is open is enough for a block (its autocommit is
        # off unless the block switched it, which marks it dirty); Pool._checkin asks libpq too.
        if exc is None and not raw.dirty and raw.status == _STATUS_READY \
                and rec.generation == ep.generation and not self._pool._closed:
            ep.idle.append(rec)
        else:
            self._pool._checkin(rec, exc, self._readonly)


class ProcessPool(Pool):
    """One pool per single-threaded worker process (gunicorn ``sync`` workers, uWSGI, ...)."""

    _take = Pool._take_locked  # nothing to lock: the shared code calls them directly
    _put = Pool._put_locked
    _probes_in_background = False  # only requests step probes here

    def _waiting_count(self) -> int:
        return 0  # nobody ever waits

    def _init_mode(self) -> None:
        self._lock = _NoLock()
        self._local = _Last()  # one thread: no thread-local needed
        self._hk_due = 0.0
        self._owner = get_ident()
        self._new_handles()
        self._round_robin = isinstance(self._balance, RoundRobin)

    def _new_handles(self) -> None:
        # connection() with no options returns one of these when it is free: no allocation.
        self._handles = (_Loan(self, False, None, _DEFAULT), _Loan(self, True, None, _DEFAULT))
        self._unheld = self._references(False)  # nobody but the pool holds them yet

    def _references(self, readonly: bool) -> int:
        handle = self._handles[readonly]  # (the same steps as connection(), so the same count)
        return sys.getrefcount(handle)

    def connection(self, readonly: bool = False, timeout: float | None = None,
                   query_timeout: Any = _DEFAULT, after: str | None = None) -> Checkout:
        handle = self._handles[readonly]
        if handle._rec is None:
            if timeout is None and query_timeout is _DEFAULT and after is None:
                handle._rec = ISSUED  # free again on leaving its block; until then, others get
                return handle         # new ones (one thread: nobody else can be using it)
        elif sys.getrefcount(handle) <= self._unheld:
            self._reclaim(handle)  # taken, yet nobody holds it, not even a `with`: see below
        return Pool.connection(self, readonly, timeout, query_timeout, after)

    def _reclaim(self, handle: _Loan) -> None:
        """An asynchronous exception (a signal handler's timeout) that lands as a block's
        __exit__ starts, or between connection() and the `with`, leaves the reusable handle
        taken for good, and with it the connection it lent: unlike a Checkout, which nobody
        keeps, the pool holds its handles. A handle is in use only while a `with` (or the
        caller) holds it, so one that only the pool holds is freed. Its connection is closed,
        not lent again: code that called __enter__() by hand and kept only the connection may
        still be using it, and a closed connection tells it so, where a shared one would not."""
        rec, handle._rec = handle._rec, None
        if rec.__class__ is PooledConnection:
            self._discard(rec)


    def _check_owner(self) -> None:
        # One thread only. A different thread is fine once nothing is lent (a worker may hand
        # its pool on); while a loan is out it is a bug that would share a connection.
        if any(ep.in_use or ep.pending for ep in self._endpoints):
            raise PoolError(
                "a process-mode pool is being used by two threads at once (a second thread took "
                "a connection while another thread's loan is out); process mode has no lock and "
                "would lend one connection twice: use mode=\"threaded\" when threads share a pool")
        self._owner = get_ident()

    def _wait(self, readonly: bool, deadline: float, now: float, queued: Any = None) -> Any:
        self._timeouts += 1
        self._wait_target(readonly).timeouts += 1
        raise self._timeout_error(readonly, None)

    def _serve_waiters(self) -> None:
        pass

    def _start_housekeeping(self) -> None:
        pass  # checkouts run it when due

    def _housekeep_now(self, now: float, deadline: float = INFINITY) -> None:
        # Advance the due time first: if a job raises anyway, the next request must not repeat it.
        self._hk_due = now + 1.0
        self._until = deadline  # the jobs that wait (a min_size connect, a cancel request's
        try:                    # login) stop there, and go on in a later request
            self._hk_due = self._housekeep(now)
            if self._fill_wanted:
                if deadline <= now:  # a caller with no time to host a connect (stats()): the
                    self._hk_due = now  # next request fills, within its own timeout
                elif not self._job_fill_min_size(now):
                    self._hk_due = min(self._hk_due, max(now, self._fill_retry_at))
                else:
                    self._fill_wanted = False
        finally:
            self._until = INFINITY
        self._due = min(self._due, self._hk_due)
        if not self._probing:
            self._release_probe_leases()

    _probing = False

    def _release_probe_leases(self) -> None:
        """Between requests nobody attends this worker's probes: let another process's request
        take the lease meanwhile (this worker goes on with its probe only if it gets it back)."""
        for ep in self._endpoints:
            if ep.probe is not None:
                self._end_probe(ep)

    def _probe_on_demand(self, now: float, deadline: float, readonly: bool) -> None:
        """With no thread, nothing probes between requests. So a request that needs a down
        endpoint starts its due probe and gives it what is left of its grace (Endpoint.probe_left),
        until its own deadline at most: if the server is fine (a lost session was a false alarm)
        or back (the worker sat idle through the outage), that request succeeds instead of
        failing fast. A probe cut short by a request's deadline goes on in the next request.
        One older than connect_timeout proves nothing if it was left unattended that long
        (this worker had no requests) or nobody waits for it any more (overdue: its connect may
        sit in TCP's backoff after a black hole, stepped a little on every request): it is
        started afresh."""
        ct = self.options.connect_timeout
        for ep in self._endpoints:
            probe = ep.probe
            if probe is not None and (now - probe.stepped > ct or now - probe.started > ct
                                      and ep.probe_left(probe) <= 0):
                probe.cancel()
                ep.probe = None
                ep.retry_at = now
        self._probing = True
        try:
            self._housekeep_now(now, deadline)  # starts due probes, steps running ones
            while True:
                t = monotonic()
                young = [ep for ep in self._endpoints if ep.awaiting_probe(t)
                         and ep.probe is not None and self._could_serve(ep, readonly)]
                if not young or t >= deadline:
                    return
                wait_for([ep.probe for ep in young], monotonic,
                         until=min(deadline, t + max(ep.probe_left(ep.probe) for ep in young)))
                self._housekeep_now(monotonic(), deadline)  # re-admits those that answered
        finally:
            self._probing = False
            self._release_probe_leases()

    def _wake_housekeeper(self) -> None:
        self._hk_due = self._due = 0.0  # run at the next checkout

    _hurry_housekeeper = _wake_housekeeper

    def _wake_filler(self) -> None:
        self._fill_wanted = True
        self._hk_due = self._due = 0.0

    _fill_wanted = False

    def _reset_after_fork(self) -> None:
        self._local = _Last()
        self._hk_due = self._due = 0.0
        self._owner = get_ident()
        self._new_handles()


class _Waiter:
    """A caller queued for a connection. ``ready`` is released when ``grant`` or ``error`` is set.

    Each thread keeps one and reuses it (its lock is held again whenever the thread is back from
    waiting), so waiting allocates nothing.
    """

    __slots__ = ("readonly", "ready", "grant", "error", "deadline")

    def __init__(self) -> None:
        self.ready = threading.Lock()
        self.ready.acquire()
        self.readonly = False
        self.deadline = 0.0
        self.grant: Any = None
        self.error: BaseException | None = None


class ThreadedPool(Pool):
    """One pool shared by the threads of a process (gunicorn ``gthread`` workers, ...)."""

    # The housekeeping thread keeps time, not checkouts (_hk_due stays infinite); a checkout
    # still looks at the shared board now and then (Pool._tick).

    def _init_mode(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        # Waiting callers, oldest first: one queue for writes, one for reads. Each is served from
        # its head only, so a return costs O(1) whatever the queue's length, and neither kind
        # holds up the other (a write waiter must not hold up reads that a replica could serve).
        self._queues: tuple[collections.deque[_Waiter], collections.deque[_Waiter]] = (
            collections.deque(), collections.deque())
        self._fill_batch = self.options.min_size * len(self._endpoints)
        self._wakeup = threading.Event()
        self._thread_lock = threading.Lock()
        self._housekeeper: threading.Thread | None = None
        self._filler: threading.Thread | None = None

    def _waiting_count(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])

    def _take(self, readonly: bool, among: tuple | None = None) -> Any:
        """An idle connection, a reservation, or, when nothing is free, this caller's place in
        line (its waiter, queued in the same critical section: one lock for the whole miss)."""
        with self._lock:
            grant = self._take_locked(readonly, among)
            if grant is None:
                limit = self.options.max_waiting
                if not limit or self._waiting_count() < limit:
                    return self._enqueue_locked(readonly, monotonic() + self.options.timeout)
            return grant

    def _enqueue_locked(self, readonly: bool, deadline: float) -> _Waiter:
        waiter = getattr(self._local, "waiter", None)
        if waiter is None:
            waiter = self._local.waiter = _Waiter()
        waiter.readonly, waiter.deadline = readonly, deadline
        self._queues[readonly].append(waiter)
        self._waits += 1
        self._wait_target(readonly).waits += 1
        return waiter

    def _put(self, rec: PooledConnection) -> bool:
        with self._lock:
            queues = self._queues
            if queues[0] or queues[1]:
                # The oldest waiter that can use it gets it straight from the hand that returns
                # it (the common case); anything else goes through idle and the general serve.
                ep = rec.endpoint
                queue = queues[0] if ep is self._primary else queues[1] if ep in self._readable \
                    else None
                if queue and not self._closed and ep.state is UP:
                    waiter = queue[0]
                    if waiter.grant is None and waiter.error is None:
                        waiter.grant = rec
                        queue.popleft()
                        waiter.ready.release()
                        return True
                if not self._put_locked(rec):
                    return False
                self._serve_waiters()
                return True
            return self._put_locked(rec)

    def _wait(self, readonly: bool, deadline: float, now: float, queued: Any = None) -> Any:
        queue = self._queues[readonly]
        if queued is not None:
            waiter = queued
            waiter.deadline = deadline
        else:
            with self._lock:
                grant = self._take_locked(readonly)  # a connection may have come back meanwhile
                if grant is not None:
                    return grant
                limit = self.options.max_waiting
                if limit and self._waiting_count() >= limit:
                    self._timeouts += 1
                    raise PoolTimeout(f"{self._waiting_count()} callers already waiting "
                                      f"(max_waiting={limit}); not queueing another")
                waiter = self._enqueue_locked(readonly, deadline)
        try:
            remaining = deadline - monotonic()
            served = remaining > 0 and waiter.ready.acquire(timeout=remaining)
        except BaseException:  # interrupted (a signal handler's timeout, ^C): leave no trace
            self._leave(waiter)
            raise
        if not served:
            with self._lock:
                if waiter.grant is None and waiter.error is None:  # not served in the meantime
                    if waiter in queue:  # (an interrupted hand-over may have taken it out)
                        queue.remove(waiter)
                    self._timeouts += 1
                    self._wait_target(readonly).timeouts += 1
                    raise self._timeout_error(readonly, deadline - now)
            waiter.ready.acquire(blocking=False)  # served just after the deadline: hold it again
        grant, error = waiter.grant, waiter.error
        waiter.grant = waiter.error = None
        if error is not None:
            raise error
        return grant

    def _abandon_wait(self) -> None:
        waiter = getattr(self._local, "waiter", None)
        if waiter is not None and (waiter.grant is not None or waiter in self._queues[waiter.readonly]):
            self._leave(waiter)

    def _leave(self, waiter: _Waiter) -> None:
        """An interrupted waiter leaves the queue; whatever it was granted meanwhile goes back."""
        self._local.waiter = None  # its lock is in an unknown state: a new one next time
        queue = self._queues[waiter.readonly]
        with self._lock:
            if waiter in queue:
                queue.remove(waiter)
                return
            grant, waiter.grant = waiter.grant, None
        if grant is not None:
            self._give_back(grant)

    def _give_back_locked(self, grant: Any) -> None:
        """Lock held. What a waiter that is gone had been handed: back to the pool."""
        if grant.__class__ is Reservation:
            grant.endpoint.release(grant.key)
        else:
            grant.endpoint.idle.append(grant)

    def _serve_waiters(self) -> None:
        """Lock held. Hand connections (or slots, or errors) to waiters, oldest first.

        An error is not served while a probe that could clear it is young (Endpoint.grace): one
        terminated session must not fail every queued caller before its immediate probe
        re-admits the endpoint.
        """
        now = monotonic()
        for kind, queue in ((False, self._queues[0]), (True, self._queues[1])):
            while queue:
                waiter = queue[0]
                if waiter.deadline < now - 1.0:  # its thread left without leaving the line
                    queue.popleft()
                    if waiter.grant is not None:
                        self._give_back_locked(waiter.grant)
                        waiter.grant = None
                    continue
                if waiter.grant is None and waiter.error is None:
                    try:
                        grant = self._take_locked(kind)
                    except PoolError as exc:  # no endpoint can serve this kind, or the pool closed
                        # (Only the pool's own errors: anything else, such as a signal handler's
                        # exception landing here, belongs to this thread, not to the waiter.)
                        if isinstance(exc, EndpointUnavailable) and self._grace_pending(now) \
                                and not self._closed:
                            break
                        waiter.error = exc
                    else:
                        if grant is None:
                            break
                        waiter.grant = grant
                # (else: served by a hand-over an interrupt cut short: finish it)
                queue.popleft()
                waiter.ready.release()

    def _start_housekeeping(self) -> None:
        thread = self._housekeeper
        if thread is not None and thread.is_alive() or self._closed:
            return
        # Started on first need, not in __init__: a pool made in a parent that then forks
        # (gunicorn --preload) should not leave a thread behind in the parent. One at a time:
        # two would step the same probes and monitors. (Its own lock: callers may hold the pool's.)
        with self._thread_lock:
            thread = self._housekeeper
            if thread is None or not thread.is_alive():
                thread = threading.Thread(target=_housekeeper_main, args=(weakref.ref(self),),
                                          name="pool-housekeeping", daemon=True)
                self._housekeeper = thread
                thread.start()

    def _wake_housekeeper(self) -> None:
        self._start_housekeeping()
        self._wakeup.set()

    def _hurry_housekeeper(self) -> None:
        self._wakeup.set()  # (a thread started later runs its first round at once anyway)

    def _wake_filler(self) -> None:
        with self._lock:
            thread = self._filler
            if thread is not None and thread.is_alive() or self._closed:
                return
            self._filler = thread = threading.Thread(
                target=_filler_main, args=(weakref.ref(self),), name="pool-fill", daemon=True)
        thread.start()

    def _probe_on_demand(self, now: float, deadline: float, readonly: bool) -> None:
        """The housekeeping thread runs the probes; a request that needs a down endpoint waits
        while a probe of one that could serve it is due or younger than its grace, at most
        that one's Endpoint.probe_wait and no later than its deadline. Later requests fail at
        once while a slow probe (a black hole) goes on in the background."""
        self._wake_housekeeper()
        eps = [ep for ep in self._endpoints if self._could_serve(ep, readonly)]
        end = min(now + max((ep.probe_wait for ep in eps), default=0.0), deadline)
        while True:
            t = monotonic()
            with self._lock:
                young = self._grace_pending(t, eps)
            if not young or t >= end:
                return
            time.sleep(0.001)  # the outcome is one housekeeping step away

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._queues = (collections.deque(), collections.deque())
        self._wakeup = threading.Event()
        self._thread_lock = threading.Lock()
        self._housekeeper = None  # threads do not survive fork(); restarted on first need
        self._filler = None


def _housekeeper_main(ref: "weakref.ref[ThreadedPool]") -> None:
    """The housekeeping thread. Holds the pool weakly, so an unclosed pool can still be freed."""
    while True:
        pool = ref()
        if pool is None or pool._closed:
            return
        wakeup = pool._wakeup
        wakeup.clear()  # before the run: a wake-up during it makes the wait below return at once
        try:
            due = pool._housekeep(monotonic())
        except Exception:  # never let housekeeping die: probes must go on
            log_failure("pool housekeeping failed; retrying in a second")
            due = monotonic() + 1.0
        probes = [ep.probe for ep in pool._endpoints if ep.probe is not None]
        if pool._waiting_count():  # waiters given probe grace: look again when it runs out
            due = min(due, monotonic() + PROBE_GRACE / 2)
        del pool
        if probes:  # wake when a probe's socket is ready, not after a fixed sleep
            wait_any(probes, due - monotonic())
        else:
            wakeup.wait(timeout=max(0.0, due - monotonic()))


def _filler_main(ref: "weakref.ref[ThreadedPool]") -> None:
    """Opens min_size connections, then ends; restarted when more are needed."""
    while True:
        pool = ref()
        if pool is None or pool._closed or not pool._fill_needed():
            return
        now = monotonic()
        if pool._job_fill_min_size(now):
            continue
        wait = max(0.05, pool._fill_retry_at - now)
        del pool
        time.sleep(min(wait, 1.0))
