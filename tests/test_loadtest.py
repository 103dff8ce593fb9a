"""The load-test harness end to end, in seconds: a smoke run of each scenario against the native
stack (the session's test cluster from conftest.py plus the app's three gunicorn services on
free ports), then the outputs: summary.json's documented keys, the plots, Locust's reports, the
per-request logs, and the promises (no failed read during a failover, no acknowledged write lost).

Locust only ever runs as a subprocess (``python -m loadtest`` starts it): importing it here would
monkey-patch this process with gevent. The figures' arithmetic is tested without any server.
Without PostgreSQL binaries the smoke runs skip (fail under CI, see conftest.require).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import analysis, report
from loadtest.analysis import Request

ROOT = Path(__file__).resolve().parent.parent
STEP_KEYS = {"users", "rps", "p50_ms", "p95_ms", "p99_ms", "fail_ratio"}
TARGET_KEYS = {"reads_failed", "writes_failed", "acked_writes", "acked_missing_primary",
               "acked_missing_replicas"}
FAILOVER_KEYS = TARGET_KEYS | {"reroute_s", "readmit_s"}


# ------------------------------------------------------------------------- without a server
def test_harness_never_imports_locust():
    code = ("import sys, loadtest.__main__, loadtest.scenarios, loadtest.distributed; "
            "bad = [m for m in ('locust', 'gevent') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_no_stack_says_so(tmp_path):
    env = {**os.environ, "STACK": "local", "NATIVE_BASEDIR": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, "-m", "loadtest", "run", "scaling", "--results",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not running" in proc.stderr and "make up" in proc.stderr


def req(start, kind="read", served="r1", status=200, latency=10.0, item=None):
    return Request(start, latency, kind, "x", status, served, item, "" if 0 < status < 400 else "HTTPError")


def test_percentile_interpolates():
    assert analysis.percentile([], 50) is None
    assert analysis.percentile([5.0], 99) == 5.0
    assert analysis.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert analysis.percentile(list(map(float, range(101))), 99) == 99.0


def test_scaling_step_window_discards_warmup():
    rows = [req(100 + i * 0.1) for i in range(100)]  # 10 s at 10 req/s
    steps = [{"step": 0, "users": 4, "reached": 100.0, "end": 110.0}]
    (fig,) = analysis.scaling_steps(rows, steps, warmup_s=5)
    assert fig["users"] == 4 and fig["requests"] == 50 and fig["rps"] == 10.0
    assert fig["fail_ratio"] == 0 and STEP_KEYS <= fig.keys()


def test_failover_figures_replica():
    faults = {"kill": 10.0, "restart": 20.0, "healthy": 21.0}
    rows = ([req(t, served="r1") for t in (9.0, 9.995)]           # in flight at the kill
            + [req(10.5, served="r2", latency=1500)]               # a slow reroute: disturbed
            + [req(t, served="r2") for t in (12.0, 15.0, 21.5)]
            + [req(22.0, served="r1", latency=20)]                 # readmitted
            + [req(13.0, kind="write", served="p", status=201, item=7)])
    fig = analysis.failover_figures(rows, faults, "r1", "replica", slow_ms=1000)
    assert fig["reroute_s"] == pytest.approx(2.0)  # 10.5 + 1.5 s - kill
    assert fig["readmit_s"] == pytest.approx(1.02)
    assert fig["reads_failed"] == fig["writes_failed"] == 0
    assert analysis.acked_ids(rows) == [7]


def test_failover_figures_primary_fast_503_is_expected():
    faults = {"kill": 10.0, "restart": 20.0, "healthy": 20.5}
    rows = ([req(11.0, kind="write", served="", status=0, latency=3000)]  # hung: disturbed
            + [req(t, kind="write", served="", status=503, latency=2) for t in (15.0, 16.0)]
            + [req(21.0, kind="write", served="p", status=201, item=1)]
            + [req(t, served="r1") for t in (12.0, 18.0)])
    fig = analysis.failover_figures(rows, faults, "p", "primary", slow_ms=1000)
    assert fig["reroute_s"] == pytest.approx(4.0)
    assert fig["writes_failed"] == 3 and fig["writes_failed_503"] == 2
    assert fig["readmit_s"] == pytest.approx(0.51)
    checks = dict(report.checks_for("failover-primary", "threaded", {
        **fig, "acked_missing_primary": 0, "acked_missing_replicas": {"replica1": 0, "replica2": 0}}))
    assert checks["writes fail only fast, with 503"] is False  # the hung write


# ---------------------------------------------------------------------- against the native stack
@pytest.fixture(scope="module")
def native_stack(cluster, tmp_path_factory):
    """The session cluster plus the app's services on free ports; the environment that points
    the harness (and through it `python -m native`) at them."""
    from native.cluster import Cluster
    from native.services import start_services, stop_services

    ports = dict(zip(("app-threaded", "app-process", "app-nopool"), Cluster.free_ports(3)))
    env = {**os.environ, "STACK": "local", "NATIVE_BASEDIR": str(cluster.basedir),
           "PRIMARY_PORT": str(cluster.port("primary")), "REPLICA1_PORT": str(cluster.port("replica1")),
           "REPLICA2_PORT": str(cluster.port("replica2")), "APP_PASSWORD": cluster.env["APP_PASSWORD"],
           "APP_THREADED_PORT": str(ports["app-threaded"]), "APP_PROCESS_PORT": str(ports["app-process"]),
           "APP_NOPOOL_PORT": str(ports["app-nopool"]),
           # small and quick: two workers per service are plenty for a smoke run
           "APP_WORKERS": "2", "APP_THREADS": "4", "APP_PROCESS_WORKERS": "4"}
    saved = {k: os.environ.get(k) for k in ("APP_WORKERS", "APP_THREADS", "APP_PROCESS_WORKERS")}
    os.environ.update({k: env[k] for k in saved})  # start_services passes these through
    try:
        start_services(cluster, ports=ports)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        yield env
    finally:
        stop_services(cluster)


def run_harness(env, results: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "loadtest", "run", *args, "--results", str(results)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    latest = results / "latest"
    assert latest.is_symlink() and (latest / "summary.md").is_file()
    summary = json.loads((latest / "summary.json").read_text())
    assert summary["schema_version"] == 1 and summary["ok"] is True and summary["stack"] == "local"
    return summary


def assert_run_files(run_dir: Path):
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html", "locust.log"):
        assert (run_dir / name).is_file(), name
    logs = list(run_dir.glob("requests-*.csv"))
    assert logs and logs[0].read_text().startswith("start,latency_ms,kind,name,status,served_by,item_id,error")


def assert_nothing_lost(figures: dict):
    assert figures["acked_writes"] > 0
    assert figures["acked_missing_primary"] == 0
    assert figures["acked_missing_replicas"] == {"replica1": 0, "replica2": 0}


@pytest.mark.db
@pytest.mark.slow
def test_scaling_smoke(native_stack, db, tmp_path):
    summary = run_harness(native_stack, tmp_path, "scaling", "--steps", "2,4", "--step-seconds", "3",
                          "--warmup-seconds", "1")
    out = tmp_path / "latest"
    assert (out / "scaling.png").stat().st_size > 10_000
    targets = summary["scenarios"]["scaling"]["targets"]
    assert set(targets) == {"threaded", "process", "nopool"}
    for target, figures in targets.items():
        assert TARGET_KEYS <= figures.keys()
        assert [s["users"] for s in figures["steps"]] == [2, 4]
        for step in figures["steps"]:
            assert STEP_KEYS <= step.keys() and step["rps"] > 0 and step["p99_ms"] >= step["p50_ms"]
        assert_nothing_lost(figures)
        assert_run_files(out / "scaling" / target)


@pytest.mark.db
@pytest.mark.slow
@pytest.mark.parametrize("node", ["replica", "primary"])
def test_failover_smoke(native_stack, db, tmp_path, node):
    # 7 s after the restart leave room for the pool's re-admission probe (backoff capped at 3 s).
    summary = run_harness(native_stack, tmp_path, "failover", "--target", node, "--modes", "threaded",
                          "--users", "4", "--duration", "12", "--kill-at", "2.5", "--restart-at", "5")
    out = tmp_path / "latest"
    figures = summary["scenarios"][f"failover-{node}"]["targets"]["threaded"]
    assert FAILOVER_KEYS <= figures.keys()
    assert figures["reads_failed"] == 0
    assert_nothing_lost(figures)
    assert figures["readmit_s"] is not None and figures["reroute_s"] >= 0
    if node == "primary":
        assert figures["writes_failed"] > 0 and figures["writes_failed"] == figures["writes_failed_503"]
    else:
        assert figures["writes_failed"] == 0
    assert (out / f"failover-{node}-threaded.png").stat().st_size > 10_000
    assert_run_files(out / f"failover-{node}" / "threaded")
