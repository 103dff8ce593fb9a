"""Host names resolved with a deadline.

libpq resolves a host name with the C library's ``getaddrinfo()`` before its connect_timeout
counts, and nothing interrupts that call: a name server that stalls (an overloaded cluster DNS,
a firewall dropping its packets) holds every connect, probe and monitor for the resolver's own
timeouts (``/etc/resolv.conf``: 5 s an attempt, 2 attempts), the housekeeping thread and process
mode's requests included. So the pool looks names up itself, on a short-lived daemon thread (one
lookup per name at a time, shared by every attempt that needs it), waits for the answer no
longer than the attempt's own bound, and hands libpq the addresses (``hostaddr``, with ``host``
kept for TLS and ``.pgpass``), all of them, in the resolver's order, as libpq would try them.

An answer is reused for ``FRESH`` seconds; after that each attempt asks again, so a name that a
failover moved is followed as libpq would follow it. While the name server answers, whatever it
says (an address, no such name, a failure) is what libpq would have got. Only its silence
changes anything: an attempt that has waited ``STALE_AFTER`` for a lookup still unanswered
takes the name's last answer, as resolvers serve stale data when their upstream is down (RFC
8767); with no earlier answer, it fails at its bound as an unreachable server would. IP
addresses, Unix sockets and a ``hostaddr`` given in the DSN are libpq's to handle, as before (it
does no lookup for them).

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

FRESH = 1.0  # seconds an answer is used as it is; after that an attempt asks again
STALE_AFTER = 0.1  # seconds an attempt waits for a new answer before it takes the last one
STEP = 0.005  # a prober waits on a lookup this long at a time: a new probe before it steps on
#               (a local resolver has answered by then), a wait on several probes between looks

# host -> (when answered, addresses). Shared by every pool of the process; plain dict operations
# (atomic under the GIL) are all that touch it, from lookup threads and pools alike.
_ANSWERS: dict[str, tuple[float, list[str]]] = {}
_IN_FLIGHT: dict[str, "_Lookup"] = {}
_HOSTS: dict[str, str | None] = {}  # dsn -> the name to look up, or None (libpq's business)


class _Lookup:
    """One ``getaddrinfo()`` on a thread of its own. Sets ``done`` when it returns; a stalled
    name server keeps the thread (a daemon) until the resolver gives up, and nobody waits."""

    __slots__ = ("host", "done", "error", "started", "warned")

    def __init__(self, host: str) -> None:
        self.host = host
        self.done = threading.Event()
        self.error: str | None = None
        self.started = time.monotonic()
        self.warned = False  # (an attempt that took the last answer instead has said so)
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
            if getattr(exc, "errno", None) != socket.EAI_AGAIN:  # no such name: forget it
                _ANSWERS.pop(self.host, None)  # (a temporary failure keeps it for a stall)
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
        if self.host is not None:
            answer = _ANSWERS.get(self.host)
            if answer is None or now - answer[0] >= FRESH:
                lookup = _IN_FLIGHT.get(self.host)
                self._lookup = lookup if lookup is not None else _Lookup(self.host)

    @property
    def _patience(self) -> float:
        """How long to wait for the lookup: a bit if an older answer can stand in, else all."""
        return min(STALE_AFTER, self.bound) if self.host in _ANSWERS else self.bound

    def settled(self, now: float) -> bool:
        """May the attempt go on: the lookup answered, or it has been waited for long enough?"""
        lookup = self._lookup
        return lookup is None or lookup.done.is_set() or now - self.started >= self._patience

    def wait(self, timeout: float = float("inf")) -> None:
        """Block until settled, or for ``timeout`` seconds at most."""
        lookup = self._lookup
        if lookup is not None:
            lookup.done.wait(max(0.0, min(timeout, self.started + self._patience - time.monotonic())))

    def params(self) -> dict[str, str]:
        """What to add to the DSN: every address, the name kept as ``host``. Raises
        OperationalError, worded as libpq words it, when the name has no known address."""
        if self.host is None:
            return {}
        lookup = self._lookup
        failed = lookup is not None and lookup.done.is_set() and lookup.error is not None
        answer = None if failed else _ANSWERS.get(self.host)
        if answer is None:
            why = lookup.error if failed else \
                f"no answer from the name server within {round(self.bound, 2) or self.bound:g}s"
            raise psycopg2.OperationalError(
                f'could not translate host name "{self.host}" to address: {why}')
        addresses = answer[1]
        if lookup is not None and not lookup.done.is_set() and not lookup.warned:
            lookup.warned = True
            log.warning('the name server has not answered for %.1fs about "%s": connecting to its '
                        'last known address%s, %s', time.monotonic() - lookup.started, self.host,
                        "es" if len(addresses) > 1 else "", ", ".join(addresses))
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
    host = params.get("host") or None
    if host is not None and (params.get("hostaddr") or "," in host or host[0] in "/@"
                             or _is_address(host)):
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
