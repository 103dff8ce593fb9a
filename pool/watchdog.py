"""The watchdog: no statement waits for the server longer than ``query_timeout``.

While libpq waits for an answer it sits in ``poll()``, and nothing on the client side ends that
wait when the server's kernel still acknowledges packets (every process of a node stopped, a
server stuck on a dead disk): keepalives and ``tcp_user_timeout`` only fire when the peer itself
goes silent, and ``statement_timeout`` needs a server that runs. Only a client-side deadline
bounds it. So one daemon thread per process watches the connections of every pool: each
``PoolConnection`` records when its statement started (``busy_since``), and a statement older
than its ``query_timeout`` gets its socket shut down. ``shutdown(2)`` makes the blocked ``poll()``
return at once; libpq reports the connection lost, the pool sees the watchdog's mark
(``timed_out``) and raises ``QueryTimeout``, and the endpoint is ejected with a probe due at once.

Shutting our end of the socket does not stop the statement on the server: it runs to its end
there (the server notices only when it next writes to us), which for a slow report can be
minutes of a healthy server's time. So the endpoint is ejected as a suspect that keeps its other
sessions while its probe decides (endpoint.py), and once it is up, a housekeeping job
(``job_cancel_cut_off``) asks the server to cancel the statements cut off: same role, so no
privilege beyond the default, and only a process connected from our port (``cancel_sql``). A
pool that closes first asks as it closes (``cancel_at_close``).

Process mode promises "no lock, no thread", and this is one of two exceptions (the other: name
lookups, resolve.py), because nothing else can interrupt a blocked libpq call in a
single-threaded worker: a signal does not (libpq retries ``poll()`` on EINTR, so a Python
handler never runs), and psycopg2's wait callback is process-wide and disables COPY. The thread
keeps the pool's promise in spirit: it takes no pool lock and changes no pool state; it reads
two attributes per connection and may shut a socket. It watches a new connection from before
``configure()`` runs on it, leaves after ``IDLE_EXIT`` with no open connection in the process
(looking once more, under its lock, as it goes), and is started again, lazily, when a connection
opens, in a forked child too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

from .endpoint import UP
from .probe import OK, PENDING, Probe, wait_for

log = logging.getLogger("pool")
monotonic = time.monotonic

TICK = 0.05  # seconds between scans: a statement overruns its deadline by at most this much
ERRAND_STEP = 0.01  # while a cancel request is in flight, step it this often
IDLE_EXIT = 10.0  # with nothing to watch for this long, the thread ends


class Watchdog:
    """The process's watchdog thread and the pools it watches (weakly: a pool can be freed)."""

    def __init__(self) -> None:
        self._pools: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._leaving: threading.Thread | None = None  # a thread that gave up, on its way out
        self.kills = 0  # statements ended, for tests and stats

    def watch(self, pool: Any) -> None:
        """Called when a pool has a new connection, before anything runs on it (``Reservation.raw``
        set): make sure a thread in this process watches the pool's connections.

        The unlocked fast path is safe because a thread about to exit first clears ``_thread``
        and then, under the lock, looks once more (``_leave``): a caller that still saw the
        thread had already registered its connection, so that last look finds it."""
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive() and pool in self._pools:
            return
        with self._lock:
            self._pools.add(pool)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                if self._leaving is not None and self._pid == os.getpid():
                    self._leaving.join(1.0)  # it holds no lock and only has to return
                self._pid = os.getpid()
                # Registered before it starts: an interrupt (a SIGALRM request timeout) inside
                # start() can leave a thread running that is_alive() does not yet admit to, so
                # the next call starts another; the first sees it is no longer _thread, and goes.
                # (CPython's start() is not safe against such an exception at every point: it
                # can also leave a Thread object that never runs. The next call still starts a
                # working one; the stray is CPython's to keep.)
                self._thread = thread = threading.Thread(target=self._main, name="pool-watchdog",
                                                         daemon=True)
                thread.start()

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork() stays held
        self._thread = self._leaving = None

    def _main(self) -> None:
        me = threading.current_thread()
        idle_since = monotonic()
        while self._thread is me:
            time.sleep(TICK)
            now = monotonic()
            if self._scan(now):
                idle_since = now
            elif now - idle_since > IDLE_EXIT and self._leave(me, now):
                return

    def _leave(self, me: threading.Thread, now: float) -> bool:
        """Stop being the watchdog unless a connection appeared since the last scan. Clearing
        ``_thread`` before the last look closes the race with ``watch()``'s unlocked fast path."""
        with self._lock:
            if self._thread is not me:
                return True
            self._thread = None
            if self._scan(now):
                self._thread = me  # nobody started another: watch() needs the lock for that
                return False
            self._leaving = me
            return True

    def _scan(self, now: float) -> int:
        """One look at every connection of every pool. A function of its own so that its locals
        die when it returns: a loop variable left holding a connection between ticks would keep
        alive one that a loan dropped, and its slot would never be freed (endpoint.py)."""
        watched = 0
        for pool in list(self._pools):
            for ep in pool._endpoints:
                for raw in ep.being_set_up():  # first: see Endpoint.being_set_up
                    watched += 1
                    self._check(raw, now)
                for rec in ep.connections():
                    watched += 1
                    self._check(rec.raw, now)
        return watched

    def _check(self, raw: Any, now: float) -> None:
        started, limit = raw.busy_since, raw.query_timeout
        if not started or limit is None or now - started <= limit:
            return
        # The statement may have finished since the read above; shutting down a socket that is
        # idle or busy with the next statement would break that one. Re-read just before acting
        # (the window left is a few bytecodes, and its worst case is one spurious QueryTimeout).
        if raw.busy_since != started or raw.closed or raw.timed_out:
            return  # (timed_out: seen twice, as it was being adopted)
        raw.timed_out = True
        try:
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except (OSError, ValueError, Exception):  # psycopg2 raises InterfaceError if closed
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()
        self.kills += 1
        # INFO, not WARNING: the bound may be a caller's short timeout (a ping or a SET cut off
        # for it proves nothing); the pool logs the outage, if it is one, where it judges it.
        log.info("%s: statement ran past its deadline of %.3gs with no answer; connection shut down",
                 raw.label, limit)


