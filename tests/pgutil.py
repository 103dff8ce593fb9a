"""Small helpers the pool tests share: which server served a request, superuser SQL, timing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

import psycopg2

from native.cluster import Cluster


@contextlib.contextmanager
def throwaway_cluster(prefix: str, env: dict[str, str] | None = None):
    """A primary and two replicas of their own on free loopback ports, destroyed afterwards."""
    base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(base, 0o755)  # the server runs as the postgres OS user when we are root
    c = Cluster(os.path.join(base, "cluster"), ports=Cluster.free_ports(3), env=env, durable=False)
    try:
        c.start()
        yield c
    finally:
        c.destroy()
        shutil.rmtree(base, ignore_errors=True)


def node_of(db: Cluster, endpoint_name: str | None) -> str:
    """'127.0.0.1:54321' -> 'replica1' (endpoints are named host:port)."""
    assert endpoint_name, "no endpoint recorded"
    port = int(endpoint_name.rsplit(":", 1)[1])
    return {p: n for n, p in db.ports.items()}[port]


def run_sql(dsn: str, sql: str, params: Any = None) -> list[tuple]:
    """Run one statement on a fresh connection, in autocommit; return the rows (if any)."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def admin_sql(db: Cluster, node: str, sql: str, params: Any = None) -> list[tuple]:
    """Run SQL as the superuser on one node."""
    return run_sql(db.dsn(node, user="postgres"), sql, params)


def terminate_app_sessions(db: Cluster, node: str) -> int:
    rows = admin_sql(db, node, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE usename = %s AND pid <> pg_backend_pid()",
                     (db.env["APP_USER"],))
    return rows[0][0]


def app_sessions(db: Cluster, node: str) -> int:
    """The app role's pooled sessions on a node (not the pool's one monitor per endpoint)."""
    rows = admin_sql(db, node, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s "
                               "AND backend_type = 'client backend' "
                               "AND application_name <> 'pool-monitor'", (db.env["APP_USER"],))
    return rows[0][0]


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def count_items(db: Cluster, node: str, name: str) -> int:
    return admin_sql(db, node, "SELECT count(*) FROM items WHERE name = %s", (name,))[0][0]


def assert_a_block_is_one_transaction(db: Cluster, p: Any) -> None:
    """A write block of pool `p` starts with autocommit off, and an exception in it rolls back
    the INSERT it made (on the primary of `db`)."""
    name = unique_name()
    try:
        with p.connection() as conn:
            assert conn.autocommit is False
            conn.cursor().execute("INSERT INTO items (name) VALUES (%s)", (name,))
            raise _Undo()
    except _Undo:
        pass
    assert count_items(db, "primary", name) == 0


class _Undo(Exception):
    pass


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
               what: str = "condition") -> float:
    """Poll until predicate() is truthy; return the seconds it took. Fails after timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def timed(fn: Callable[[], Any]) -> tuple[float, Any, BaseException | None]:
    """(seconds, result, exception) of one call."""
    start = time.monotonic()
    try:
        result = fn()
        return time.monotonic() - start, result, None
    except Exception as exc:  # noqa: BLE001 - the caller inspects it
        return time.monotonic() - start, None, exc


@contextlib.contextmanager
def stalled(db: Cluster, node: str):
    """Every process of a node stopped (SIGSTOP), as a server stuck on a dead disk or a frozen
    VM: its kernel still accepts and acknowledges, so only a client-side deadline notices."""
    victims = db.stall(node)
    try:
        yield victims
    finally:
        db.resume(node)


def proxied(db: Cluster, node: str, proxy: Any, **kwargs: str) -> str:
    """The node's DSN through a test proxy (tests/proxy.py), with extra libpq settings."""
    dsn = db.dsn(node).replace(f"port={db.port(node)}", f"port={proxy.port}")
    return " ".join([dsn, *(f"{k}={v}" for k, v in kwargs.items())])


def terminate_under_queue(db: Cluster, p: Any, before_each: Callable[[], Any], rounds: int = 5,
                          callers: int = 8) -> list[BaseException]:
    """``callers`` threads loop on 20 ms statements through ``p`` (a pool smaller than that,
    so callers queue); ``rounds`` times, ``before_each()`` then one of their sessions on the
    primary is terminated. Returns the errors the callers saw."""
    errors: list[BaseException] = []
    done = threading.Event()

    def caller() -> None:
        while not done.is_set():
            try:
                with p.connection() as conn:
                    conn.cursor().execute("SELECT pg_sleep(0.02)")
            except Exception as exc:  # noqa: BLE001 - the caller inspects them
                errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    try:
        for _ in range(rounds):
            before_each()
            admin_sql(db, "primary", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE usename = %s AND state = 'active' AND pid <> pg_backend_pid() "
                      "LIMIT 1", (db.env["APP_USER"],))
    finally:
        done.set()
        for t in threads:
            t.join()
    return errors


_INSERT = "INSERT INTO items (name) VALUES (%s) RETURNING id"


def fork_replica2(c: Cluster, p: Any, paused: bool = False) -> tuple[int, str]:
    """An asynchronous failover that leaves replica2 off the new primary's history: replica1
    stops, the primary writes on (replica2 receives it), the primary dies, replica1 starts and
    is promoted. replica2 then holds WAL past the new primary's positions, though it never had
    its writes: replayed, or with ``paused`` only received (its replay is paused, and stays so).
    Returns (id, token) of a row written on the new primary once ``p`` follows it."""
    c.kill("replica1")
    if paused:
        admin_sql(c, "replica2", "SELECT pg_wal_replay_pause()")
    admin_sql(c, "primary", "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad "
                            "FROM generate_series(1, 60000) g")  # about 16 MB of WAL
    if paused:
        (end,) = admin_sql(c, "primary", "SELECT pg_current_wal_lsn()")[0]
        wait_until(lambda: admin_sql(c, "replica2", "SELECT pg_last_wal_receive_lsn() >= %s",
                                     (end,))[0][0], timeout=20, what="replica2 received it all")
    else:
        c.wait_replayed(nodes=["replica2"])
    c.kill("primary")
    c.start_node("replica1")
    admin_sql(c, "replica1", "SELECT pg_promote()")
    c.state.set_primary("replica1")  # so that c.rejoin() rewinds replica2 onto it
    for node in ("primary", "replica2"):
        c.state.set_rewind(node, True)
    wait_until(lambda: timed(lambda: p.fetchone(_INSERT, (unique_name(),)))[2] is None,
               timeout=20, interval=0.05, what="writes on the new primary")
    assert node_of(c, p.last_endpoint) == "replica1"
    (row_id,) = p.fetchone(_INSERT, (unique_name(),))
    token = p.write_token()
    ahead = admin_sql(c, "replica2", "SELECT GREATEST(pg_last_wal_replay_lsn(), "
                      "pg_last_wal_receive_lsn()) > %s::pg_lsn",
                      (token.rsplit(":", 1)[-1],))  # (the token: "timeline:position")
    assert ahead == [(True,)], "the fork did not leave replica2 ahead of the new primary"
    return row_id, token
