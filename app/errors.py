"""The errors a handler may raise, and which database errors mean "try again shortly".

Error mapping (``application.py`` applies it; every error body is ``{"error": "<message>"}``):

    =====================================================  ======  ==========================
    cause                                                  status  extra headers
    =====================================================  ======  ==========================
    no route for the path                                  404
    route exists, method not served                        405     Allow
    invalid id / limit / JSON body / name; short body      400
    client reset or timed out while sending the body       400     (logged at INFO only)
    POST without Content-Length (e.g. chunked)             411
    POST body over APP_MAX_BODY (4096 bytes)               413
    POST whose Content-Type is not application/json        415
    item not found                                         404     X-Served-By
    database outage (see DATABASE_OUTAGE)                  503     Retry-After: 1
    anything else (a bug): traceback to the log only       500
    =====================================================  ======  ==========================

Every response a database server answered (200, 201, the item 404) names it in
``X-Served-By: host:port``; responses decided before any query (400, 405, ...) and outages (503:
no server answered) carry none.
"""

from __future__ import annotations

import psycopg2
import psycopg2.extensions

import pool

# Errors that say the database cannot serve us right now, not that the request is wrong:
# - pool.PoolError: pool.EndpointUnavailable (the endpoint needed is down, or the connection was
#   lost mid-statement), pool.PoolTimeout (no connection free in time), or a closed pool while
#   the worker shuts down;
# - psycopg2.OperationalError: a connect or a statement failed at the server or the network
#   (refused, reset, admin shutdown, statement timeout), mostly in no-pool mode;
# - psycopg2.InterfaceError: the connection was already closed under us;
# - TransactionRollbackError: serialization failure, deadlock, or a replica cancelling a read
#   that conflicts with recovery: the same request succeeds when retried.
DATABASE_OUTAGE: tuple[type[BaseException], ...] = (
    pool.PoolError,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.extensions.TransactionRollbackError,
)

RETRY_AFTER_SECONDS = 1


class HTTPError(Exception):
    """A response other than success, raised from anywhere in request handling.

    ``message`` goes to the client, so it must never contain server internals: no SQL, no
    exception text, no echo of the client's input.
    """

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class ClientDisconnected(HTTPError):
    """The client went away (reset, timeout) while sending its body: its fault, not a bug. A 400
    for the access log; the client never sees it."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(400, "the request body was cut off")
        self.cause = cause


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


def not_found(message: str = "not found", served_by: str | None = None) -> HTTPError:
    return HTTPError(404, message, [("X-Served-By", served_by)] if served_by else None)


def method_not_allowed(allowed: list[str]) -> HTTPError:
    return HTTPError(405, "method not allowed", [("Allow", ", ".join(allowed))])
