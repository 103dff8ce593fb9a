"""The sample app's three services under gunicorn on the host, against a native Cluster.

The same services as docker-compose.yml's app-threaded, app-process and app-nopool, with the same
gunicorn configs (app/gunicorn_<mode>.py) and pool settings, bound to 127.0.0.1 on
APP_THREADED_PORT / APP_PROCESS_PORT / APP_NOPOOL_PORT (default 8001-8003):

    from native.services import start_services, stop_services, service_status
    start_services(cluster)                 # idempotent; waits until each answers /healthz
    start_services(cluster, ports={"app-threaded": 18001, ...})   # tests: free ports
    stop_services(cluster)                  # SIGTERM (graceful), SIGKILL after a grace period

gunicorn runs with the interpreter running this code (sys.executable), so call it from the
project venv (`make venv`; the Makefile uses $(VPY) -m native). Each service is a detached process
group; its pid file is <basedir>/run/<service>.pid and its log (gunicorn's access and error log)
<basedir>/log/<service>.log.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .cluster import REPLICAS, REPO_ROOT, Cluster, ClusterError

__all__ = ["SERVICES", "service_ports", "start_services", "stop_services", "service_status"]

log = logging.getLogger("native")

# service name -> (APP_POOL_MODE / gunicorn config, port variable, default port)
SERVICES = {
    "app-threaded": ("threaded", "APP_THREADED_PORT", 8001),
    "app-process": ("process", "APP_PROCESS_PORT", 8002),
    "app-nopool": ("nopool", "APP_NOPOOL_PORT", 8003),
}
# Passed through from the caller's environment when set (sizing and timeouts, as in compose).
PASSTHROUGH = ("APP_WORKERS", "APP_THREADS", "APP_PROCESS_WORKERS", "APP_TIMEOUT",
               "APP_GRACEFUL_TIMEOUT", "APP_MAX_BODY", "POOL_TIMEOUT", "POOL_CONNECT_TIMEOUT")


def service_ports(environ=None) -> dict[str, int]:
    environ = os.environ if environ is None else environ
    return {name: int(environ.get(var) or default) for name, (_, var, default) in SERVICES.items()}


def _pidfile(cluster: Cluster, name: str) -> Path:
    return cluster.socket_dir / f"{name}.pid"


def _logfile(cluster: Cluster, name: str) -> Path:
    return cluster.basedir / "log" / f"{name}.log"


def _alive(pid: int) -> bool:
    """pid exists and is not a zombie (PID 1 may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _running_pid(cluster: Cluster, name: str) -> int | None:
    """The service's gunicorn master pid, if its pid file names a live gunicorn of ours."""
    try:
        pid = int(_pidfile(cluster, name).read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "gunicorn" not in cmdline or f"gunicorn_{SERVICES[name][0]}.py" not in cmdline:
            return None  # the pid was reused by something else
    except OSError:
        pass
    return pid


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _healthz(port: int, timeout: float = 3.0) -> tuple[int, dict | str]:
    """(status, body) of GET /healthz; status 0 if nothing answered."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def _service_env(cluster: Cluster, name: str, port: int) -> dict:
    mode = SERVICES[name][0]
    # Nothing of the caller's database/pool/app settings leaks in except the listed knobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POOL_", "APP_"))}
    env.update({k: os.environ[k] for k in PASSTHROUGH if os.environ.get(k)})
    if mode == "threaded" and os.environ.get("POOL_MAX_SIZE"):
        env["POOL_MAX_SIZE"] = os.environ["POOL_MAX_SIZE"]  # the process config sizes its own
    env.update(
        APP_POOL_MODE=mode,
        APP_BIND=f"127.0.0.1:{port}",
        POOL_PRIMARY=cluster.dsn("primary"),
        POOL_REPLICAS=",".join(cluster.dsn(r) for r in REPLICAS),
        PYTHONUNBUFFERED="1",
    )
    return env


def start_services(cluster: Cluster, ports: dict[str, int] | None = None,
                   timeout: float = 60) -> dict[str, int]:
    """Start every service that is not running yet; wait until all answer /healthz with 200.
    Returns {service: port}."""
    if importlib.util.find_spec("gunicorn") is None or importlib.util.find_spec("psycopg2") is None:
        raise ClusterError(f"{sys.executable} cannot import gunicorn and psycopg2: run the native "
                           "stack with the project venv (make venv; .venv/bin/python -m native up)")
    ports = {**service_ports(), **(ports or {})}
    (cluster.basedir / "log").mkdir(exist_ok=True)
    started = {}
    for name, (mode, _, _) in SERVICES.items():
        if _running_pid(cluster, name):
            log.info("%s: already running (pid file %s)", name, _pidfile(cluster, name))
            continue
        logfile = _logfile(cluster, name)
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", f"app/gunicorn_{mode}.py",
                 "app.wsgi:application"],
                cwd=REPO_ROOT, env=_service_env(cluster, name, ports[name]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # survives this CLI; stop_services signals its group
            )
        _pidfile(cluster, name).write_text(f"{proc.pid}\n")
        started[name] = proc
        log.info("%s: gunicorn (%s) on 127.0.0.1:%d, pid %d, log %s",
                 name, mode, ports[name], proc.pid, logfile)

    deadline = time.monotonic() + timeout
    pending = dict.fromkeys(SERVICES)
    while pending:
        for name in list(pending):
            status, body = _healthz(ports[name], timeout=2)
            pending[name] = (status, body)
            if status == 200:
                del pending[name]
                continue
            proc = started.get(name)
            if (proc is not None and proc.poll() is not None) or (
                    proc is None and not _running_pid(cluster, name)):
                raise ClusterError(f"{name} exited while starting (port {ports[name]} in use?); "
                                   f"log {_logfile(cluster, name)}:\n"
                                   f"{_log_tail(_logfile(cluster, name))}", name)
        if not pending:
            break
        if time.monotonic() > deadline:
            details = "; ".join(f"{n}: {s} {str(b)[:200]}" for n, (s, b) in pending.items())
            raise ClusterError(f"services not healthy after {timeout:.0f}s: {details}")
        time.sleep(0.2)
    return ports


def stop_services(cluster: Cluster, grace: float = 15) -> None:
    """SIGTERM each running service's gunicorn master (graceful), SIGKILL its group after
    `grace` seconds; remove the pid files."""
    pids = {}
    for name in SERVICES:
        pid = _running_pid(cluster, name)
        if pid:
            log.info("%s: stopping gunicorn pid %d", name, pid)
            try:
                os.kill(pid, signal.SIGTERM)
                pids[name] = pid
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for name, pid in pids.items():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            log.warning("%s: still running after %.0fs; SIGKILL", name, grace)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in SERVICES:
        _pidfile(cluster, name).unlink(missing_ok=True)


def service_status(cluster: Cluster, ports: dict[str, int] | None = None) -> list[dict]:
    """One dict per service: service, port, pid (or None), healthz status (0 = no answer)."""
    ports = {**service_ports(), **(ports or {})}
    rows = []
    for name in SERVICES:
        pid = _running_pid(cluster, name)
        status = _healthz(ports[name], timeout=2)[0] if pid else 0
        rows.append({"service": name, "port": ports[name], "pid": pid, "healthz": status})
    return rows
