"""gunicorn settings shared by gunicorn_threaded.py, gunicorn_process.py and gunicorn_nopool.py.

Each of those configs star-imports ``__all__`` from here, then sets its worker model. gunicorn
executes them in the master process: this module therefore imports only the standard library
(never psycopg2 or the pool) and connects to nothing. Works with gunicorn 22 and later (Debian
trixie ships 23; requirements-app.txt pins 27). Environment:

    APP_BIND              listen address (default 0.0.0.0:8000; tests use 127.0.0.1:<port>)
    APP_BIND_UNIX         also listen on this unix socket (the Docker stack's nginx reaches
                          the sync workers there: see docker-compose.yml)
    APP_WORKERS           worker processes (default 2)
    APP_THREADS           threads per gthread worker (default 8)
    APP_TIMEOUT           seconds before a silent worker is killed (default 30)
    APP_GRACEFUL_TIMEOUT  seconds a stopping worker may finish its requests (default 10; keep the
                          container's stop grace period longer)
    APP_ACCESS_LOG        on (default) or off: gunicorn's access line per request. Behind nginx,
                          which logs every request itself (with the server that answered), the
                          stacks turn it off: a second line per request costs CPU for nothing
"""

from __future__ import annotations

import math
import os
from typing import Any

from app.config import QUERY_TIMEOUT

__all__ = [
    "wsgi_app", "bind", "preload_app", "accesslog", "errorlog", "access_log_format",
    "worker_tmp_dir", "timeout", "graceful_timeout", "keepalive", "control_socket_disable",
    "forwarder_headers", "post_worker_init", "worker_exit",
]


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, not {value}")
    return value


def env_switch(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "off"):
        return raw == "on"
    raise SystemExit(f"{name}={raw!r}: say on or off")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None


def require_single_threaded_for_process_mode(threads: int) -> None:
    """APP_POOL_MODE=process under threads would share a lock-free pool: refuse to start."""
    if os.environ.get("APP_POOL_MODE") == "process" and threads > 1:
        raise SystemExit(f"APP_POOL_MODE=process needs threads=1, this config runs {threads}; "
                         "unset APP_POOL_MODE so the config picks its own mode")


wsgi_app = "app.wsgi:application"  # the default; the command line may name it too
bind = [os.environ.get("APP_BIND", "0.0.0.0:8000")]
if os.environ.get("APP_BIND_UNIX"):  # gunicorn replaces a stale socket file left by a crash
    bind.append("unix:" + os.environ["APP_BIND_UNIX"])

# No preload: the app, and with it any pool, must come to life in the worker, after the fork.
preload_app = False

# Logs to the container's stdout/stderr. The access line names the server that answered.
accesslog = "-" if env_switch("APP_ACCESS_LOG", True) else None
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)sB %(M)sms served_by=%({x-served-by}o)s pid=%(p)s'

# The workers' heartbeat file: on a disk-backed /tmp its fchmod can block (gunicorn FAQ).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

# A request may legitimately wait for the pool (POOL_TIMEOUT), then twice (a read's retry on
# another server) for a connection attempt and a statement (POOL_CONNECT_TIMEOUT and
# POOL_QUERY_TIMEOUT, which the pool enforces even on a stalled server); only a worker stuck
# beyond that may be killed.
_pool_wait = env_float("POOL_TIMEOUT", 5.0) + 2 * (
    max(1, math.ceil(env_float("POOL_CONNECT_TIMEOUT", 2.0))) + env_float("POOL_QUERY_TIMEOUT", QUERY_TIMEOUT))
timeout = env_int("APP_TIMEOUT", 30)
if timeout <= _pool_wait:
    raise SystemExit(f"APP_TIMEOUT={timeout} must exceed the longest database wait ({_pool_wait:g}s: "
                     "POOL_TIMEOUT + 2 x (POOL_CONNECT_TIMEOUT + POOL_QUERY_TIMEOUT))")
graceful_timeout = env_int("APP_GRACEFUL_TIMEOUT", 10)

# gthread workers keep idle client connections this long (sync workers ignore it). nginx keeps
# its upstream connections for 4 s (compose/nginx/nginx.conf.template): the server must not
# close first, or nginx may send a request on a connection gunicorn is just closing.
keepalive = env_int("APP_KEEPALIVE", 5)

# By default gunicorn lets a peer in forwarded_allow_ips (127.0.0.1, i.e. any local client and
# nginx on the native stack) set SCRIPT_NAME and PATH_INFO with request headers, and answers a
# SCRIPT_NAME that is not a prefix of the path with its own HTML 500. Nothing here is mounted
# under a prefix, so no header may set them: an underscore header is then simply dropped.
forwarder_headers = ""

# gunicorn >= 25.1 opens a control socket at a fixed default path ($XDG_RUNTIME_DIR or
# ~/.gunicorn/gunicorn.ctl): several instances on one host would fight over it, and nothing here
# uses it. Older versions ignore the unknown setting.
control_socket_disable = True


# gunicorn's own answers to requests it refuses before the app sees them (a raw non-ASCII byte
# in the path, a control character in a header value, ...; gunicorn 27 refuses more than 23, and
# nginx passes these on) are HTML pages that echo the request line. These are JSON like the app's
# errors, in the same words as nginx's (compose/nginx/json-errors.conf), and echo nothing.
GUNICORN_ERRORS = {
    400: "bad request",
    403: "forbidden",
    414: "the request line is too large",
    417: "expectation failed",
    431: "a request header is too large",
    500: "internal error",
    501: "this transfer coding is not supported",
}


def json_error_page(status: int, reason: str) -> bytes:
    """The whole response gunicorn writes for an error of its own (it then closes)."""
    import json
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = reason if reason.isascii() and reason.isprintable() else ""
    message = GUNICORN_ERRORS.get(status) or (phrase.lower() if phrase else "error")
    body = json.dumps({"error": message}, separators=(",", ":")).encode("ascii") + b"\n"
    head = (f"HTTP/1.1 {status} {phrase}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode("ascii") + body


def use_json_error_pages() -> bool:
    """Replace gunicorn.util.write_error, which every worker class calls for these (gunicorn 22
    to 27: handle_error in gunicorn/workers/base.py), by one that writes json_error_page().
    False if this gunicorn has no such function to replace."""
    from gunicorn import util

    if not callable(getattr(util, "write_error", None)) or not callable(getattr(util, "write_nonblock", None)):
        return False

    def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
        util.write_nonblock(sock, json_error_page(int(status_int), str(reason)))

    util.write_error = write_error
    return True


def post_worker_init(worker: Any) -> None:
    """Send the app's and the pool's log records to gunicorn's error log, in its format, and
    answer gunicorn's own errors in JSON (use_json_error_pages).

    Without the first, they would reach Python's last-resort handler (warnings only, no
    timestamp), and the pool's INFO lines about failovers would be lost.
    """
    import logging

    if not use_json_error_pages():
        worker.log.warning("this gunicorn has no util.write_error to replace: its own error answers "
                           "stay HTML (app/gunicorn_common.py, use_json_error_pages)")

    for name in ("app", "pool"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for handler in worker.log.error_log.handlers:
            logger.addHandler(handler)


def worker_exit(server: Any, worker: Any) -> None:
    """Close the worker's pool on the way out, so its sessions end cleanly, not by timeout."""
    import sys

    wsgi = sys.modules.get("app.wsgi")  # not imported: the app never loaded, nothing to close
    if wsgi is not None:
        wsgi.application.close()
