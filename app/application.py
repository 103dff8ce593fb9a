"""The WSGI application: routing, the error mapping, and the last-resort handler.

``create_app()`` reads the settings and wires routes to handlers; it opens no connection (the
pool is built on the first request, see ``db.py``). Each request ends in exactly one of:

- the handler's response (2xx, or 404 for a missing item);
- an ``HTTPError`` it raised: 400, 404, 405, 411, 413, 415, as JSON (see ``errors.py``); a
  client that went away mid-body is one of them (400, logged at INFO without a traceback);
- a database outage (``errors.DATABASE_OUTAGE``): 503 with ``Retry-After: 1``, logged as a
  warning in one line;
- any other exception, which is a bug: the traceback goes to the log, the client gets a JSON 500
  that says nothing more, so no stack trace, SQL or DSN ever reaches a response body.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterable, Mapping

from . import handlers
from .config import Settings
from .db import Database, make_database
from .errors import DATABASE_OUTAGE, ClientDisconnected, HTTPError
from .http import Request, Response, StartResponse, error_response, json_response, outage_response
from .routing import Router

log = logging.getLogger("app")


class App:
    """The WSGI callable; one per worker process, shared by its threads."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.routes: list[dict[str, str]] = []  # what GET / lists
        self.router = Router()
        create_item = functools.partial(handlers.create_item, max_body=settings.max_body)
        for method, template, handler, example, text in (
            ("GET", "/", self._index, "/", "this list of routes"),
            ("GET", "/items/{item_id}", handlers.get_item, "/items/1", "one item, read on a replica"),
            ("GET", "/items", handlers.list_items, "/items?limit=5",
             "the newest items (limit 1..100, default 10), read on a replica"),
            ("POST", "/items", create_item, None,
             'create an item: a JSON body {"name": "..."} (1..200 characters), written on the primary'),
            ("GET", "/healthz", handlers.healthz, "/healthz",
             "200 while this worker can serve reads, with each endpoint's state"),
            ("GET", "/stats", handlers.stats, "/stats", "this worker's pool statistics"),
        ):
            self.router.add(template, method, handler)
            self.routes.append({"method": method, "path": template, "description": text,
                                **({"example": example} if example else {})})

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            response = self._respond(environ)
        except Exception:  # the last resort: a bug, not the client's or the database's fault
            log.exception("unhandled error in %s %r", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            response = error_response(500, "internal server error")
        # X-Worker: which process answered, so a load test can tell how each worker fared
        # (in process mode every worker has its own pool, and an outage ends for each of them).
        start_response(response.status_line, [*response.headers, ("X-Worker", self._worker())])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else response.body]

    def _respond(self, environ: Mapping[str, Any]) -> Response:
        if self.settings.mode == "process" and environ.get("wsgi.multithread"):
            # The process-mode pool has no lock: under threads it would hand one connection to
            # two requests. Refuse loudly rather than corrupt quietly.
            raise RuntimeError("APP_POOL_MODE=process needs single-threaded workers (gunicorn sync, "
                               "threads=1); use APP_POOL_MODE=threaded with gthread")
        request = Request.from_environ(environ)
        try:
            handler, params = self.router.match(request.method, request.path)
            return handler(request, self.db, **params)
        except ClientDisconnected as exc:
            # The client reset or stalled mid-body: nothing to fix here, and nobody to answer.
            log.info("client went away while sending the body of %s %r: %s", request.method,
                     request.path, type(exc.cause).__name__)
            return error_response(exc.status, exc.message)
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except DATABASE_OUTAGE as exc:
            # Pool messages carry no password; libpq's never echo it. First line only: enough to
            # tell a refused connection from a timeout without flooding the log during an outage.
            text = str(exc).strip().splitlines()
            log.warning("database unavailable for %s %r: %s: %s", request.method, request.path,
                        type(exc).__name__, text[0] if text else "")
            # No X-Served-By: no server answered. (The log line above names the one that failed.)
            return outage_response({"error": "database unavailable, retry shortly"})

    def _index(self, request: Request, db: Database) -> Response:
        """GET /: the routes, each with an example path where one can be given."""
        return json_response(200, {"service": f"pool sample app ({self.settings.mode})",
                                   "routes": self.routes})

    @staticmethod
    def _worker() -> str:
        return str(os.getpid())  # not cached: the app object may be built before gunicorn forks

    def close(self) -> None:
        """Close this process's pool (gunicorn's worker_exit hook calls this)."""
        self.db.close()


def create_app(environ: Mapping[str, str] | None = None) -> App:
    """Build the application from ``environ`` (default: the process environment). No I/O."""
    environ = os.environ if environ is None else environ
    settings = Settings.from_env(environ)
    return App(settings, make_database(settings, environ))