WATCHDOG = Watchdog()


def job_cancel_cut_off(pool: Any, now: float) -> float:
    """cancel_cut_off: for each endpoint that is up with statements the watchdog cut off
    (``Endpoint.orphans``), ask the server to cancel them: one non-blocking login and statement
    (a Probe, ``Endpoint.errand``), stepped like the probes. Its outcome is evidence of nothing
    (probes decide the endpoint's state), and it is tried once: if it fails, the server is
    down or restarting, which ends those statements too. Returns when to run again."""
    due = float("inf")
    for ep in pool._endpoints:
        errand = ep.errand
        if errand is None:
            if not ep.orphans or ep.state is not UP or pool._closed:
                continue
            with pool._lock:  # those cut off before ``asked`` are in it (Endpoint.cut_off)
                asked = time.monotonic()
                cut = list(ep.orphans)
            errand = ep.errand = _cancel_request(pool, ep, asked, cut)
        if not pool._probes_in_background:
            # Process mode steps it on requests, which may come further apart than the server's
            # authentication_timeout: it would close the login half done. The requests give it
            # a probe's grace in all (a login and a statement), each within its own deadline.
            wait_for([errand], time.monotonic,
                     min(time.monotonic() + ep.grace - errand.waited, pool._until))
        if errand.step(now) == PENDING:
            due = min(due, now + ERRAND_STEP)
            continue
        with pool._lock:
            ep.orphans = [o for o in ep.orphans if o[2] >= errand.started]
        ep.errand = None
        if errand.status == OK and errand.rows:
            log.info("%s: cancelled %d statement(s) cut off at their deadline", ep.name,
                     sum(1 for (done,) in errand.rows if done))
        elif errand.status != OK:
            log.info("%s: could not cancel the statements cut off at their deadline (they run "
                     "on to their end there): %s", ep.name, pool._redact(errand.error or ""))
    return due


def cancel_at_close(pool: Any) -> None:
    """A pool closing with statements cut off and not yet cancelled (a worker that exits right
    after a timeout): ask each server once, waiting a probe's grace at most, up or not (right
    after a timeout it is suspect: if it is fine, it answers well within that)."""
    eps = [ep for ep in pool._endpoints if ep.orphans]
    if not eps:
        return
    now = time.monotonic()
    errands = [_cancel_request(pool, ep, now, list(ep.orphans)) for ep in eps]
    wait_for(errands, time.monotonic, now + max(ep.grace for ep in eps))
    for ep, errand in zip(eps, errands):
        errand.cancel()
        ep.orphans = []


def _cancel_request(pool: Any, ep: Any, now: float, cut: list[tuple]) -> Probe:
    """A login to ``ep`` that cancels the statements ``cut`` off. Its statement is built when
    sent: in process mode the login may finish requests later, and the ages must be as of the
    server's now() then, or the reused-pid guard widens (``cancel_sql``)."""
    return Probe(ep.config.monitor_dsn, now, pool.options.connect_timeout,
                 lambda: cancel_sql(cut, time.monotonic()))


def cancel_sql(orphans: list[tuple], now: float) -> str:
    """The statement that cancels, on the server, the statements the watchdog cut off.
    ``orphans``: (server process id, when our connection to it opened, when it was cut off, our
    port), from ``Endpoint.cut_off``. A process counts only if it runs a statement, is our
    role's, is connected from our port (behind a pooler such as pgbouncer the process id libpq
    reports is not a server process of ours alone, and the server sees the pooler's port), and
    started before our connection opened (it is at least as old on the server's clock): a
    process id the server has since given to another session is left alone."""
    rows = ", ".join(f"({int(pid)}, {max(0.0, now - opened):.6f}, {int(port)})"
                     for pid, opened, _, port in orphans)
    return ("SELECT pg_cancel_backend(a.pid) FROM pg_stat_activity a "
            f"JOIN (VALUES {rows}) AS o(pid, age, port) ON a.pid = o.pid "
            "WHERE a.usename = session_user AND a.state = 'active' "
            "AND a.client_port = o.port "
            "AND a.backend_start <= now() - o.age * interval '1 second'")
