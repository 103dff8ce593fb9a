"""The reference deployment end to end: the real docker-compose.yml, built and started once for
this module with testcontainers' DockerCompose (images built locally FROM debian:trixie-slim).

The stack gets its own project name, free host ports and its own /24, so it never collides with
a running `make up`. Scenarios (tests/stackutil.py, shared with test_stack_native.py): both
replicas stream; a write through each app is readable on the replicas; every endpoint of both
pool apps, bad input included; SIGKILL a replica under a stream of reads (no failed read, back
within 10 s, no re-clone); SIGKILL the primary (reads continue, writes 503 fast, then recover);
and last, `make promote` / `make rejoin` there and back (roles change, then the initial topology).

Skips with the reason when there is no Docker engine, no Compose v2, no local base image or no
testcontainers; with REQUIRE_DOCKER=1 (CI) that is a failure instead.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from native.cluster import Cluster, load_env
import stackutil
from pgutil import wait_until
from stackutil import NODES

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = "docker-compose.yml"
BASE_IMAGE = "debian:trixie-slim"
APP_SERVICES = {"threaded": "app-threaded", "process": "app-process", "nopool": "app-nopool"}
PORT_VARS = {"primary": "PRIMARY_PORT", "replica1": "REPLICA1_PORT", "replica2": "REPLICA2_PORT",
             "threaded": "APP_THREADED_PORT", "process": "APP_PROCESS_PORT",
             "nopool": "APP_NOPOOL_PORT", "direct-threaded": "APP_THREADED_DIRECT_PORT",
             "direct-process": "APP_PROCESS_DIRECT_PORT", "direct-nopool": "APP_NOPOOL_DIRECT_PORT"}


def _run(cmd, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def docker_problem() -> str | None:
    """Why the Docker tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no `docker` CLI on PATH"
    try:
        info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers (`docker info`: {(info.stderr or info.stdout).strip()[:200]})"
    compose = _run(["docker", "compose", "version", "--short"])
    if compose.returncode != 0:
        return "Docker Compose v2 (`docker compose`) is not installed"
    if not compose.stdout.strip().lstrip("v").split(".")[0].isdigit() or \
            int(compose.stdout.strip().lstrip("v").split(".")[0]) < 2:
        return f"Docker Compose {compose.stdout.strip()} is too old: v2 is required"
    if _run(["docker", "image", "inspect", BASE_IMAGE]).returncode != 0:
        return (f"base image {BASE_IMAGE} is not available locally (nothing is pulled; "
                ".ci/install-docker.sh builds it with debootstrap)")
    try:
        import testcontainers.compose  # noqa: F401
    except ImportError as exc:
        return f"testcontainers is not installed ({exc}); run `make venv`"
    return None


