"""Database access for the handlers: through the pool, or with a new connection per request.

Both implementations run one statement per call, reads (``readonly=True``) on a replica and
writes on the primary, and return the value together with the endpoint that served it, which
becomes the ``X-Served-By`` header. (The pooled one reads ``pool.last_endpoint`` right after a
successful call, when it names this call's server; after a failed call it may still name an
earlier request's, which is why a failure never yields an endpoint.)

``PooledDatabase`` builds its ``pool.Pool`` lazily, on the first request in the worker process:
never at import and never in gunicorn's master, whose connections and threads forked children
would share or lose. If the process id changes (the object was inherited through fork), the
child builds a pool of its own.

``DirectDatabase`` (``APP_POOL_MODE=nopool``) is the baseline the pool is measured against: a
fresh psycopg2 connection per statement, closed right after. It keeps the pool's routing (reads
round-robin over the replicas, then the primary as a last resort; a read that fails on one
server is tried on the next) so that the comparison measures pooling, not availability.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import weakref
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

import pool

from .config import Settings


class Served(NamedTuple):
    value: Any
    endpoint: str | None  # "host:port" of the server that answered


class Database(Protocol):
    """What the handlers need. ``mode`` is the APP_POOL_MODE it implements."""

    mode: str

    def fetchone(self, sql: str, params: Any = None, *, readonly: bool,
                 after: str | None = None) -> Served: ...
    def fetchall(self, sql: str, params: Any = None, *, readonly: bool,
                 after: str | None = None) -> Served: ...
    def write_token(self) -> str | None: ...
    def stats(self, everyone: bool = False) -> dict[str, Any]: ...
    def close(self) -> None: ...


def make_database(settings: Settings, environ: Mapping[str, str]) -> Database:
    if settings.mode == "nopool":
        return DirectDatabase(settings)
    return PooledDatabase(settings.mode, {**environ, "POOL_QUERY_TIMEOUT": str(settings.query_timeout)})


class PooledDatabase:
    """One ``pool.Pool`` per worker process, built on first use."""

    def __init__(self, mode: str, environ: Mapping[str, str]) -> None:
        self.mode = mode
        self._environ = dict(environ)
        self._pool: pool.Pool | None = None
        self._pid = 0  # the process that built self._pool
        self._lock = threading.Lock()  # gthread workers: two first requests, one pool
        # A lock held by another thread at fork time would stay locked forever in the child.
        os.register_at_fork(after_in_child=lambda ref=weakref.ref(self): _new_lock(ref))

    def pool(self) -> pool.Pool:
        """This process's pool, built on first call (double-checked under the lock)."""
        p = self._pool
        if p is not None and self._pid == os.getpid():
            return p
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # An inherited pool is dropped, not closed: closing would write to sockets the
                # parent still owns (the pool's own at-fork hook has abandoned them already).
                self._pool = pool.Pool.from_env(self._environ, mode=self.mode)
                self._pid = os.getpid()
            return self._pool

    def fetchone(self, sql: str, params: Any = None, *, readonly: bool,
                 after: str | None = None) -> Served:
        p = self.pool()
        return Served(p.fetchone(sql, params, readonly=readonly, after=after), p.last_endpoint)

    def fetchall(self, sql: str, params: Any = None, *, readonly: bool,
                 after: str | None = None) -> Served:
        p = self.pool()
        return Served(p.fetchall(sql, params, readonly=readonly, after=after), p.last_endpoint)

    def write_token(self) -> str | None:
        """A token for everything written so far (one round trip on the primary)."""
        return self.pool().write_token()

    def stats(self, everyone: bool = False) -> dict[str, Any]:
        """This worker's pool; with ``everyone``, every worker sharing its health board."""
        return self.pool().stats(scope="host" if everyone else "process")

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None


def _new_lock(ref: "weakref.ref[PooledDatabase]") -> None:
    db = ref()
    if db is not None:
        db._lock = threading.Lock()


