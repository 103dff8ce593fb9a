"""A worker process for the shared-board tests: one pool, driven over a pipe.

Importable by a spawned child (no pytest, no fixtures): the parent sends commands, the child
answers with plain data. ``make_pool`` is used by both start methods: with fork the parent may
build the pool first and every child inherits it (it must start over cleanly); with spawn each
child builds its own.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import pool


def make_pool(spec: dict) -> pool.Pool:
    """Declared roles (``primary``, ``replicas``), or candidates (``nodes``)."""
    roles = dict(nodes=spec["nodes"]) if "nodes" in spec else dict(
        primary=spec["primary"], replicas=spec.get("replicas", []))
    return pool.Pool(**roles, mode=spec["mode"],
                     shared_state=spec["board"], connect_timeout=spec.get("connect_timeout", 0.5),
                     query_timeout=spec.get("query_timeout", 3), timeout=spec.get("timeout", 1),
                     max_lag=spec.get("max_lag"))


def serve(conn: Any, spec: dict, inherited: pool.Pool | None = None) -> None:
    start = time.monotonic()
    p = inherited if inherited is not None else make_pool(spec)
    born = time.monotonic() - start  # how long this worker's pool took to start
    while True:
        cmd = conn.recv()
        if cmd == "quit":
            p.close()
            conn.send("bye")
            return
        start = time.monotonic()
        try:
            if cmd == "write":
                value = p.fetchone("SELECT inet_server_port()")
            elif cmd == "slow":  # a write that takes 2 s: past a query_timeout of 1 s
                value = p.fetchone("SELECT pg_sleep(2)")
            elif cmd == "read":
                value = p.fetchone("SELECT inet_server_port()", readonly=True)
            elif cmd == "stats":
                value = p.stats()
            elif cmd == "host":
                value = p.stats(scope="host")
            elif cmd == "born":
                value = born
            elif cmd == "monitoring":  # the servers this worker's monitor asks (board.py lease)
                value = [ep.name for ep in p._endpoints if ep.monitor is not None]
            elif isinstance(cmd, tuple) and cmd[0] == "fetchone":  # (, sql, params, kwargs)
                value = (p.fetchone(cmd[1], cmd[2], **cmd[3]), p.last_endpoint)
            else:
                value = None
            conn.send({"ok": True, "seconds": time.monotonic() - start, "value": value})
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            conn.send({"ok": False, "seconds": time.monotonic() - start,
                       "error": type(exc).__name__, "text": str(exc),
                       "trace": traceback.format_exc(limit=3)})