def free_prefix() -> str:
    """First three octets of a /24 in 172.30.0.0/16 that no Docker network overlaps."""
    ids = _run(["docker", "network", "ls", "-q"]).stdout.split()
    used = []
    if ids:
        out = _run(["docker", "network", "inspect", *ids]).stdout
        for net in json.loads(out or "[]"):
            for cfg in (net.get("IPAM") or {}).get("Config") or []:
                if cfg.get("Subnet"):
                    try:
                        used.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
                    except ValueError:
                        pass
    for third in [*range(200, 240), *range(100, 200)]:
        net = ipaddress.ip_network(f"172.30.{third}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4):
            return f"172.30.{third}"
    raise RuntimeError("no free /24 in 172.30.0.0/16 for the test stack's network")


class DockerStack(stackutil.Stack):
    kind = "docker"

    def __init__(self, project: str, ports: dict[str, int], env: dict):
        self.project, self.ports, self.env = project, ports, env
        self.compose_cmd = ["docker", "compose", "-p", project, "-f", str(ROOT / COMPOSE_FILE)]

    def url(self, mode, path=""):
        return f"http://127.0.0.1:{self.ports[mode]}{path}"

    def direct_url(self, mode, path=""):
        return f"http://127.0.0.1:{self.ports['direct-' + mode]}{path}"

    def db_port(self, node):
        return self.ports[node]

    def node_of(self, served_by):
        host = (served_by or "").rsplit(":", 1)[0]
        return host if host in NODES else None

    def compose(self, *args, timeout=120) -> subprocess.CompletedProcess:
        proc = _run([*self.compose_cmd, *args], timeout=timeout)
        assert proc.returncode == 0, f"docker compose {' '.join(args)}: {proc.stderr}"
        return proc

    def kill(self, node):
        self.compose("kill", "-s", "SIGKILL", node)

    def start(self, node):
        self.compose("start", node)

    def logs(self, service: str, tail: str = "all") -> str:
        return _run([*self.compose_cmd, "logs", "--no-color", "--tail", tail, service]).stdout

    def clone_count(self, node):
        return self.logs(node).count("cloned from the primary")

    def describe(self):
        ps = _run([*self.compose_cmd, "ps", "--all"]).stdout
        tails = "\n".join(f"--- {svc} ---\n{self.logs(svc, '15')}" for svc in (*NODES, "nginx"))
        return f"{ps}\n{tails}"


@pytest.fixture(scope="module")
def stack(request):
    problem = docker_problem()
    if problem:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(f"REQUIRE_DOCKER=1 but the Docker tests cannot run: {problem}")
        pytest.skip(problem)
    from testcontainers.compose import DockerCompose

    project = f"pgpool-test-{uuid.uuid4().hex[:8]}"
    ports = dict(zip(PORT_VARS, Cluster.free_ports(len(PORT_VARS))))
    overrides = {PORT_VARS[k]: str(p) for k, p in ports.items()}
    overrides.update(COMPOSE_PROJECT_NAME=project, STACK_NET_PREFIX=free_prefix(),
                     TESTCONTAINERS_RYUK_DISABLED="true")
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in overrides.items():
            mp.setenv(key, value)
        env = load_env(os.environ)
        compose = DockerCompose(context=str(ROOT), compose_file_name=COMPOSE_FILE, build=True,
                                wait=True)
        docker_stack = DockerStack(project, ports, env)
        docker_stack.overrides = overrides  # for `make` run against this stack
        t0 = time.monotonic()
        try:
            try:
                compose.start()  # docker compose up --build --wait
            except subprocess.CalledProcessError as exc:
                pytest.fail(f"`docker compose up --build --wait` failed: "
                            f"{exc.stderr.decode(errors='replace')[-3000:]}\n{docker_stack.describe()}")
            up = time.monotonic() - t0
            streaming = docker_stack.wait_streaming(timeout=60)
            docker_stack.wait_apps_healthy()
            if report:
                report.write_line(f"\n[docker stack {project}] build + up --wait {up:.1f}s, "
                                  f"streaming after +{streaming:.1f}s, net {overrides['STACK_NET_PREFIX']}.0/24")
            docker_stack.report = report
            yield docker_stack
        finally:
            t1 = time.monotonic()
            compose.stop()  # down --volumes
            # The images are tagged per project (docker-compose.yml): drop this project's tags
            # (the layers stay, shared with every other build).
            _run(["docker", "image", "rm", f"pgpool-stack/postgres:17-{project}",
                  f"pgpool-stack/app:{project}"])
            if report:
                report.write_line(f"[docker stack {project}] down -v {time.monotonic() - t1:.1f}s")


def test_apps_use_fixed_addresses_not_dns(stack):
    """The apps reach the nodes by hostaddr=, so a dead node never costs a DNS lookup."""
    env = stack.compose("exec", "-T", "app-threaded", "python3", "-c",
                        "import os; print(os.environ['POOL_PRIMARY']); print(os.environ['POOL_REPLICAS'])").stdout
    for node in NODES:
        assert f"host={node} hostaddr=" in env, env
    nodes = stack.compose("exec", "-T", "app-threaded", "python3", "-c",
                          "import os; print(os.environ['POOL_NODES'])").stdout.strip().split(",")
    assert [n.split()[0] for n in nodes] == [f"host={node}" for node in NODES], nodes


def test_each_request_is_logged_once_by_nginx(stack):
    """nginx logs every request with the server that answered; gunicorn's second line per
    request, through Docker's log driver, is off (APP_ACCESS_LOG)."""
    tag = f"logged-once-{time.monotonic_ns()}"
    with urllib.request.urlopen(stack.url("threaded", f"/items/1?tag={tag}"), timeout=5) as resp:
        assert resp.status == 200
    # nginx flushes its access log every second
    wait_until(lambda: tag in stack.logs("nginx", "200"), timeout=10, interval=0.2,
               what="nginx's access line for the request")
    line = next((l for l in stack.logs("nginx", "200").splitlines() if tag in l), None)
    assert line and "served_by=" in line, "nginx did not log the request"
    assert tag not in stack.logs("app-threaded", "200"), "gunicorn logs the request too"


class TestDockerStack(stackutil.StackScenarios):
    """The shared scenarios (tests/stackutil.py) against the docker stack."""


def make(stack: DockerStack, *args: str) -> subprocess.CompletedProcess:
    """A make target against the test stack (-e: the environment beats .env's assignments). In a
    clean environment: under `make test` the parent make exports all its variables, expanded,
    and -e would let those copies override the Makefile's own definitions."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG")}
    return subprocess.run(["make", "-e", "-s", "-C", str(ROOT), *args], capture_output=True,
                          text=True, timeout=300, env={**env, **stack.overrides, "STACK": "docker"})


def streaming_from(stack: DockerStack, primary: str) -> dict:
    return dict(stack.sql(primary, "SELECT application_name, state FROM pg_stat_replication",
                          dbname="postgres"))


def test_make_promote_and_rejoin_there_and_back(stack):
    """Last in this module: a switchover with `make promote` (the primary runs, so it is fenced
    first), `make rejoin` of the old primary, then the same back to the initial topology."""
    for new, old, timeline in (("replica1", "primary", 2), ("primary", "replica1", 3)):
        out = make(stack, "promote", f"REPLICA={new}")
        assert out.returncode == 0, out.stderr + out.stdout
        assert out.stdout.startswith(f"primary: {new}, timeline {timeline}"), out.stdout
        assert stack.sql(new, "SELECT pg_is_in_recovery()")[0][0] is False
        running = stack.compose("ps", "--status", "running", "--services").stdout.split()
        assert old not in running, "a switchover stops the old primary before the promotion"
        other = next(n for n in NODES if n not in (new, old))
        assert streaming_from(stack, new) == {other: "streaming"}

        out = make(stack, "rejoin", f"NODE={old}")
        assert out.returncode == 0, out.stderr + out.stdout
        assert stack.sql(old, "SELECT pg_is_in_recovery()")[0][0] is True
        assert streaming_from(stack, new) == {other: "streaming", old: "streaming"}
        status = make(stack, "replication-status").stdout
        assert f"\n{old:9} replica  {timeline:>3} {new:9} streaming" in status, status
    stack.note(f"promote/rejoin there and back: {status.splitlines()[0]}")
    stackutil.check_write_then_read(stack, "threaded")  # the initial topology serves the app again