class _Endpoint:
    """One server as the no-pool mode sees it: DSNs for reads and writes, and counters."""

    def __init__(self, dsn: str, role: str, connect_timeout: float) -> None:
        params = parse_dsn(dsn)
        self.role = role
        self.name = f"{params.get('host') or params.get('hostaddr') or 'localhost'}:{params.get('port') or 5432}"
        self.password = params.get("password")
        # The same libpq settings the pool gives its connections, so both modes do the same work
        # per connection (minus the reuse).
        params.setdefault("connect_timeout", str(max(2, math.ceil(connect_timeout))))
        params.setdefault("application_name", "app-nopool")
        read = dict(params, options=(params.get("options", "") + " -c default_transaction_read_only=on").strip())
        self.read_dsn = make_dsn(**read)
        if role == "primary":
            params.setdefault("target_session_attrs", "read-write")
        self.write_dsn = make_dsn(**params)
        self.state = "unknown"  # the outcome of the latest attempt: up or down
        self.served = self.connect_errors = self.errors = 0
        self.last_error: str | None = None


class DirectDatabase:
    """No pool: connect, run one statement, close. Same routing and error types as the pool."""

    mode = "nopool"

    def __init__(self, settings: Settings) -> None:
        self._primary = _Endpoint(settings.primary, "primary", settings.connect_timeout)
        self._replicas = [_Endpoint(r, "replica", settings.connect_timeout) for r in settings.replicas]
        self._next = itertools.count()  # next() on a count is atomic under the GIL
        self._lock = threading.Lock()  # guards the counters only
        self._secrets = [e.password for e in self._endpoints() if e.password]

    def _endpoints(self) -> list[_Endpoint]:
        return [self._primary, *self._replicas]

    def _read_order(self) -> list[_Endpoint]:
        """The replicas, starting one further on each call, then the primary as a fallback."""
        if not self._replicas:
            return [self._primary]
        start = next(self._next) % len(self._replicas)
        return self._replicas[start:] + self._replicas[:start] + [self._primary]

    def fetchone(self, sql: str, params: Any = None, *, readonly: bool,
                 after: str | None = None) -> Served:
        return self._run(sql, params, readonly, lambda cur: cur.fetchone(), after)

    def fetchall(self, sql: str, params: Any = None, *, readonly: bool,
                 after: str | None = None) -> Served:
        return self._run(sql, params, readonly, lambda cur: cur.fetchall(), after)

    def write_token(self) -> str | None:
        """The baseline issues no read-after tokens (it would cost another connection per
        write); a read that brings one from elsewhere goes to the primary, which has it."""
        return None

    def _run(self, sql: str, params: Any, readonly: bool, fetch: Callable[[Any], Any],
             after: str | None = None) -> Served:
        # A read may go to the next server if one fails (it changes nothing); a write is tried
        # once, since we cannot know whether a lost statement was applied. A read after a token
        # goes to the primary.
        if after is not None:
            pool.lag.parse_token(after)  # a malformed token is the client's error (400)
        candidates = self._read_order() if readonly and after is None else [self._primary]
        error: Exception | None = None
        for ep in candidates:
            try:
                conn = psycopg2.connect(ep.read_dsn if readonly else ep.write_dsn)
            except psycopg2.OperationalError as exc:
                self._record(ep, exc, "connect_errors")
                error = exc
                continue
            try:
                conn.autocommit = True  # one statement: its own implicit transaction, no BEGIN
                with conn.cursor() as cur:
                    cur.execute(sql, params)
                    value = fetch(cur)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                self._record(ep, exc, "errors")
                if not readonly:
                    raise
                error = exc
                continue
            finally:
                conn.close()
            self._record(ep, None, "served")
            return Served(value, ep.name)
        assert error is not None
        raise error

    def _record(self, ep: _Endpoint, exc: Exception | None, counter: str) -> None:
        """Count an outcome (served, connect_errors or errors) and remember the endpoint's state."""
        text = str(exc).strip() if exc is not None else ""
        with self._lock:
            setattr(ep, counter, getattr(ep, counter) + 1)
            ep.state = "up" if exc is None else "down"
            if exc is not None:
                ep.last_error = self._redact(text.splitlines()[0] if text else type(exc).__name__)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def stats(self, everyone: bool = False) -> dict[str, Any]:
        """The counters of this worker (no pool, so nothing is shared between workers)."""
        with self._lock:
            endpoints = [{
                "name": ep.name, "role": ep.role, "state": ep.state, "served": ep.served,
                "connect_errors": ep.connect_errors, "errors": ep.errors, "last_error": ep.last_error,
            } for ep in self._endpoints()]
        return {"mode": self.mode, "pid": os.getpid(), "endpoints": endpoints}

    def close(self) -> None:
        """Nothing stays open between requests."""
