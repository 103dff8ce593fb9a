"""Bounds, fairness, timeouts and fork(), against real servers.

Threaded-mode tests hammer one pool from many threads; process-mode tests show exhaustion
failing at once; fork tests run in both modes.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import psycopg2
import pytest

import pool
from pgutil import app_sessions, unique_name

pytestmark = pytest.mark.db

INSERT = "INSERT INTO items (name) VALUES (%s) RETURNING id"


def run_threads(n, target):
    errors = []

    def guarded(i):
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_many_threads_never_exceed_max_size_per_endpoint(pool_factory, db):
    p = pool_factory(mode="threaded", max_size=3, timeout=30)
    peak = {"primary": 0, "replica1": 0, "replica2": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for node in peak:
                peak[node] = max(peak[node], app_sessions(db, node))
            for e in p.stats()["endpoints"]:
                assert e["size"] <= 3, e
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()

    def work(i):
        for k in range(20):
            if k % 5 == 0:
                p.fetchone(INSERT, (unique_name("many"),))
            else:
                with p.connection(readonly=True) as conn:
                    conn.cursor().execute("SELECT pg_sleep(0.001)")

    errors = run_threads(64, work)
    stop.set()
    sampler.join()
    assert errors == []
    assert all(1 <= n <= 3 for n in peak.values()), peak
    s = p.stats()
    assert s["checkouts"] == 64 * 20 and s["waits"] > 0 and s["timeouts"] == 0


def test_waiters_are_served_in_fifo_order(pool_factory):
    p = pool_factory(mode="threaded", max_size=1, replicas=(), timeout=10)
    order = []
    holder = p.connection()
    holder.__enter__()

    def waiter(i):
        with p.connection():
            order.append(i)

    threads = []
    for i in range(6):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while p.stats()["waiting"] < i + 1:  # queue them in a known order
            assert time.monotonic() < deadline
            time.sleep(0.001)
    holder.__exit__(None, None, None)
    for t in threads:
        t.join(10)
    assert order == list(range(6))


def test_a_waiter_past_its_timeout_gets_pool_timeout_with_the_pool_state(pool_factory):
    p = pool_factory(mode="threaded", max_size=1, replicas=(), timeout=0.3)
    with p.connection():
        box = {}

        def late():
            started = time.monotonic()
            try:
                with p.connection():
                    pass
            except pool.PoolTimeout as exc:
                box["error"], box["took"] = exc, time.monotonic() - started

        t = threading.Thread(target=late)
        t.start()
        t.join(5)
    message = str(box["error"])
    assert 0.28 <= box["took"] < 1.0
    for fact in ("within 0.30s", "mode=threaded", "waiting=", "primary", "up",
                 "size=1/1", "idle=0", "in_use=1"):
        assert fact in message, (fact, message)
    s = p.stats()
    assert s["timeouts"] == 1 and s["endpoints"][0]["timeouts"] == 1 and s["waiting"] == 0
    with p.connection():  # nothing leaked: the slot is usable again
        pass


def test_a_connection_returned_in_time_goes_to_the_waiter(pool_factory):
    p = pool_factory(mode="threaded", max_size=1, replicas=(), timeout=5)
    holder = p.connection()
    conn = holder.__enter__()
    got = {}

    def waiter():
        with p.connection() as c:
            got["same"] = c is conn

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    holder.__exit__(None, None, None)
    t.join(5)
    assert got == {"same": True}


def test_max_waiting_sheds_load(pool_factory):
    p = pool_factory(mode="threaded", max_size=1, replicas=(), timeout=5, max_waiting=1)
    with p.connection():
        t = threading.Thread(target=lambda: p.connection().__enter__())
        t.daemon = True
        t.start()
        while p.stats()["waiting"] < 1:
            time.sleep(0.001)
        started = time.monotonic()
        with pytest.raises(pool.PoolTimeout, match="max_waiting=1"):
            with p.connection():
                pass
        assert time.monotonic() - started < 0.1


def test_process_mode_exhaustion_fails_at_once(pool_factory):
    p = pool_factory(mode="process", max_size=1, replicas=(), timeout=5)
    with p.connection():
        started = time.monotonic()
        with pytest.raises(pool.PoolTimeout) as info:
            with p.connection():
                pass
        assert time.monotonic() - started < 0.05  # not the 5 s timeout: nobody could return one
    assert "process mode" in str(info.value) and "in_use=1" in str(info.value)
    with p.connection():
        pass


def test_close_fails_waiters_and_closes_connections_given_back(pool_factory, db):
    p = pool_factory(mode="threaded", max_size=1, replicas=(), timeout=5)
    box = {}
    holder = p.connection()
    holder.__enter__()

    def waiter():
        try:
            with p.connection():
                pass
        except pool.PoolError as exc:
            box["error"] = exc

    t = threading.Thread(target=waiter)
    t.start()
    while p.stats()["waiting"] < 1:
        time.sleep(0.001)
    p.close()
    t.join(5)
    assert "closed" in str(box["error"])
    holder.__exit__(None, None, None)
    assert p.stats()["size"] == 0
    with pytest.raises(pool.PoolError, match="closed"):
        p.fetchone("SELECT 1")


# -- fork ----------------------------------------------------------------------------------------

def _in_child(fn):
    """Run fn() in a forked child; return what it wrote (or raise with its error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            out = str(fn())
        except BaseException as exc:  # noqa: BLE001
            out, code = f"ERROR {type(exc).__name__}: {exc}", 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out = os.read(r, 65536).decode()
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_a_forked_child_uses_its_own_connections_and_leaves_the_parents_alone(make_pool, db):
    p = make_pool(max_size=2)
    with p.connection() as conn:
        parent_backend = conn.get_backend_pid()
    p.fetchone("SELECT 1", readonly=True)

    def child():
        with p.connection() as c:
            mine = c.get_backend_pid()
            c.cursor().execute("SELECT 1")
        assert p.fetchone("SELECT 1", readonly=True) == (1,)
        assert p.stats()["checkouts"] == 2  # the child's own counters
        p.close()  # and let everything inherited be freed, as a worker's exit would
        gc.collect()
        return mine

    child_backend = int(_in_child(child))
    assert child_backend != parent_backend
    with p.connection() as conn:  # the parent's session survived the child's exit
        assert conn.get_backend_pid() == parent_backend
        conn.cursor().execute("SELECT 1")
    assert p.fetchone("SELECT 1", readonly=True) == (1,)


def test_a_connection_in_use_across_fork_is_not_touched_by_the_child(make_pool, db):
    p = make_pool(max_size=2)
    holder = p.connection()
    conn = holder.__enter__()
    conn.cursor().execute(INSERT, (unique_name("fork"),))  # a transaction is open
    backend = conn.get_backend_pid()

    def child():
        holder.__exit__(None, None, None)  # the child "returns" the parent's connection
        with p.connection() as c:
            assert c.get_backend_pid() != backend
        p.close()
        gc.collect()
        return "ok"

    assert _in_child(child) == "ok"
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")  # still the parent's, still in its transaction
    assert cur.fetchone() == (backend,)
    holder.__exit__(None, None, None)
    assert p.fetchone("SELECT 1") == (1,)


def test_a_pool_made_before_fork_works_in_many_children(make_pool, db):
    p = make_pool(max_size=2)
    p.fetchone("SELECT 1")

    def child():
        rows = [p.fetchone("SELECT pg_backend_pid()", readonly=True)[0] for _ in range(3)]
        p.fetchone(INSERT, (unique_name("child"),))
        return len(set(rows))

    for _ in range(3):
        assert int(_in_child(child)) >= 1
    assert p.fetchone("SELECT 1") == (1,)


def test_the_broken_alternative_is_real(db):
    """Why the pool abandons inherited sockets: closing one in a child kills the parent's session."""
    conn = psycopg2.connect(db.dsn("primary"))
    conn.autocommit = True

    def child():
        conn.close()
        return "closed"

    _in_child(child)
    with pytest.raises(psycopg2.OperationalError):
        conn.cursor().execute("SELECT 1")


def test_connections_other_threads_hold_at_fork_do_not_shrink_the_childs_pool(pool_factory, db):
    """A thread busy with a connection when another thread forks does not exist in the child:
    its loan never comes back there, so it must not count against the child's max_size."""
    p = pool_factory(mode="threaded", max_size=1, replicas=(), timeout=2)
    held, release = threading.Event(), threading.Event()

    def busy():
        with p.connection():
            held.set()
            release.wait(10)

    t = threading.Thread(target=busy)
    t.start()
    held.wait(5)
    try:
        assert _in_child(lambda: p.fetchone("SELECT 1")[0]) == "1"
    finally:
        release.set()
        t.join(5)
    assert p.fetchone("SELECT 1") == (1,)
