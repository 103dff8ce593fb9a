"""The name-server tests' child (test_pool_resolve.py): one scenario, its figures as JSON.

Run in a mount namespace of its own, where /etc/resolv.conf names the test's dnsmasq, which
answers for ``db.pooltest``; the child stalls and resumes it (SIGSTOP, SIGCONT) itself. The DSN
comes in the environment (POOL_TEST_DSN), never on the command line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import pool
from pool.resolve import FRESH

monotonic = time.monotonic


def timed(fn):
    start = monotonic()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - the parent judges it
        return monotonic() - start, None, f"{type(exc).__name__}: {exc}"
    return monotonic() - start, result, None


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
    """The name server stalls after the pool had an answer that is no longer fresh: a new
    connection, a probe and a pool's start all take the last answer."""
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("pool").addHandler(handler)
    p = pool.Pool(dsn, mode=mode, connect_timeout=0.5)
    p.fetchone("SELECT 1")
    time.sleep(FRESH + 0.2)
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


if __name__ == "__main__":
    scenario, mode, dns = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(globals()[scenario](mode, os.environ["POOL_TEST_DSN"], dns)))
