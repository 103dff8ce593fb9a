"""Host names resolved with a deadline.

libpq resolves a host name with the C library's ``getaddrinfo()`` before its connect_timeout
counts, and nothing interrupts that call: a name server that stalls (an overloaded cluster DNS,
a firewall dropping its packets) holds every connect, probe and monitor for the resolver's own
timeouts (``/etc/resolv.conf``: 5 s an attempt, 2 attempts), the housekeeping thread and process
mode's requests included. So the pool looks names up itself, on short-lived daemon threads,
waits for the answer no longer than the attempt's own bound, and hands libpq the addresses
(``hostaddr``, with ``host`` kept for TLS and ``.pgpass``), all of them, in the resolver's
order, as libpq would try them (giving each its connect_timeout: the pool bounds the whole
attempt, core.py's ``Pool._open``).

Every attempt asks, as libpq does: a name that a failover moved is followed, and a name that is
gone (a stopped container's, in Docker) fails the attempt at once instead of sending it to an
address that no longer answers. A lookup in progress is shared by the attempts that need the
name, for ``ASK_AGAIN`` at most (a query lost on the way would otherwise hold the name for the
resolver's 10 s): so a silent name server costs a thread a second, not one an attempt. An
answer, addresses or "no such name", is final, as it is for libpq. A name server that fails (a
temporary failure: down, refusing, its resolver's own timeout) or is silent (a lookup
``STALE_AFTER`` unanswered, or for half the attempt's bound) is not an answer: attempts take the
name's last answer, as resolvers serve stale data when their upstream is down (RFC 8767), and
say so at WARNING (every WARN_EVERY at most); with no earlier answer, an attempt fails as an
unreachable server would, at its bound if the name server is silent. So a name server slower
than ``STALE_AFTER`` counts as silent. IP addresses, Unix sockets and a ``hostaddr`` given in
the DSN (or ``PGHOSTADDR``) are libpq's to handle, as before (it does no lookup for them); a
name from ``PGHOST`` is looked up like one in the DSN.

In process mode the lookup threads are, with the watchdog, the exceptions to "no thread", for
the same reason: nothing else bounds a blocking C call. Each lives for one ``getaddrinfo()``,
takes no pool lock and touches no pool state, only the answers kept here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg2
from psycopg2.extensions import parse_dsn

log = logging.getLogger("pool")

STALE_AFTER = 0.1  # seconds an attempt waits for a new answer before it takes the last one
ASK_AGAIN = 1.0  # a lookup unanswered this long is joined no more: the next attempt asks anew
WARN_EVERY = 10.0  # seconds between two warnings that a name's last answer stands in
STEP = 0.005  # a prober waits on a lookup this long at a time: a new probe before it steps on
#               (a local resolver has answered by then), a wait on several probes between looks

# host -> (when answered, its last addresses): whichever lookup answers last. Shared by every
# pool of the process; plain dict operations (atomic under the GIL) are all that touch it, from
# lookup threads and pools alike.
_ANSWERS: dict[str, tuple[float, list[str]]] = {}
_IN_FLIGHT: dict[str, "_Lookup"] = {}  # host -> its newest lookup still in progress
_HOSTS: dict[str, str | None] = {}  # dsn -> the name to look up, or None (libpq's business)
_WARN_AFTER: dict[str, float] = {}  # host -> when a stand-in answer may be logged again
# getaddrinfo()'s "the name has no address": the name server's answer. Anything else (a
# temporary failure, the resolver's own timeout) is a failure to answer.
_NO_SUCH_NAME = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
                 if hasattr(socket, name)}


class _Lookup:
    """One ``getaddrinfo()`` on a thread of its own. Sets ``done`` when it returns; a stalled
    name server keeps the thread (a daemon) until the resolver gives up, and nobody waits."""

    __slots__ = ("host", "done", "error", "final", "started")

    def __init__(self, host: str) -> None:
        self.host = host
        self.done = threading.Event()
        self.error: str | None = None
        self.final = False  # the error is the name server's word (no such name), not a failure
        self.started = time.monotonic()
        _IN_FLIGHT[host] = self  # (before the thread starts: it may end at once)
        try:
            threading.Thread(target=self._run, name=f"pool-resolve {host}", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: this lookup failed
            self.error = f"could not start a lookup: {exc}"
            self._done()
        except BaseException:  # (^C): never leave a lookup in flight that nobody runs
            self._done()
            raise

    def _done(self) -> None:
        if _IN_FLIGHT.get(self.host) is self:
            del _IN_FLIGHT[self.host]
        self.done.set()

    def _run(self) -> None:
        try:
            infos = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if addresses:
                _ANSWERS[self.host] = (time.monotonic(), addresses)
        except (OSError, UnicodeError) as exc:
            self.error = str(exc.args[-1] if exc.args else exc)
            if getattr(exc, "errno", None) in _NO_SUCH_NAME:  # the name is gone: forget it
                self.final = True
                _ANSWERS.pop(self.host, None)
        finally:
            self._done()


class Resolution:
    """One connection attempt's view of its host's addresses, bounded by ``bound`` seconds from
    ``now``: ``settled()`` (never blocks) or ``wait()`` (blocks), then ``params()``."""

    __slots__ = ("host", "started", "bound", "_lookup")

    def __init__(self, dsn: str, now: float, bound: float) -> None:
        self.host = _host_to_look_up(dsn)
        self.started, self.bound = now, bound
        self._lookup: _Lookup | None = None
        if self.host is not None:  # (every attempt asks, as libpq does: a name just looked
            #                           up may be gone, a stopped container's in Docker)
            lookup = _IN_FLIGHT.get(self.host)
            if lookup is None or now - lookup.started >= ASK_AGAIN:
                lookup = _Lookup(self.host)  # (a query lost on the way, or a name server that
                #                               is back, must not wait out the old one's 10 s)
            self._lookup = lookup

    def _until(self, lookup: _Lookup) -> float:
        """When to stop waiting for the lookup: at the attempt's bound; or, if an older answer
        can stand in, once the lookup has gone STALE_AFTER unanswered (an attempt that joins a
        lookup already that late takes the older answer at once), and before half the bound
        is spent (the server gets the other half)."""
        until = self.started + self.bound
        if self.host in _ANSWERS:
            until = min(until - self.bound / 2, lookup.started + STALE_AFTER)
        return until

    def settled(self, now: float) -> bool:
        """May the attempt go on: the lookup answered, or it has been waited for long enough?"""
        lookup = self._lookup
        return lookup is None or lookup.done.is_set() or now >= self._until(lookup)

    def wait(self, timeout: float = float("inf")) -> None:
        """Block until settled, or for ``timeout`` seconds at most."""
        lookup = self._lookup
        if lookup is not None:
            lookup.done.wait(max(0.0, min(timeout, self._until(lookup) - time.monotonic())))

    def params(self) -> dict[str, str]:
        """What to add to the DSN: every address, the name kept as ``host``. Raises
        OperationalError, worded as libpq words it, when the name has no known address."""
        if self.host is None:
            return {}
        lookup = self._lookup
        answered = lookup is None or lookup.done.is_set() and lookup.error is None
        answer = None if lookup is not None and lookup.final else _ANSWERS.get(self.host)
        if answer is None:
            why = lookup.error if lookup is not None and lookup.done.is_set() and lookup.error \
                else f"no answer from the name server within {round(self.bound, 2) or self.bound:g}s"
            raise psycopg2.OperationalError(
                f'could not translate host name "{self.host}" to address: {why}')
        addresses = answer[1]
        now = time.monotonic()
        if not answered and now >= _WARN_AFTER.get(self.host, 0.0):  # the last answer stands in
            _WARN_AFTER[self.host] = now + WARN_EVERY
            log.warning('the name server %s about "%s": connecting to its last known address%s, %s',
                        f"failed ({lookup.error})" if lookup.done.is_set() else
                        f"has not answered for {now - lookup.started:.1f}s",
                        self.host, "es" if len(addresses) > 1 else "", ", ".join(addresses))
        return {"host": ",".join([self.host] * len(addresses)), "hostaddr": ",".join(addresses)}


def _host_to_look_up(dsn: str) -> str | None:
    """The DSN's host name if libpq would look it up: not an address, a socket directory, a
    list, nor beside a ``hostaddr``. Remembered per DSN (the pool's DSNs are few and fixed)."""
    try:
        return _HOSTS[dsn]
    except KeyError:
        pass
    try:
        params: dict[str, Any] = parse_dsn(dsn)
    except psycopg2.Error:
        params = {}  # (libpq will say what is wrong with it)
    host = params.get("host") or os.environ.get("PGHOST") or None
    if host is not None and (params.get("hostaddr") or os.environ.get("PGHOSTADDR")
                             or "," in host or host[0] in "/@" or _is_address(host)):
        host = None
    if len(_HOSTS) > 256:
        _HOSTS.clear()
    _HOSTS[dsn] = host
    return host


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _after_fork_in_child() -> None:
    """A lookup in flight at fork() has no thread in the child: never wait for it there."""
    _IN_FLIGHT.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
