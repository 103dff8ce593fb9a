"""The pool's own exceptions.

Errors raised by PostgreSQL inside a ``with pool.connection()`` block are psycopg2's and reach
the caller unchanged; these classes describe what only the pool knows.
"""

from __future__ import annotations


class PoolError(Exception):
    """Base class of every error the pool raises itself (closed pool, bad state, ...)."""


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
