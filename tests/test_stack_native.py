"""The reference deployment end to end without Docker: the native stack (native.cluster: primary
+ 2 streaming replicas from the local PostgreSQL binaries, and native.services: the app's three
gunicorn services), on free loopback ports, once for this module.

The same scenarios as test_stack_docker.py (tests/stackutil.py), so developers without a Docker
engine cover them too. Skips when the PostgreSQL server binaries or gunicorn are missing, except
under CI=true / REQUIRE_DB=1, where that fails.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time

import pytest

import stackutil
from native.cluster import Cluster, find_bindir
from stackutil import NODES

pytestmark = [pytest.mark.db, pytest.mark.slow]


def require(reason: str) -> None:
    if os.environ.get("CI") == "true" or os.environ.get("REQUIRE_DB") == "1":
        pytest.fail(f"required prerequisite missing: {reason}")
    pytest.skip(reason)


class NativeStack(stackutil.Stack):
    kind = "native"

    def __init__(self, cluster: Cluster, app_ports: dict[str, int]):
        self.cluster, self.env = cluster, cluster.env
        self.app_ports = app_ports  # mode -> port
        self._by_port = {str(p): n for n, p in cluster.ports.items()}

    def url(self, mode, path=""):
        return f"http://127.0.0.1:{self.app_ports[mode]}{path}"

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
    from native.services import SERVICES, start_services, stop_services

    base = tempfile.mkdtemp(prefix="stack-native-", dir="/tmp")
    os.chmod(base, 0o755)  # the server runs as the postgres OS user when we are root
    ports = Cluster.free_ports(6)
    cluster = Cluster(os.path.join(base, "c"), ports=ports[:3], durable=False)
    app_ports = dict(zip(SERVICES, ports[3:]))
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    t0 = time.monotonic()
    try:
        cluster.start()
        t1 = time.monotonic()
        start_services(cluster, ports=app_ports)
        if report:
            report.write_line(f"\n[native stack] cluster {t1 - t0:.1f}s, apps "
                              f"{time.monotonic() - t1:.1f}s ({base})")
        native = NativeStack(cluster, {SERVICES[name][0]: p for name, p in app_ports.items()})
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
