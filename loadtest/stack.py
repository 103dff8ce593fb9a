"""A small adapter over the two ways the reference stack runs, so the scenarios can kill and
start database nodes, promote a replica, rejoin an old primary, lag a replica and switch
synchronous replication without caring which one is up:

    docker  docker compose kill -s SIGKILL <node> / docker compose start <node>
            docker compose pause|unpause <node>  (a stalled server)
            docker compose kill -s SIGHUP app-<mode>  (fresh gunicorn workers)
            python compose/stackctl.py promote|rejoin|lag-replica|restore ...   (`make promote` &c.)
            SYNC=on|off docker compose up -d --no-deps <the nodes>  (recreated with the setting)
    local   python -m native kill|start|stall|resume|promote|rejoin|lag-replica <node>   (native)
            SIGHUP to the gunicorn master in <basedir>/run/app-<mode>.pid
            SYNC=on|off python -m native up --no-apps   (applied with a reload)

``detect()`` picks the one that is running, or the one named by LOADTEST_STACK / STACK
(docker|local; "auto" or unset = detect). Health is the same for both: a node is healthy when the
app user can log in on its published port and run a query; an app is healthy when its /healthz
answers 200. Both stacks publish the same ports, so only one of them can be up at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Mapping

import psycopg2

from .settings import NODES, REPLICAS, REPO_ROOT, TARGETS, Settings


class StackError(RuntimeError):
    pass


NO_STACK_HINT = ("start one first: `make up` (Docker) or `make up STACK=local` "
                 "(native: `.venv/bin/python -m native up`)")


class Stack:
    """What both stacks share: health checks over the published ports."""

    name = "?"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def kill(self, node: str) -> None:
        raise NotImplementedError

    def start(self, node: str) -> None:
        raise NotImplementedError

    def is_running(self) -> bool:
        raise NotImplementedError

    def reload_app(self, mode: str) -> None:
        """SIGHUP to the app's gunicorn master: it replaces every worker with a fresh one (no
        pool yet, nothing learned), gracefully."""
        raise NotImplementedError

    def stall(self, node: str) -> None:
        """Every process of ``node`` stopped (SIGSTOP; `make stall`): its kernel still accepts
        connections and ACKs, nothing answers."""
        raise NotImplementedError

    def resume(self, node: str) -> None:
        raise NotImplementedError

    def topology_command(self, *args: str, env: Mapping[str, str] | None = None,
                         timeout: float = 300) -> None:
        """Run one of the topology procedures (promote, rejoin, lag-replica, restore) of this
        stack's CLI; StackError with its output if it fails."""
        raise NotImplementedError

    def set_sync(self, on: bool) -> None:
        """Switch synchronous replication (SYNC) on or off, restarting or reloading the nodes as
        the stack needs, and wait until they stream again."""
        raise NotImplementedError

    def node_of(self, served_by: str) -> str | None:
        """The node an X-Served-By value (the app's endpoint name) names."""
        raise NotImplementedError

    def _procedure(self, *args: str) -> dict[str, float]:
        """A topology procedure with --events; returns {step: epoch seconds} (promote, fenced,
        promoted, followed, rejoin, rejoined, paused, resumed, caught_up: whichever ran)."""
        fd, path = tempfile.mkstemp(prefix="loadtest-events-", suffix=".jsonl")
        os.close(fd)
        try:
            self.topology_command(*args, "--events", path)
            with open(path, encoding="utf-8") as f:
                return {e["event"]: e["t"] for e in map(json.loads, f) if e}
        finally:
            os.unlink(path)

    def promote(self, node: str) -> dict[str, float]:
        return self._procedure("promote", node)

    def rejoin(self, node: str) -> dict[str, float]:
        return self._procedure("rejoin", node)

    def lag_replica(self, node: str, seconds: float) -> dict[str, float]:
        return self._procedure("lag-replica", node, "--seconds", f"{seconds:g}")

    def restore_initial(self) -> None:
        """Every node up, `primary` the primary, both replicas streaming from it."""
        self.topology_command("restore")

    def node_healthy(self, node: str) -> bool:
        try:
            conn = psycopg2.connect(**{**self.settings.db_params(node), "connect_timeout": 2})
        except psycopg2.Error:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            return True
        except psycopg2.Error:
            return False
        finally:
            conn.close()

    def wait_node_healthy(self, node: str, timeout: float = 60, interval: float = 0.1) -> float:
        """Block until ``node`` serves queries, asking every ``interval`` s; returns that moment
        (epoch seconds)."""
        deadline = time.monotonic() + timeout
        while not self.node_healthy(node):
            if time.monotonic() > deadline:
                raise StackError(f"{node} is not accepting queries {timeout:.0f}s after its start")
            time.sleep(interval)
        return time.time()

    def healthz(self, mode: str, timeout: float = 5) -> tuple[int, dict]:
        """(status, body) of the app's GET /healthz; status 0 if nothing answered."""
        try:
            with urllib.request.urlopen(self.settings.app_url(mode) + "/healthz", timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    def served_by_names(self, mode: str) -> dict[str, str]:
        """{node: its X-Served-By value} as the app names its endpoints: "replica1:5432" in
        Docker, "127.0.0.1:15433" natively. Read from /healthz and matched to the nodes by host
        or port (node_of), not by role: roles change when a replica is promoted."""
        status, body = self.healthz(mode)
        names = {self.node_of(e.get("name", "")): e["name"] for e in body.get("endpoints") or []}
        names.pop(None, None)
        if status != 200 or set(names) != set(NODES):
            raise StackError(f"{TARGETS[mode][0]} /healthz answered {status} {body!r}: cannot tell "
                             "which X-Served-By value names which node")
        return {node: names[node] for node in NODES}

    def warm_up(self, modes, successes: int = 40, timeout: float = 60) -> None:
        """After the harness restarted or switched nodes: a write and a read through each app in
        turn until ``successes`` pairs in a row succeed. A process-mode worker that was idle
        meanwhile still holds the endpoints it saw go down (it probes only when asked, after a
        backoff of up to ~3 s), so without this the next run would open with 503s that belong
        to the previous reconfiguration."""
        for mode in modes:
            deadline = time.monotonic() + timeout
            streak, last = 0, ""
            while streak < successes:
                if time.monotonic() > deadline:
                    raise StackError(f"{TARGETS[mode][0]} does not answer reliably {timeout:.0f}s after "
                                     f"the stack was reconfigured (last: {last})")
                codes = (self._request(mode, "POST", "/items", b'{"name": "loadtest warm-up"}'),
                         self._request(mode, "GET", "/items/1"))
                if codes == (201, 200):
                    streak += 1
                else:
                    streak, last = 0, f"POST {codes[0]}, GET {codes[1]}"
                    time.sleep(0.1)

    def _request(self, mode: str, method: str, path: str, body: bytes | None = None) -> int:
        request = urllib.request.Request(self.settings.app_url(mode) + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_ready(self, modes, timeout: float = 90) -> None:
        """Every node serves queries and every app in ``modes`` answers /healthz with 200."""
        deadline = time.monotonic() + timeout
        pending: list[str] = []
        while time.monotonic() < deadline:
            pending = [n for n in NODES if not self.node_healthy(n)]
            pending += [TARGETS[m][0] for m in modes if self.healthz(m)[0] != 200]
            if not pending:
                return
            time.sleep(0.5)
        raise StackError(f"the {self.name} stack is not ready after {timeout:.0f}s: {', '.join(pending)}")


class DockerStack(Stack):
    name = "docker"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.compose = ["docker", "compose", "-f", str(REPO_ROOT / "docker-compose.yml")]

    def _compose(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([*self.compose, *args], capture_output=True, text=True,
                                  timeout=timeout, env=_child_env(self.settings.env))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(args, 127, "", str(exc))

    def _checked(self, *args: str) -> None:
        proc = self._compose(*args)
        if proc.returncode != 0:
            raise StackError(f"docker compose {' '.join(args)} failed: {proc.stderr.strip()}")

    def is_running(self) -> bool:
        # Any node: after a promotion the `primary` service may be the one that is down.
        proc = self._compose("ps", "--status", "running", "--services", timeout=20)
        return proc.returncode == 0 and bool(set(NODES) & set(proc.stdout.split()))

    def kill(self, node: str) -> None:
        self._checked("kill", "-s", "SIGKILL", node)

    def reload_app(self, mode: str) -> None:
        self._checked("kill", "-s", "SIGHUP", TARGETS[mode][0])

    def stall(self, node: str) -> None:
        self._checked("pause", node)

    def resume(self, node: str) -> None:
        self._checked("unpause", node)

    def start(self, node: str) -> None:
        self._checked("start", node)

    def node_of(self, served_by: str) -> str | None:
        host = served_by.rpartition(":")[0]
        return host if host in NODES else None

    def topology_command(self, *args: str, env: Mapping[str, str] | None = None,
                         timeout: float = 300) -> None:
        cmd = [sys.executable, str(REPO_ROOT / "compose" / "stackctl.py"), *args]
        _checked_run(cmd, {**_child_env(self.settings.env), **(env or {})}, timeout)

    def set_sync(self, on: bool) -> None:
        # The nodes take SYNC from their environment: recreate them with the new value (data and
        # topology are in volumes), one at a time, replicas first, so that the apps always have
        # nodes to use, and wait each time until everything streams again.
        env = {**_child_env(self.settings.env), "SYNC": "on" if on else "off"}
        for node in (*REPLICAS, "primary"):
            _checked_run([*self.compose, "up", "-d", "--no-deps", node], env, 300)
            self.topology_command("wait", "--services", *NODES, "--timeout", "120", env=env)


class LocalStack(Stack):
    name = "local"

    def _native(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        # The same interpreter: the native CLI needs the venv's psycopg2 and gunicorn.
        return subprocess.run([sys.executable, "-m", "native", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout,
                              env=_child_env(self.settings.env))

    def _checked(self, *args: str) -> None:
        proc = self._native(*args)
        if proc.returncode != 0:
            raise StackError(f"python -m native {' '.join(args)} failed: "
                             f"{(proc.stderr or proc.stdout).strip()[-2000:]}")

    def is_running(self) -> bool:
        basedir = self.settings.env.get("NATIVE_BASEDIR") or str(REPO_ROOT / ".stack" / "native")
        if not os.path.exists(os.path.join(basedir, ".native-cluster")):
            return False
        try:
            proc = self._native("status", timeout=30)
        except subprocess.TimeoutExpired:
            return False
        # Exit 3 = some node is down (maybe a run that died mid-failover): still this stack, as
        # long as any node runs (after a promotion `primary` may be the one that is down).
        return any(line.split()[:1] in ([n] for n in NODES) and " running " in line
                   for line in proc.stdout.splitlines())

    def kill(self, node: str) -> None:
        self._checked("kill", node)

    def reload_app(self, mode: str) -> None:
        basedir = self.settings.env.get("NATIVE_BASEDIR") or str(REPO_ROOT / ".stack" / "native")
        pidfile = os.path.join(basedir, "run", f"{TARGETS[mode][0]}.pid")  # native/services.py
        try:
            with open(pidfile, encoding="utf-8") as f:
                os.kill(int(f.read().split()[0]), signal.SIGHUP)
        except (OSError, ValueError, IndexError) as exc:
            raise StackError(f"cannot reload {TARGETS[mode][0]} through {pidfile}: {exc}") from None

    def stall(self, node: str) -> None:
        self._checked("stall", node)

    def resume(self, node: str) -> None:
        self._checked("resume", node)

    def start(self, node: str) -> None:
        self._checked("start", node)

    def node_of(self, served_by: str) -> str | None:
        host, _, port = served_by.rpartition(":")
        by_port = {str(self.settings.db_port(n)): n for n in NODES}
        return by_port.get(port) if host == "127.0.0.1" else None

    def topology_command(self, *args: str, env: Mapping[str, str] | None = None,
                         timeout: float = 300) -> None:
        _checked_run([sys.executable, "-m", "native", *args],
                     {**_child_env(self.settings.env), **(env or {})}, timeout)

    def set_sync(self, on: bool) -> None:
        # `up` applies SYNC to running nodes with a reload (and is otherwise a no-op here).
        self.topology_command("up", "--no-apps", env={"SYNC": "on" if on else "off"})


def _checked_run(cmd: list[str], env: Mapping[str, str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                              env=dict(env))
    except subprocess.TimeoutExpired:
        raise StackError(f"{' '.join(cmd[1:3])} ... did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise StackError(f"{' '.join(cmd[1:4])} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")


STACKS = {"docker": DockerStack, "local": LocalStack}


def detect(settings: Settings, requested: str | None = None) -> Stack:
    """The running stack: ``requested`` (docker|local), else LOADTEST_STACK or STACK, else
    whichever is up. Raises StackError with a hint when none is."""
    choice = (requested or settings.env.get("LOADTEST_STACK") or settings.env.get("STACK") or "auto").lower()
    if choice not in (*STACKS, "auto"):
        raise StackError(f"unknown stack {choice!r}: use docker, local or auto")
    candidates = [STACKS[choice](settings)] if choice != "auto" else [cls(settings) for cls in STACKS.values()]
    for stack in candidates:
        if stack.is_running():
            return stack
    if choice != "auto":
        raise StackError(f"the {choice} stack is not running: {NO_STACK_HINT}")
    raise StackError(f"no stack is running (neither docker compose nor the native stack): {NO_STACK_HINT}")


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment plus the settings (.env values the Makefile would export)."""
    return {**os.environ, **env}
