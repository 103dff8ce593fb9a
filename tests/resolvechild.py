"""The name-server tests' child (test_pool_resolve.py): one scenario, its figures as JSON.

Run in a mount namespace of its own, where /etc/resolv.conf names the test's dnsmasq, which
answers for ``db.pooltest``; the child stalls and resumes it (SIGSTOP, SIGCONT) itself. The DSN
comes in the environment (POOL_TEST_DSN), never on the command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pgutil
import pool
from native.cluster import Cluster
from proxy import Proxy

monotonic = time.monotonic



def _names(dns: int, text: str) -> None:
    """The test name server's hosts file, read again (dnsmasq rereads it on SIGHUP)."""
    with open(os.environ["POOL_TEST_NAMES"], "w") as f:
        f.write(text)
    os.kill(dns, signal.SIGHUP)

def timed(fn):
    """pgutil.timed, with the error as text (for the JSON the parent judges)."""
    seconds, result, error = pgutil.timed(fn)
    return seconds, result, None if error is None else f"{type(error).__name__}: {error}"


def back(p: pool.Pool) -> float:
    """Seconds until a write succeeds again (at most 20)."""
    start = monotonic()
    while monotonic() - start < 20:
        if timed(lambda: p.fetchone("SELECT 1"))[2] is None:
            return monotonic() - start
        time.sleep(0.05)
    return -1.0


def first_lookup_stalled(mode: str, dsn: str, dns: int) -> dict:
    """The name server stalls before the pool ever had an answer."""
    os.kill(dns, signal.SIGSTOP)
    try:
        built_s, p, error = timed(lambda: pool.Pool(dsn, mode=mode, connect_timeout=0.5))
        assert error is None, error
        write_s, _, write_error = timed(lambda: p.fetchone("SELECT 1"))
        endpoint = p.stats()["endpoints"][0]
        for _ in range(3):  # more attempts at the name: they share the lookup in progress
            pool.Pool(dsn, mode=mode, connect_timeout=0.3).close()
        lookups = sum(1 for t in threading.enumerate() if t.name.startswith("pool-resolve"))
    finally:
        os.kill(dns, signal.SIGCONT)
    return dict(built_s=built_s, write_s=write_s, write_error=write_error, lookups=lookups,
                state=endpoint["state"], last_error=endpoint["last_error"], back_s=back(p))


def later_lookup_stalled(mode: str, dsn: str, dns: int) -> dict:
    """The name server stalls after the pool had an answer: a new connection, a probe and a
    pool's start all take the last answer."""
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("pool").addHandler(handler)
    p = pool.Pool(dsn, mode=mode, connect_timeout=0.5)
    p.fetchone("SELECT 1")
    os.kill(dns, signal.SIGSTOP)
    try:
        def two_at_once():  # the second one has to connect
            with p.connection(), p.connection() as conn:
                conn.cursor().execute("SELECT 1")
        connect_s, _, connect_error = timed(two_at_once)
        built_s, other, built_error = timed(lambda: pool.Pool(dsn, mode=mode, connect_timeout=0.5))
        state = other.stats()["endpoints"][0]["state"] if other is not None else None
    finally:
        os.kill(dns, signal.SIGCONT)
    return dict(connect_s=connect_s, connect_error=connect_error, built_s=built_s,
                built_error=built_error, state=state,
                warnings=[m for m in said if "has not answered" in m])


def name_server_failing(mode: str, dsn: str, dns: int) -> dict:
    """After the pool had an answer, the name server stalls, then fails
    (nothing listens at the address resolv.conf names: a temporary failure at once). Callers
    with little time left, a false alarm on a healthy server, and a server that stalls too must
    all come out as they would with the name server answering."""
    p = pool.Pool(dsn, mode=mode, connect_timeout=0.5, query_timeout=5)
    with contextlib.ExitStack() as held:  # three sessions, idle afterwards
        for _ in range(3):
            held.enter_context(p.connection())
    r: dict = {}
    p._endpoints[0].login_s = 0.005  # logins seen fast: a probe's grace at its floor, 50 ms
    os.kill(dns, signal.SIGSTOP)
    try:
        with contextlib.ExitStack() as held:  # the idle ones lent: the next one has to connect
            for _ in range(3):
                held.enter_context(p.connection())
            r["short_s"], _, r["short_error"] = timed(
                lambda: p.connection(timeout=0.08).__enter__().cursor().execute("SELECT 1"))
        idle_before = p.stats()["idle"]
        def slow_report():  # a false alarm: QueryTimeout expected
            with p.connection(query_timeout=0.3) as conn:
                conn.cursor().execute("SELECT pg_sleep(1)")
        r["alarm_error"] = timed(slow_report)[2]
        _, _, r["after_alarm_error"] = timed(lambda: p.fetchone("SELECT 1"))
        r["idle_before"], r["idle_after"] = idle_before, p.stats()["idle"]
        other = pool.Pool(dsn, mode=mode, connect_timeout=3)  # (the last answer: no session)
        with pgutil.stalled(the_cluster(), "primary"):
            r["held_s"], _, r["held_error"] = timed(
                lambda: other.connection(timeout=1.95).__enter__())
    finally:
        os.kill(dns, signal.SIGCONT)
    r["back_s"] = back(p)  # (the stalled server's outage, on the board in process mode)
    r["ejections_before"] = p.stats()["ejections"]
    subprocess.run(["mount", "--bind", os.environ["POOL_TEST_REFUSED_RESOLV"], "/etc/resolv.conf"],
                   check=True)
    with contextlib.ExitStack() as held:
        while p.stats()["idle"]:
            held.enter_context(p.connection())
        r["failing_s"], _, r["failing_error"] = timed(
            lambda: p.connection(timeout=5).__enter__().cursor().execute("SELECT 1"))
    r["ejections"] = p.stats()["ejections"]
    return r


