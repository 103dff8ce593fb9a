"""Host-side helper for mk/stack.mk's Docker targets (standard library only).

    python compose/stackctl.py wait [--timeout 180] [--services primary replica1 ...]
        Poll until the named services (default: all) are up: database containers healthy,
        each named replica streaming according to the primary's pg_stat_replication, each app
        answering GET /healthz with 200 on its published port. A progress line every few
        seconds; exits 1 (with `docker compose ps` and the failing services' last log lines)
        on timeout or if a container has exited.
    python compose/stackctl.py urls
        Print the published endpoints.

Runs `docker compose` with the repository's docker-compose.yml; COMPOSE_PROJECT_NAME and the
port variables (.env, exported by the Makefile) are honoured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ["docker", "compose", "-f", str(ROOT / "docker-compose.yml")]
DB = ("primary", "replica1", "replica2")
REPLICAS = DB[1:]
APPS = {"app-threaded": ("APP_THREADED_PORT", 8001), "app-process": ("APP_PROCESS_PORT", 8002),
        "app-nopool": ("APP_NOPOOL_PORT", 8003)}
DB_PORTS = {"primary": ("PRIMARY_PORT", 15432), "replica1": ("REPLICA1_PORT", 15433),
            "replica2": ("REPLICA2_PORT", 15434)}
REPLICATION_SQL = ("SELECT s.slot_name || '=' || coalesce(r.state, 'inactive') "
                   "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r "
                   "ON r.pid = s.active_pid ORDER BY 1")


def port(table: dict, name: str) -> int:
    var, default = table[name]
    return int(os.environ.get(var) or default)


def compose(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*COMPOSE, *args], capture_output=True, text=True, timeout=timeout)


def containers() -> dict[str, dict]:
    """service -> {State, Health, ...} from `docker compose ps --all --format json`."""
    out = compose("ps", "--all", "--format", "json").stdout.strip()
    if not out:
        return {}
    rows = json.loads(out) if out.startswith("[") else [json.loads(l) for l in out.splitlines() if l]
    return {r["Service"]: r for r in rows}


def replication() -> dict[str, str]:
    """slot -> walsender state ('streaming', 'catchup', 'inactive'), or {} if unavailable."""
    try:
        proc = compose("exec", "-T", "primary", "psql", "-X", "-A", "-t", "-q", "-d", "postgres",
                       "-c", REPLICATION_SQL, timeout=10)
    except subprocess.TimeoutExpired:
        return {}
    if proc.returncode != 0:
        return {}
    return dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)


def healthz(name: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port(APPS, name)}/healthz", timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait(services: list[str], timeout: float) -> int:
    t0 = time.monotonic()
    last_line, last_print = "", 0.0
    while True:
        ps = containers()
        state, done = {}, True
        repl = replication() if any(s in REPLICAS for s in services) else {}
        for svc in services:
            c = ps.get(svc)
            if c is None:
                state[svc], ok = "missing", False
            elif c.get("State") != "running":
                state[svc], ok = c.get("State", "?"), False
                if c.get("State") in ("exited", "dead") and time.monotonic() - t0 > 5:
                    return fail(services, f"{svc} is {c.get('State')} ({c.get('Status', '')})")
            elif svc in APPS:
                code = healthz(svc)
                state[svc], ok = (f"/healthz {code}" if code else "no answer"), code == 200
            elif svc in REPLICAS:
                state[svc] = repl.get(svc, "?")
                ok = state[svc] == "streaming" and c.get("Health") == "healthy"
                if state[svc] == "streaming" and not ok:
                    state[svc] += f" ({c.get('Health') or 'starting'})"
            else:
                state[svc] = c.get("Health") or "running"
                ok = state[svc] == "healthy"
            done = done and ok
        elapsed = time.monotonic() - t0
        line = "  ".join(f"{k}={v}" for k, v in state.items())
        if done:
            print(f"ready after {elapsed:.0f}s: {line}", flush=True)
            return 0
        if elapsed > timeout:
            return fail(services, f"not ready after {timeout:.0f}s: {line}")
        if line != last_line or time.monotonic() - last_print > 5:
            print(f"[{elapsed:4.0f}s] waiting: {line}", flush=True)
            last_line, last_print = line, time.monotonic()
        time.sleep(1)


def fail(services: list[str], message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    print(compose("ps", "--all").stdout, file=sys.stderr)
    ps = containers()
    for svc in services:
        c = ps.get(svc, {})
        if c.get("State") != "running" or c.get("Health") not in (None, "", "healthy"):
            logs = compose("logs", "--no-color", "--tail", "25", svc).stdout
            print(f"--- last log lines of {svc} ---\n{logs}", file=sys.stderr)
    return 1


def urls() -> int:
    for name in APPS:
        print(f"{name:13} http://127.0.0.1:{port(APPS, name)}/  (/items/1, /items?limit=5, /healthz, /stats)")
    db, user = os.environ.get("APP_DB", "app"), os.environ.get("APP_USER", "app")
    for name in DB:
        print(f"{name:13} postgresql://{user}@127.0.0.1:{port(DB_PORTS, name)}/{db}  "
              "(password: APP_PASSWORD in .env)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="stackctl.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--timeout", type=float, default=180)
    w.add_argument("--services", nargs="+", default=[*DB, *APPS], choices=[*DB, *APPS])
    sub.add_parser("urls")
    args = parser.parse_args(argv)
    if args.cmd == "wait":
        return wait(args.services, args.timeout)
    return urls()


if __name__ == "__main__":
    sys.exit(main())
