"""The two modes: the only places where locking, waiting and housekeeping differ.

``threaded``: one pool shared by a process's threads. A lock guards the state; a caller that
finds no connection joins a FIFO queue and blocks until one is handed to it directly (so a
newcomer cannot barge ahead) or its deadline passes. A daemon thread, started on first need,
runs housekeeping.

``process``: one pool per single-threaded worker process. No lock, no thread: housekeeping runs
on checkouts when it is due, and exhaustion raises PoolTimeout at once, because no other thread
of this process could ever return a connection.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import types
import weakref
from typing import Any

from .config import MODES
from .connection import PooledConnection
from .core import Pool
from .errors import PoolTimeout
from .probe import wait_any, wait_for

log = logging.getLogger("pool")
monotonic = time.monotonic

# How long a request that needs a down endpoint waits for a probe that is due or has just
# started: a login on a LAN takes about 5 ms, so a server that is fine (a lost session was a false
# alarm) or back answers within it; one that does not is treated as down and requests fail fast.
PROBE_GRACE = 0.05


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


class ProcessPool(Pool):
    """One pool per single-threaded worker process (gunicorn ``sync`` workers, uWSGI, ...)."""

    _take = Pool._take_locked  # nothing to lock: the shared code calls them directly
    _put = Pool._put_locked
    _waiters = ()  # nobody ever waits

    def _init_mode(self) -> None:
        self._lock = _NoLock()
        self._local = types.SimpleNamespace(endpoint=None)  # one thread: a plain namespace
        self._fill_batch = 1  # fill runs inside a request here: one connect at a time
        self._due = 0.0

    def _wait(self, readonly: bool, deadline: float, now: float) -> Any:
        self._timeouts += 1
        self._wait_target(readonly).timeouts += 1
        raise self._timeout_error(readonly, None)

    def _serve_waiters(self) -> None:
        pass

    def _start_housekeeping(self) -> None:
        pass  # checkouts run it when due

    def _probe_on_demand(self, now: float) -> None:
        """With no thread, nothing probes between requests. So a request that needs a down
        endpoint starts its due probe and gives it PROBE_GRACE: if the server is fine (a lost
        session was a false alarm) or back (the worker sat idle through the outage), that
        request succeeds instead of failing fast. Once a probe is older than PROBE_GRACE (a
        black hole), requests fail at once and later checkouts keep stepping it."""
        self._housekeep_now(now)  # starts due probes, steps running ones
        young = [ep.probe for ep in self._endpoints if ep.awaiting_probe(now, PROBE_GRACE)]
        if young:
            wait_for(young, monotonic, until=max(p.started for p in young) + PROBE_GRACE)
            self._housekeep_now(monotonic())  # re-admits those that answered

    def _wake_housekeeper(self) -> None:
        self._due = 0.0  # run at the next checkout

    def _reset_after_fork(self) -> None:
        self._local = types.SimpleNamespace(endpoint=None)
        self._due = 0.0


class _Waiter:
    """A caller queued for a connection. ``ready`` is released when ``grant`` or ``error`` is set."""

    __slots__ = ("readonly", "ready", "grant", "error")

    def __init__(self, readonly: bool) -> None:
        self.readonly = readonly
        self.ready = threading.Lock()
        self.ready.acquire()
        self.grant: Any = None
        self.error: BaseException | None = None


class ThreadedPool(Pool):
    """One pool shared by the threads of a process (gunicorn ``gthread`` workers, ...)."""

    _due = float("inf")  # the housekeeping thread keeps time, not checkouts

    def _init_mode(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._fill_batch = self.options.min_size * (1 + len(self._replicas))
        self._wakeup = threading.Event()
        self._housekeeper: threading.Thread | None = None

    def _take(self, readonly: bool) -> Any:
        with self._lock:
            return self._take_locked(readonly)

    def _put(self, rec: PooledConnection) -> bool:
        with self._lock:
            return self._put_locked(rec)

    def _wait(self, readonly: bool, deadline: float, now: float) -> Any:
        with self._lock:
            grant = self._take_locked(readonly)  # a connection may have come back meanwhile
            if grant is not None:
                return grant
            limit = self.options.max_waiting
            if limit and len(self._waiters) >= limit:
                self._timeouts += 1
                raise PoolTimeout(f"{len(self._waiters)} callers already waiting "
                                  f"(max_waiting={limit}); not queueing another")
            waiter = _Waiter(readonly)
            self._waiters.append(waiter)
            self._waits += 1
            self._wait_target(readonly).waits += 1
        remaining = deadline - monotonic()
        if not (remaining > 0 and waiter.ready.acquire(timeout=remaining)):
            with self._lock:
                if waiter.grant is None and waiter.error is None:  # not served in the meantime
                    self._waiters.remove(waiter)
                    self._timeouts += 1
                    self._wait_target(readonly).timeouts += 1
                    raise self._timeout_error(readonly, deadline - now)
        if waiter.error is not None:
            raise waiter.error
        return waiter.grant

    def _serve_waiters(self) -> None:
        """Lock held. Hand connections (or slots, or errors) to waiters, oldest first.

        A waiter that cannot be served does not block those behind it who want the other kind
        (a write waiter must not hold up reads that a replica could serve).
        """
        blocked = set()
        for waiter in list(self._waiters):
            if waiter.readonly in blocked:
                continue
            try:
                grant = self._take_locked(waiter.readonly)
            except Exception as exc:  # the pool closed, or no endpoint can serve this kind
                waiter.error = exc
            else:
                if grant is None:
                    blocked.add(waiter.readonly)
                    continue
                waiter.grant = grant
            self._waiters.remove(waiter)
            waiter.ready.release()

    def _start_housekeeping(self) -> None:
        thread = self._housekeeper
        if (thread is None or not thread.is_alive()) and not self._closed:
            # Started on first need, not in __init__: a pool made in a parent that then forks
            # (gunicorn --preload) should not leave a thread behind in the parent.
            thread = threading.Thread(target=_housekeeper_main, args=(weakref.ref(self),),
                                      name="pool-housekeeping", daemon=True)
            self._housekeeper = thread
            thread.start()

    def _wake_housekeeper(self) -> None:
        self._start_housekeeping()
        self._wakeup.set()

    def _probe_on_demand(self, now: float) -> None:
        """The housekeeping thread runs the probes; a request that needs a down endpoint waits
        while a probe is due or younger than PROBE_GRACE, at most PROBE_GRACE in all. Later
        requests fail at once while a slow probe (a black hole) goes on in the background."""
        self._wake_housekeeper()
        while True:
            t = monotonic()
            with self._lock:
                young = any(ep.awaiting_probe(t, PROBE_GRACE) for ep in self._endpoints)
            if not young or t >= now + PROBE_GRACE:
                return
            time.sleep(0.001)  # the outcome is one housekeeping step away

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._waiters = collections.deque()
        self._wakeup = threading.Event()
        self._housekeeper = None  # threads do not survive fork(); restarted on first need


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
            log.exception("pool housekeeping failed; retrying in a second")
            due = monotonic() + 1.0
        probes = [ep.probe for ep in pool._endpoints if ep.probe is not None]
        del pool
        if probes:  # wake when a probe's socket is ready, not after a fixed sleep
            wait_any(probes, due - monotonic())
        else:
            wakeup.wait(timeout=max(0.0, due - monotonic()))
