"""A small adapter over the two ways the reference stack runs, so the scenarios can kill and
start database nodes without caring which one is up:

    docker  docker compose kill -s SIGKILL <node> / docker compose start <node>
    local   python -m native kill <node> / python -m native start <node>   (the native stack)

``detect()`` picks the one that is running, or the one named by LOADTEST_STACK / STACK
(docker|local; "auto" or unset = detect). Health is the same for both: a node is healthy when the
app user can log in on its published port and run a query; an app is healthy when its /healthz
answers 200. Both stacks publish the same ports, so only one of them can be up at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Mapping

import psycopg2

from .settings import NODES, REPO_ROOT, TARGETS, Settings


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

    def wait_node_healthy(self, node: str, timeout: float = 60) -> float:
        """Block until ``node`` serves queries; returns that moment (epoch seconds)."""
        deadline = time.monotonic() + timeout
        while not self.node_healthy(node):
            if time.monotonic() > deadline:
                raise StackError(f"{node} is not accepting queries {timeout:.0f}s after its start")
            time.sleep(0.1)
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
        Docker, "127.0.0.1:15433" natively. Read from /healthz (primary first, then the replicas
        in configuration order), so no guessing about hostnames."""
        status, body = self.healthz(mode)
        endpoints = body.get("endpoints") or []
        primaries = [e["name"] for e in endpoints if e.get("role") == "primary"]
        replicas = [e["name"] for e in endpoints if e.get("role") == "replica"]
        if status != 200 or len(primaries) != 1 or len(replicas) != 2:
            raise StackError(f"{TARGETS[mode][0]} /healthz answered {status} {body!r}: cannot tell "
                             "which X-Served-By value names which node")
        return {"primary": primaries[0], "replica1": replicas[0], "replica2": replicas[1]}

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
        proc = self._compose("ps", "--status", "running", "--services", timeout=20)
        return proc.returncode == 0 and "primary" in proc.stdout.split()

    def kill(self, node: str) -> None:
        self._checked("kill", "-s", "SIGKILL", node)

    def start(self, node: str) -> None:
        self._checked("start", node)


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
        # Exit 3 = some node is down (maybe a run that died mid-failover): still this stack.
        return any(line.split()[:1] == ["primary"] and " running " in line
                   for line in proc.stdout.splitlines())

    def kill(self, node: str) -> None:
        self._checked("kill", node)

    def start(self, node: str) -> None:
        self._checked("start", node)


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
