"""Small helpers the pool tests share: which server served a request, superuser SQL, timing."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Callable

import psycopg2

from native.cluster import Cluster


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
