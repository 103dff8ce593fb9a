"""One server connection's lifecycle: open, check, classify failures, close or abandon.

A ``PooledConnection`` wraps the psycopg2 connection with what the pool needs to know about it;
the caller only ever sees the psycopg2 connection itself.
"""

from __future__ import annotations

import os
import random
import select
from typing import Any, Callable

import psycopg2
import psycopg2.extensions as ext

from .endpoint import Endpoint

LIFETIME_JITTER = 0.1  # lifetimes are shortened by up to 10% so connections don't expire together

# SQLSTATEs that mean the session is gone or going: class 08 (connection exception) and
# 57P01-57P03 (admin shutdown, crash shutdown, cannot connect now).
_DISCONNECT_CODES = ("57P01", "57P02", "57P03")


class PooledConnection:
    """A server connection plus the facts the pool checks on every checkout, all O(1)."""

    __slots__ = ("raw", "endpoint", "generation", "pid", "expires", "last_used", "readonly", "_poller")

    def __init__(self, raw: Any, endpoint: Endpoint, now: float, max_lifetime: float) -> None:
        self.raw = raw
        self.endpoint = endpoint
        self.generation = endpoint.generation
        self.pid = os.getpid()  # the process that opened it; only that one may use or close it
        self.expires = now + max_lifetime * (1 - LIFETIME_JITTER * random.random())
        self.last_used = now
        self.readonly: bool | None = None  # psycopg2's per-transaction flag, as last set by us
        # Registered once: checking for a server-side close is then a single poll() syscall.
        self._poller = select.poll()
        self._poller.register(raw.fileno(), select.POLLIN | select.POLLPRI)

    def closed_by_server(self) -> bool:
        """True if the server closed or wrote to this idle connection. No round trip.

        An idle session receives nothing unless the server is ending it (shutdown, restart,
        ``pg_terminate_backend``: a FATAL message, then EOF). Anything readable means the
        connection must not be handed out.
        """
        return bool(self._poller.poll(0))

    def ping(self) -> bool:
        """A real round trip, for connections idle long enough that silence proves little."""
        try:
            with self.raw.cursor() as cur:
                cur.execute("SELECT 1")
            self.raw.rollback()
            return True
        except psycopg2.Error:
            return False

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:  # closing a broken connection may fail; it is gone either way
            pass

    def abandon(self) -> None:
        """Forget a connection inherited through fork() without touching the parent's session."""
        abandon(self.raw)


def abandon(raw: Any) -> None:
    """Close a psycopg2 connection inherited through fork() without disturbing the parent.

    Closing it, even implicitly when the object is freed, would send the server a Terminate
    message over the socket the parent shares, ending the parent's session. So the child first
    points its copy of the descriptor at /dev/null: libpq's goodbye goes nowhere.
    """
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, raw.fileno())
        finally:
            os.close(devnull)
    except (OSError, psycopg2.Error):
        pass
    try:
        raw.close()
    except Exception:
        pass


def open_connection(endpoint: Endpoint, configure: Callable[[Any], None] | None) -> Any:
    """Connect to ``endpoint`` (blocking, bounded by libpq's connect_timeout)."""
    raw = psycopg2.connect(endpoint.dsn)
    try:
        if configure is not None:
            configure(raw)
            if raw.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
                raw.commit()  # what configure did is part of the session from now on
    except BaseException:
        raw.close()
        raise
    return raw


def is_disconnect(exc: BaseException | None, raw: Any) -> bool:
    """Did this error (or the connection's state) show the session is lost?

    Decided by psycopg2's ``closed`` flag and SQLSTATEs, not by matching message text.
    ``closed == 2`` is psycopg2's "connection broken"; 1 means the caller closed it.
    """
    if raw.closed == 2:
        return True
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        code = exc.pgcode
        return code is None or code.startswith("08") or code in _DISCONNECT_CODES
    return False


def describe_error(exc: BaseException) -> str:
    """The first line of an error, with its class: enough to act on, short enough to log."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()
