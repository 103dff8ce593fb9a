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
from .endpoint import UP
from .errors import PoolTimeout
from .probe import wait_for

log = logging.getLogger("pool")
monotonic = time.monotonic

PROBE_GRACE = 0.05  # seconds a process-mode request gives a due probe (a LAN login takes ~5 ms)


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

    def _probe_on_demand(self, now: float) -> bool:
        """With no thread, a worker that sat idle while a server was down only probes when a
        request comes. So the request that finds the probe due starts it and gives it a short
        grace to finish: if the server is back, that request succeeds instead of failing fast.
        One request per backoff period waits, at most PROBE_GRACE; the others fail at once."""
        due = [ep for ep in self._endpoints
               if ep.state is not UP and ep.probe is None and now >= ep.retry_at]
        if not due:
            return False
        self._housekeep_now(now)  # starts the due probes
        wait_for([ep.probe for ep in due if ep.probe is not None], monotonic,
                 until=now + PROBE_GRACE)
        self._housekeep_now(monotonic())  # re-admits those that answered
        return any(ep.state is UP for ep in due)

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
        del pool
        wakeup.wait(timeout=max(0.0, due - monotonic()))
