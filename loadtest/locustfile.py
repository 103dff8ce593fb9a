"""The Locust users for the sample app, and the per-request log every analysis is computed from.

This is the only module that imports locust (importing it monkey-patches the process with
gevent): the harness (``python -m loadtest``) and the tests run it as ``locust -f ...`` in a
subprocess. The stepped load shape lives in ``shape.py`` so that a run without it (constant
load: ``-u N -r N -t T``) simply leaves that file out of ``-f``.

``ItemsUser`` (the default) runs a mix, ~90 % reads / 10 % writes, tagged so ``-T read`` or
``-T write`` runs one side only:

    GET  /items/<random id 1..LOADTEST_MAX_ID>   read    weight 80
    GET  /items?limit=10                         read    weight 10
    POST /items {"name": "lt-..."}               write   weight 10

The read-your-writes users of the lag scenario live in ``readback.py`` (a locustfile of its
own, so they never join the other scenarios' runs); they log through this module.

Settings (environment; the harness sets them):

    LOADTEST_LOG_DIR          write the per-request log there (unset: no log)
    LOADTEST_MAX_ID           largest id to read (default 10000, the seeded rows)
    LOADTEST_USER_RPS         requests/s per user; 0 (default) = closed loop, no wait
    LOADTEST_NETWORK_TIMEOUT  seconds to wait for a response (default 10)
    LOADTEST_CONNECT_TIMEOUT  seconds to wait for a TCP connection (default 3)
    LOADTEST_NEW_CONNECTIONS  1 = one TCP connection per request (``Connection: close``), so
                              every request is accepted anew and a gunicorn's workers share
                              them; default: each user keeps one connection alive
    LOADTEST_ALLOW_FAILURES   1 = failed requests do not make locust exit 1 (failover runs
                              expect them); exceptions in this file still do

Per-request log: ``requests-<host>-<pid>.csv`` in LOADTEST_LOG_DIR, one file per locust process
(each worker of a distributed run writes its own), columns ``LOG_COLUMNS``. Why our own log and not
Locust's stats: its history is a ~10 s sliding average (see docs/loadtest.md), far too coarse to
time a failover, and it does not know which server answered.
"""

from __future__ import annotations

import csv
import os
import random
import socket
import time
import uuid

from locust import FastHttpUser, constant, constant_throughput, events, tag, task

LOG_COLUMNS = ("start", "latency_ms", "kind", "name", "status", "served_by", "item_id", "error",
               "read_after", "worker")
# worker: the app's X-Worker header, the pid of the gunicorn worker that answered ("" if none did).
# read_after: on a 201, "issued" if it carried an X-Read-After token; on a read-back, "sent" (the
# token went with it), "none-issued" (it should have, but the 201 had none) or "omitted" (a plain
# read-back, without protection); "" otherwise.
READ_AFTER = "X-Read-After"
FLUSH_EVERY_S = 1.0  # the harness tails these files for its progress line


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


MAX_ID = int(_env_float("LOADTEST_MAX_ID", 10000))
USER_RPS = _env_float("LOADTEST_USER_RPS", 0)
NEW_CONNECTIONS = os.environ.get("LOADTEST_NEW_CONNECTIONS", "").strip() == "1"


class ItemsUser(FastHttpUser):
    """One client of the items API: a read-heavy mix, one request at a time."""

    # Explicit timeouts (FastHttpUser's defaults are 60 s): a hung backend must show up as failed
    # requests within seconds, not as a quietly lower request rate.
    network_timeout = _env_float("LOADTEST_NETWORK_TIMEOUT", 10.0)
    connection_timeout = _env_float("LOADTEST_CONNECT_TIMEOUT", 3.0)
    max_retries = 0  # a retry would hide exactly the failures we are counting
    wait_time = constant_throughput(USER_RPS) if USER_RPS > 0 else constant(0)
    default_headers = {"Connection": "close"} if NEW_CONNECTIONS else None

    @tag("read")
    @task(80)
    def get_item(self) -> None:
        self.client.get(f"/items/{random.randint(1, MAX_ID)}", name="GET /items/<id>",
                        context={"kind": "read"})

    @tag("read")
    @task(10)
    def list_items(self) -> None:
        self.client.get("/items?limit=10", name="GET /items?limit=10", context={"kind": "read"})

    @tag("write")
    @task(10)
    def create_item(self) -> None:
        self.client.post("/items", json={"name": f"lt-{uuid.uuid4().hex[:16]}"}, name="POST /items",
                         context={"kind": "write"})


class RequestLog:
    """Appends one CSV row per request to this process's file (opened lazily, so a process
    forked by ``--processes`` opens a file of its own)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._pid = 0
        self._file = None
        self._writer = None
        self._flushed = 0.0

    def _open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._pid = os.getpid()
        path = os.path.join(self.directory, f"requests-{socket.gethostname()}-{self._pid}.csv")
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self._file.tell() == 0:
            self._writer.writerow(LOG_COLUMNS)

    def on_request(self, request_type, name, response_time, response_length, response=None,
                   context=None, exception=None, start_time=None, url=None, **kwargs) -> None:
        if self._pid != os.getpid():
            self._open()
        status = getattr(response, "status_code", 0) or 0
        headers = getattr(response, "headers", None)
        served_by = (headers.get("X-Served-By") or "") if headers else ""
        worker = (headers.get("X-Worker") or "") if headers else ""
        kind = (context or {}).get("kind") or ("write" if request_type == "POST" else "read")
        read_after = (context or {}).get("read_after", "")
        if status == 201 and headers and headers.get(READ_AFTER):
            read_after = "issued"
        item_id = ""
        if status == 201:
            try:  # the acknowledged id: the harness checks afterwards that it exists everywhere
                item_id = response.json()["id"]
            except (ValueError, KeyError, TypeError):
                exception = exception or ValueError("201 without an id")
        error = "" if exception is None else f"{type(exception).__name__}: {exception}"[:200]
        self._writer.writerow((f"{start_time:.6f}", f"{response_time:.3f}", kind, name, status,
                               served_by, item_id, error.replace("\n", " "), read_after, worker))
        now = time.monotonic()
        if now - self._flushed >= FLUSH_EVERY_S:
            self._file.flush()
            self._flushed = now

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
            self._file = None
            self._pid = 0


if os.environ.get("LOADTEST_LOG_DIR"):
    _log = RequestLog(os.environ["LOADTEST_LOG_DIR"])
    events.request.add_listener(_log.on_request)
    events.quitting.add_listener(lambda **_: _log.close())


@events.quitting.add_listener
def _exit_code(environment, **_kwargs) -> None:
    """Locust exits 1 if any request failed. Failover runs expect failed requests (the harness
    judges them); a bug in this file (an exception in a task) must still fail the run."""
    if os.environ.get("LOADTEST_ALLOW_FAILURES") == "1" and environment.runner is not None:
        environment.process_exit_code = 1 if environment.runner.exceptions else 0
