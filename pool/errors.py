"""The pool's own exceptions.

Errors raised by PostgreSQL inside a ``with pool.connection()`` block are psycopg2's and reach
the caller unchanged; these classes describe what only the pool knows. Every message names the
endpoint and the pool's view of it, and none ever contains a password.
"""

from __future__ import annotations


class PoolError(Exception):
    """Base class of every error the pool raises itself (closed pool, misuse, bad state, ...)."""


class PoolTimeout(PoolError):
    """No connection became available in time.

    Raised after ``timeout`` seconds in ``threaded`` mode, and at once in ``process`` mode where no
    other thread could return one. The message carries the pool's state: per endpoint size, idle,
    in use, state and last error, and the number of waiting callers.
    """


class EndpointUnavailable(PoolError):
    """No endpoint can serve the request: the one it needs is down, or the connection was lost.

    ``endpoint`` names the endpoint (``host:port`` unless named) when one is concerned. Raised
    quickly: an endpoint known to be down is skipped without a new connection attempt until its
    next probe succeeds.
    """

    def __init__(self, message: str, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class EndpointRefused(EndpointUnavailable):
    """The server answered and refused us: wrong password, unknown database or role, or no
    ``pg_hba.conf`` entry. A configuration problem, not an outage: fix it on either side; the pool
    keeps probing and takes the endpoint back once a login succeeds."""


class QueryTimeout(EndpointUnavailable):
    """A statement got no answer from the server within ``query_timeout``.

    The pool closed the connection (the server may be stalled, or the host gone) and ejected the
    endpoint. For a write, the statement may or may not have been applied.
    """