def false_alarm_stalled(mode: str, dsn: str, dns: int) -> dict:
    """A statement past its deadline on a healthy primary, with the name server stalled after
    an answer: the probe that clears the suspicion waits for the lookup first,
    and that wait must not count as the server's silence."""
    p = pool.Pool(dsn, mode=mode, connect_timeout=2, query_timeout=0.5, max_size=4)
    with contextlib.ExitStack() as held:
        for _ in range(4):
            held.enter_context(p.connection()).cursor().execute("SELECT 1")
    os.kill(dns, signal.SIGSTOP)
    try:
        _, _, slow_error = timed(lambda: p.fetchone("SELECT pg_sleep(1)"))
        write_s, _, write_error = timed(lambda: p.fetchone("SELECT 1"))
        stats = p.stats()
    finally:
        os.kill(dns, signal.SIGCONT)
    return dict(slow_error=slow_error, write_s=write_s, write_error=write_error,
                idle=stats["idle"], state=stats["endpoints"][0]["state"])


def name_gone(mode: str, dsn: str, dns: int) -> dict:
    """The server's host goes away just after the pool looked its name up (a container killed):
    its address black-holes and the name server says there is no such name. libpq, looking the
    name up on each connect, failed at once; the pool must not connect to the address it had."""
    proxy = Proxy(int(os.environ["POOL_TEST_PORT"]))  # the server's address, which can vanish
    try:
        p = pool.Pool(dsn.replace(f"port={os.environ['POOL_TEST_PORT']}", f"port={proxy.port}"),
                      mode=mode, connect_timeout=2)
        state = p.stats()["endpoints"][0]["state"]  # (its start looked the name up just now)
        proxy.blackhole()
        _names(dns, "")
        time.sleep(0.05)
        write_s, _, write_error = timed(lambda: p.fetchone("SELECT 1"))
        p.close()
    finally:
        _names(dns, f"127.0.0.1 {dsn.split('host=')[1].split()[0]}\n")
        proxy.close()
    return dict(state=state, write_s=write_s, write_error=write_error)


def lost_query(mode: str, dsn: str, dns: int) -> dict:
    """A query lost on the way (the stalled name server's socket full): its lookup waits for the
    resolver's retransmit, 5 s. Attempts joined it for as long, and took the last answer, after
    the name server was back and said the name was gone; a lookup unanswered for ASK_AGAIN is
    joined no more."""
    p = pool.Pool(dsn, mode=mode, connect_timeout=2)
    p.fetchone("SELECT 1")
    name = dsn.split("host=")[1].split()[0]
    os.kill(dns, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:  # fill its socket
            flood.setblocking(False)
            for _ in range(4000):
                with contextlib.suppress(BlockingIOError):
                    flood.sendto(b"\0" * 1024, (os.environ["POOL_TEST_DNS_ADDRESS"], 53))
        pool.Pool(dsn, mode=mode, connect_timeout=2).close()  # its lookup's query is lost
        _names(dns, "")  # the name is gone once the name server is back
    finally:
        os.kill(dns, signal.SIGCONT)
    back = monotonic()
    gone_s = -1.0
    while monotonic() - back < 8:
        q = pool.Pool(dsn, mode=mode, connect_timeout=2)
        error = q.stats()["endpoints"][0]["last_error"] or ""
        q.close()
        if "could not translate" in error:
            gone_s = monotonic() - back
            break
        time.sleep(0.05)
    _names(dns, f"127.0.0.1 {name}\n")
    return dict(gone_s=gone_s)


def two_addresses(mode: str, dsn: str, dns: int) -> dict:
    """The name has two addresses, 127.0.0.1 and 127.0.0.2, both black-holed (a proxy on each,
    on the same port). libpq gives each address connect_timeout in turn: the first write took
    twice connect_timeout, 4.0 s, past its timeout of 3 s (found by a red-team run)."""
    port = int(os.environ["POOL_TEST_PORT"])
    first = Proxy(port)
    second = _Proxy2(port, first.port)
    name = dsn.split("host=")[1].split()[0]
    try:
        _names(dns, f"127.0.0.1 {name}\n127.0.0.2 {name}\n")
        time.sleep(0.05)
        addresses = sorted({i[4][0] for i in socket.getaddrinfo(name, None, socket.AF_INET)})
        p = pool.Pool(dsn.replace(f"port={port}", f"port={first.port}"), mode=mode,
                      connect_timeout=2, timeout=3, shared_state=False)
        try:
            state = p.stats()["endpoints"][0]["state"]
            first.freeze()
            second.freeze()
            write_s, _, write_error = timed(lambda: p.fetchone("SELECT 1"))
        finally:
            p.close()
    finally:
        _names(dns, f"127.0.0.1 {name}\n")
        first.close()
        second.close()
    return dict(addresses=addresses, state=state, write_s=write_s, write_error=write_error)


class _Proxy2(Proxy):
    """A test proxy on 127.0.0.2, on the port of another one (on 127.0.0.1)."""

    def __init__(self, target_port: int, port: int) -> None:
        self._want = port
        super().__init__(target_port)

    def _listen(self, port: int):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.2", port or self._want))
        s.listen(128)
        return s


def the_cluster() -> Cluster:
    """The parent's cluster (to stall its primary as Cluster.stall does)."""
    return Cluster(os.environ["POOL_TEST_BASEDIR"], ports=os.environ["POOL_TEST_PORTS"].split(","))


if __name__ == "__main__":
    scenario, mode, dns = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(globals()[scenario](mode, os.environ["POOL_TEST_DSN"], dns)))
