"""native/services.py without nginx on the host (NATIVE_NGINX=none stands in for a machine
that lacks it): the apps answer on the public ports themselves, `up` says so, and nothing
listens on the direct ports. With nginx, the same path is covered by test_stack_native.py."""
from __future__ import annotations

import logging
import socket
import urllib.request

import pytest

from native.cluster import Cluster
from native.services import PROXY, SERVICES, service_status, start_services, stop_services

pytestmark = pytest.mark.db


def test_without_nginx_gunicorn_takes_the_public_ports_and_says_so(cluster, monkeypatch, caplog) -> None:
    monkeypatch.setenv("NATIVE_NGINX", "none")
    free = Cluster.free_ports(6)
    public, direct = dict(zip(SERVICES, free[:3])), dict(zip(SERVICES, free[3:]))
    caplog.set_level(logging.INFO, logger="native")
    try:
        assert start_services(cluster, ports=public, direct=direct) == public
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(m.startswith("nginx not found: the apps answer on") and "apt-get install nginx" in m
                   for m in warnings), warnings
        for name, port in public.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                assert resp.status == 200 and "nginx" not in (resp.headers.get("Server") or "")
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", direct[name]), timeout=1).close()
        rows = service_status(cluster, ports=public, direct=direct)
        assert [r["service"] for r in rows] == list(SERVICES) and PROXY not in [r["service"] for r in rows]
        assert all(r["pid"] and r["healthz"] == 200 and r["port"] == public[r["service"]] for r in rows), rows
    finally:
        stop_services(cluster)
