"""The reference deployment end to end without Docker: the native stack (native.cluster: primary
+ 2 streaming replicas from the local PostgreSQL binaries, and native.services: the app's three
gunicorn services), on free loopback ports, once for this module.

The same scenarios as test_stack_docker.py (tests/stackutil.py), so developers without a Docker
engine cover them too. Skips when the PostgreSQL server binaries or gunicorn are missing, except
under CI=true / REQUIRE_DB=1, where that fails.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import pytest

import stackutil
from native.cluster import Cluster, find_bindir
from pgutil import wait_until
from stackutil import NODES

pytestmark = [pytest.mark.db, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def require(reason: str) -> None:
    if os.environ.get("CI") == "true" or os.environ.get("REQUIRE_DB") == "1":
        pytest.fail(f"required prerequisite missing: {reason}")
    pytest.skip(reason)


class NativeStack(stackutil.Stack):
    kind = "native"

    def __init__(self, cluster: Cluster, app_ports: dict[str, int], direct_ports: dict[str, int]):
        self.cluster, self.env = cluster, cluster.env
        self.app_ports = app_ports  # mode -> public port (nginx)
        self.direct_ports = direct_ports  # mode -> gunicorn's own port
        self._by_port = {str(p): n for n, p in cluster.ports.items()}

    def url(self, mode, path=""):
        return f"http://127.0.0.1:{self.app_ports[mode]}{path}"

    def direct_url(self, mode, path=""):
        if not self.proxy:  # without nginx gunicorn listens on the public port itself
            return self.url(mode, path)
        return f"http://127.0.0.1:{self.direct_ports[mode]}{path}"

    def db_port(self, node):
        return self.cluster.port(node)

    def node_of(self, served_by):
        host, _, port = (served_by or "").rpartition(":")
        return self._by_port.get(port) if host == "127.0.0.1" else None

    def kill(self, node):
        self.cluster.kill(node)

    def start(self, node):
        self.cluster.start_node(node)

    def describe(self):
        return "\n".join(f"--- {n} ---\n{self.cluster.log_tail(n, 10)}" for n in NODES)


@pytest.fixture(scope="module")
def stack(request):
    try:
        find_bindir()
    except Exception as exc:  # noqa: BLE001 - any reason means "no servers here"
        require(f"PostgreSQL server binaries not found: {exc}")
    if importlib.util.find_spec("gunicorn") is None:
        require("gunicorn is not installed in this Python (run `make venv`)")
    from native.services import SERVICES, find_nginx, start_services, stop_services

    base = tempfile.mkdtemp(prefix="stack-native-", dir="/tmp")
    os.chmod(base, 0o755)  # the server runs as the postgres OS user when we are root
    ports = Cluster.free_ports(9)
    cluster = Cluster(os.path.join(base, "c"), ports=ports[:3], durable=False)
    app_ports = dict(zip(SERVICES, ports[3:6]))
    direct_ports = dict(zip(SERVICES, ports[6:]))
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    t0 = time.monotonic()
    try:
        cluster.start()
        t1 = time.monotonic()
        start_services(cluster, ports=app_ports, direct=direct_ports)
        if report:
            report.write_line(f"\n[native stack] cluster {t1 - t0:.1f}s, apps "
                              f"{time.monotonic() - t1:.1f}s ({base})")
        native = NativeStack(cluster, {SERVICES[name][0]: p for name, p in app_ports.items()},
                             {SERVICES[name][0]: p for name, p in direct_ports.items()})
        native.proxy = find_nginx() is not None
        native.report = report
        yield native
    finally:
        try:
            stop_services(cluster)
        finally:
            cluster.destroy()
            shutil.rmtree(base, ignore_errors=True)


class TestNativeStack(stackutil.StackScenarios):
    """The shared scenarios (tests/stackutil.py) against the native stack."""

    def test_app_services_never_run_as_root(self, stack) -> None:
        """gunicorn masters and workers, and nginx's (when present): all unprivileged."""
        from native.services import PROXY, SERVICES, _running_pid
        names = [*SERVICES, *([PROXY] if stack.proxy else [])]
        for name in names:
            master = _running_pid(stack.cluster, name)
            assert master, f"{name} is not running"
            processes = [master, *(int(p) for p in subprocess.run(
                ["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split())]
            assert len(processes) >= 2, (name, processes)  # a master and its workers
            for pid in processes:
                assert uid_of(pid) != 0, f"{name} process {pid} runs as root"
                if os.geteuid() != 0:
                    assert uid_of(pid) == os.geteuid(), f"{name} process {pid} is not the caller's"

    def test_each_request_is_logged_once(self, stack) -> None:
        """Behind nginx only nginx logs the request (with the server that answered); gunicorn
        logs it only when it answers the public port itself (APP_ACCESS_LOG)."""
        import urllib.request
        from native.services import _logfile
        tag = f"logged-once-{time.monotonic_ns()}"
        with urllib.request.urlopen(stack.url("threaded", f"/items/1?tag={tag}"), timeout=5) as resp:
            assert resp.status == 200
        app_log = _logfile(stack.cluster, "app-threaded")
        proxy_log = stack.cluster.basedir / "log" / "nginx-access.log"
        where, other = (proxy_log, app_log) if stack.proxy else (app_log, None)
        # nginx flushes its access log every second
        wait_until(lambda: tag in where.read_text(), timeout=5, interval=0.1,
                   what=f"an access line for the request in {where}")
        line = next((l for l in where.read_text().splitlines() if tag in l), None)
        assert line and "served_by=" in line, f"no access line for the request in {where}"
        if other is not None:
            assert tag not in other.read_text(), f"{other} logs the request too (nginx logs it)"

    def test_make_watch_and_make_demo_smoke(self, stack, tmp_path) -> None:
        """`make watch` for 3 s and `make demo` with 2 s phases, against this stack (about 20 s):
        each ends with its summary; the demo's two outages cost no read and lose no write."""
        env = {**os.environ, "LOADTEST_STACK": "local", "NATIVE_BASEDIR": str(stack.cluster.basedir),
               **{var: str(stack.cluster.port(node)) for node, var in
                  (("primary", "PRIMARY_PORT"), ("replica1", "REPLICA1_PORT"), ("replica2", "REPLICA2_PORT"))},
               **{f"APP_{mode.upper()}_PORT": str(port) for mode, port in stack.app_ports.items()},
               **{f"APP_{mode.upper()}_DIRECT_PORT": str(port) for mode, port in stack.direct_ports.items()}}

        def run(*args: str) -> dict:
            out = tmp_path / f"{args[0]}.json"
            proc = subprocess.run([sys.executable, "-m", "watch", *args, "--json", str(out)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert "summary" in proc.stdout and "acknowledged writes:" in proc.stdout, proc.stdout[-3000:]
            return json.loads(out.read_text())

        watched = run("watch", "--duration", "3")
        assert all(t["reads"] > 10 and t["reads_failed"] == 0 for t in watched["totals"].values()), watched
        demo = run("demo", "--phase", "2")
        assert [f["node"] for f in demo["faults"]] == ["replica1", "primary"], demo
        assert all(f["healthy"] for f in demo["faults"]), demo
        assert all(t["reads_failed"] == 0 for t in demo["totals"].values()), demo
        assert demo["acked"]["acked_writes"] > 0 and demo["acked"]["acked_missing_primary"] == 0, demo
        assert set(demo["acked"]["acked_missing_replicas"].values()) == {0}, demo
        stack.wait_streaming(timeout=60)

    def test_slowloris_stalls_gunicorn_without_nginx(self, stack) -> None:
        """The negative control of test_slow_clients_do_not_starve_the_apps: the same check
        against gunicorn's own port fails, so the check can fail."""
        from loadtest import slowloris
        port = stackutil.port_of(stack.direct_url("threaded"))
        (result,) = slowloris.run({"threaded": port}, sockets=50, seconds=2, rate=10, timeout=1)
        assert not result.summary(250)["passed"] and result.failed > 0, result.summary(250)
        stack.wait_apps_healthy(["threaded"])  # the sockets are gone: it recovers
