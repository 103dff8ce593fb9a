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
from loadtest.runner import LogTail
from pgutil import admin_sql

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


def req(start, kind="read", served="r1", status=200, latency=10.0, item=None, read_after="", error=None,
        worker=""):
    if error is None:
        error = "" if 0 < status < 400 else "HTTPError"
    return Request(start, latency, kind, "x", status, served, item, error, read_after, worker)


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


def test_failover_figures_primary_report_when_each_worker_writes_again():
    """Per X-Worker: the end of the first 201 after the worker's last failed write, from
    ``healthy``; a worker whose last write failed is not back; the spread is how long after the
    first worker wrote again another still failed a write (a worker that merely got no write
    for a while does not count)."""
    faults = {"kill": 10.0, "restart": 20.0, "healthy": 20.5}
    w = lambda t, status, worker: req(t, kind="write", served="p" if status == 201 else "",
                                      status=status, latency=5, worker=worker)
    rows = [w(9.0, 201, "a"),                                  # before the kill: ignored
            w(12.0, 503, "a"), w(20.6, 201, "a"), w(20.8, 201, "a"),
            w(15.0, 503, "b"), w(20.7, 503, "b"), w(21.4, 201, "b"),  # failed after healthy
            w(21.0, 201, "c"),                                  # no request during the outage
            w(14.0, 503, "e"), w(22.9, 201, "e"),               # no write for a long while
            w(13.0, 503, "d"), w(21.5, 503, "d")]               # never came back
    fig = analysis.failover_figures(rows, faults, "p", "primary", slow_ms=1000)
    assert fig["writes_back_by_worker"] == {"a": pytest.approx(0.105), "c": pytest.approx(0.505),
                                            "b": pytest.approx(0.905), "e": pytest.approx(2.405)}
    assert list(fig["writes_back_by_worker"]) == ["a", "c", "b", "e"]
    assert fig["failing_until_by_worker"] == {"a": pytest.approx(-8.495), "e": pytest.approx(-6.495),
                                              "b": pytest.approx(0.205)}
    assert list(fig["failing_until_by_worker"]) == ["a", "e", "b"]
    assert fig["writes_back_spread_s"] == pytest.approx(0.1) and fig["workers_not_back"] == 1
    check = "every app worker writes again; none fails a write 1 s after the first wrote again"
    checks = dict(report.checks_for("failover-primary", "process", {
        **fig, "acked_missing_primary": 0, "acked_missing_replicas": {"replica1": 0, "replica2": 0}}))
    assert checks[check] is False  # d never came back
    late = rows[:-2] + [w(21.7, 503, "b"), w(21.9, 201, "b")]  # b fails 1.1 s after a was back
    fig = analysis.failover_figures(late, faults, "p", "primary", slow_ms=1000)
    assert fig["writes_back_spread_s"] == pytest.approx(1.1)
    checks = dict(report.checks_for("failover-primary", "process", {
        **fig, "acked_missing_primary": 0, "acked_missing_replicas": {"replica1": 0, "replica2": 0}}))
    assert checks[check] is False
    fig = analysis.failover_figures(rows[:-2], faults, "p", "primary", slow_ms=1000)
    checks = dict(report.checks_for("failover-primary", "process", {
        **fig, "acked_missing_primary": 0, "acked_missing_replicas": {"replica1": 0, "replica2": 0}}))
    assert checks[check] is True  # e's late 201 is no failure
    assert "workers_not_back" not in analysis.failover_figures(rows, faults, "r1", "replica", 1000)


def test_promote_figures():
    events = {"kill": 10.0, "promoted": 12.0}
    rows = ([req(9.0, kind="write", served="p", status=201, item=1)]
            + [req(t, kind="write", served="", status=503, latency=2) for t in (10.5, 11.5, 13.0)]
            + [req(12.4, kind="write", served="r1", status=201, latency=100, item=2)]  # first 201
            + [req(14.5, kind="write", served="", status=503)]                        # late
            + [req(t, served="r2") for t in (10.2, 12.2)])
    fig = analysis.promote_figures(rows, events, "r1", grace_s=2.0)
    assert fig["write_outage_s"] == pytest.approx(2.5)
    assert fig["writes_back_s"] == pytest.approx(0.5)
    assert fig["writes_failed"] == 4 and fig["writes_failed_late"] == 1
    assert fig["reads_failed"] == 0 and fig["reads"] == 2
    assert analysis.promote_figures(rows[:4], events, "r1")["write_outage_s"] is None


def test_readback_figures_split_by_protection():
    events = {"paused": 10.0, "resumed": 15.0, "caught_up": 16.0}
    stale = "CatchResponseError('stale: 404 for an id the app acknowledged just before')"
    rows = ([req(t, kind="write", served="p", status=201, item=int(t * 10), read_after="issued")
             for t in (9.0, 11.0, 12.0)]
            + [req(11.0, served="lag", status=404, read_after="omitted", error=stale),
               req(11.5, served="r2", read_after="omitted"),
               req(12.0, served="p", read_after="sent"),
               req(12.5, served="r2", read_after="sent"),
               req(9.5, served="lag", read_after="sent")])       # before the lag
    fig = analysis.readback_figures(rows, events, "lag", ["lag", "r2"])
    assert fig["tokens_issued"] == 3 and fig["tokens_missing"] == 0 and fig["lag_window_s"] == 6.0
    off, on = fig["without_token"], fig["with_token"]
    assert (off["read_backs"], off["stale_reads"], off["served_by_lagging"]) == (2, 1, 1)
    assert off["replica_share_during_lag"] == 1.0  # of the successful ones: r2
    assert (on["read_backs"], on["stale_reads"], on["read_backs_during_lag"]) == (3, 0, 2)
    assert on["replica_share_during_lag"] == 0.5   # one went to the primary
    checks = dict(report.checks_for("lag", "threaded", {
        **fig, "acked_missing_primary": 0, "acked_missing_replicas": {"replica1": 0, "replica2": 0}}))
    assert checks["no stale read with the token"] and checks["no failed request but stale reads"]


def test_summary_opens_with_a_one_screen_verdict():
    promote = {"reads": 100, "reads_failed": 0, "writes": 20, "writes_failed": 5, "writes_failed_503": 5,
               "write_outage_s": None, "writes_back_s": None, "writes_failed_late": 3, "grace_s": 2.0,
               "acked_writes": 15, "acked_lost": 1, "acked_missing_primary": 1,
               "acked_missing_replicas": {"primary": 1, "replica2": 1}, "nodes_agree": True,
               "events_s": {"kill": 3.0, "promoted": 5.2}}
    scenarios = {"failover-promote-async": {"settings": {
        "killed": "primary", "promoted": "replica1", "sync": "off", "users": 4, "duration_s": 12,
        "kill_at_s": 3, "promote_at_s": 5, "rejoin_at_s": 8}, "targets": {"threaded": promote}}}
    summary = report.build_summary(scenarios, "local")
    text = report.markdown(summary)
    head = text.split("\n## failover-promote-async")[0].splitlines()
    assert head[2] == "## Verdict" and head[4].startswith("**FAIL**: 2 of 4 checks passed")
    assert len(head) <= 25, "the verdict must fit on one screen"
    assert any("threaded: write outage – s, 0 reads failed, 1 of 15 acknowledged writes lost" in line
               for line in head), head
    assert "- failover-promote-async threaded: writes succeed on the new primary" in head


@pytest.mark.parametrize("columns", ["read_after", "read_after,worker"])
def test_log_tail_counts_failures_by_the_error_column(tmp_path, columns):
    """The live progress line's "failed/s". It used to take the second-to-last column for the
    error, which the worker column made read_after: every read-after write counted as failed
    (26 "failed/s" in a scaling run with no failure at all)."""
    extra = ",566" if "worker" in columns else ""
    (tmp_path / "requests-h-1.csv").write_text(
        f"start,latency_ms,kind,name,status,served_by,item_id,error,{columns}\n"
        f"1.0,2.0,write,POST /items,201,p,7,,issued{extra}\n"
        f"1.1,2.0,read,GET,404,r1,,\"CatchResponseError('stale: 404, gone')\",omitted{extra}\n"
        f"1.2,2.0,read,GET,200,r2,,,{extra}\n")
    assert LogTail(tmp_path).poll() == (3, 1)


# ---------------------------------------------------------------------- against the native stack
@pytest.fixture(scope="module")
def native_stack(cluster, tmp_path_factory):
    """The session cluster plus the app's services on free ports; the environment that points
    the harness (and through it `python -m native`) at them."""
    from native.cluster import Cluster
    from native.services import DIRECT_PORTS, start_services, stop_services

    free = Cluster.free_ports(6)
    ports = dict(zip(("app-threaded", "app-process", "app-nopool"), free[:3]))
    direct = dict(zip(("app-threaded", "app-process", "app-nopool"), free[3:]))  # gunicorn behind nginx
    env = {**os.environ, "STACK": "local", "NATIVE_BASEDIR": str(cluster.basedir),
           "PRIMARY_PORT": str(cluster.port("primary")), "REPLICA1_PORT": str(cluster.port("replica1")),
           "REPLICA2_PORT": str(cluster.port("replica2")), "APP_PASSWORD": cluster.env["APP_PASSWORD"],
           "APP_THREADED_PORT": str(ports["app-threaded"]), "APP_PROCESS_PORT": str(ports["app-process"]),
           "APP_NOPOOL_PORT": str(ports["app-nopool"]),
           **{DIRECT_PORTS[name][0]: str(port) for name, port in direct.items()},
           # small and quick: two workers per service are plenty for a smoke run
           "APP_WORKERS": "2", "APP_THREADS": "4", "APP_PROCESS_WORKERS": "4"}
    saved = {k: os.environ.get(k) for k in ("APP_WORKERS", "APP_THREADS", "APP_PROCESS_WORKERS")}
    os.environ.update({k: env[k] for k in saved})  # start_services passes these through
    try:
        start_services(cluster, ports=ports, direct=direct)
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
    env, load = native_stack, ("--users", "4")
    if node == "primary":
        # Both gthread workers must get writes. A kept-alive connection stays on the worker that
        # accepted it: through nginx, whose few upstream connections may all be one worker's,
        # the second worker got none in a CI run, and neither did it in another with 16 users'
        # connections straight to gunicorn (accepts are not a fair coin: the worker that is
        # awake wins them). So gunicorn directly and a new connection for every request, ~1,000
        # accepts over the run.
        from native.services import find_nginx
        if find_nginx():  # else gunicorn answers on the public port itself
            env = {**native_stack, "APP_THREADED_PORT": native_stack["APP_THREADED_DIRECT_PORT"]}
        load = ("--users", "16", "--user-rps", "6.25", "--new-connections")
    summary = run_harness(env, tmp_path, "failover", "--target", node, "--modes", "threaded", *load,
                          "--duration", "12", "--kill-at", "2.5", "--restart-at", "5")
    out = tmp_path / "latest"
    figures = summary["scenarios"][f"failover-{node}"]["targets"]["threaded"]
    assert FAILOVER_KEYS <= figures.keys()
    assert figures["reads_failed"] == 0
    assert_nothing_lost(figures)
    assert figures["readmit_s"] is not None and figures["reroute_s"] >= 0
    if node == "primary":
        assert figures["writes_failed"] > 0 and figures["writes_failed"] == figures["writes_failed_503"]
        # both gthread workers (X-Worker) wrote again, within a second of each other
        assert len(figures["writes_back_by_worker"]) == 2 and figures["workers_not_back"] == 0
        assert figures["writes_back_spread_s"] < 1.0
    else:
        assert figures["writes_failed"] == 0
    assert (out / f"failover-{node}-threaded.png").stat().st_size > 10_000
    assert_run_files(out / f"failover-{node}" / "threaded")


@pytest.mark.db
@pytest.mark.slow
def test_outage_smoke(native_stack, db, tmp_path):
    """`make loadtest-outage`, short: the per-process app's 4 workers through the primary
    killed, started, stalled, killed and stalled again with every worker just replaced, and a
    replica outage; each worker's figures, the plot, and every node up afterwards."""
    proc = subprocess.run([sys.executable, "-m", "loadtest", "outage", "--outage", "2",
                           "--results", str(tmp_path)], cwd=ROOT, env=native_stack,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    out = tmp_path / "latest"
    figures = json.loads((out / "outage.json").read_text())["modes"]["process"]
    assert figures["workers"] == 4 and all(c["ok"] for c in figures["checks"]), figures["checks"]
    assert len(figures["start_primary"]["back_by_worker_s"]) == 4
    assert len(figures["replica"]["up_by_worker_s"]) == 4
    for fault in ("kill_primary", "stall_primary", "kill_primary_fresh", "stall_primary_fresh"):
        assert figures[fault]["writes"] == 16 and figures[fault]["statuses"] == [503], fault
    assert (out / "outage-process.png").stat().st_size > 10_000
    assert "**PASS**" in (out / "summary.md").read_text()
    rows = (out / "requests.csv").read_text().splitlines()
    assert rows[0] == "mode,phase,start,latency_ms,method,path,status,worker,replica1" and len(rows) > 100
    for node in ("primary", "replica1"):
        assert admin_sql(db, node, "SELECT 1") == [(1,)], node


@pytest.mark.db
@pytest.mark.slow
def test_promote_smoke(native_stack, db, tmp_path):
    """Kill the primary, promote replica1, rejoin the old primary under load: once asynchronous,
    once with SYNC=on; then the stack is back as it was (initial topology, SYNC off)."""
    proc = subprocess.run([sys.executable, "-m", "loadtest", "run", "failover", "--target", "promote",
                           "--modes", "threaded", "--users", "4", "--duration", "11", "--kill-at", "2.5",
                           "--promote-after", "1.5", "--rejoin-at", "6", "--results", str(tmp_path)],
                          cwd=ROOT, env=native_stack, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 3), proc.stderr[-4000:] + proc.stdout[-4000:]
    out = tmp_path / "latest"
    summary = json.loads((out / "summary.json").read_text())
    for scenario in ("failover-promote-async", "failover-promote-sync"):
        figures = summary["scenarios"][scenario]["targets"]["threaded"]
        assert {"write_outage_s", "reads_failed", "acked_writes", "acked_lost"} <= figures.keys()
        events = figures["events_s"]
        assert events["kill"] < events["promoted"] < events["rejoined"], events
        assert figures["reads_failed"] == 0
        assert figures["acked_writes"] > 0 and figures["acked_lost"] is not None
        assert figures["nodes_agree"], figures
        assert (out / f"{scenario}-threaded.png").stat().st_size > 10_000
        assert_run_files(out / scenario / "threaded")
    assert summary["scenarios"]["failover-promote-sync"]["targets"]["threaded"]["acked_lost"] == 0
    assert db.topology().initial and db.psql("primary", "SHOW synchronous_standby_names") == ""
    assert proc.returncode == 0, (out / "summary.md").read_text()
    for scenario in ("failover-promote-async", "failover-promote-sync"):
        figures = summary["scenarios"][scenario]["targets"]["threaded"]
        assert figures["write_outage_s"] is not None and figures["writes_failed_late"] == 0


@pytest.mark.db
@pytest.mark.slow
def test_lag_smoke(native_stack, db, tmp_path):
    """Write-then-read-back load while replica1's replay is paused: without the token reads go
    stale on the lagging replica; with it (once the app issues tokens) none do."""
    proc = subprocess.run([sys.executable, "-m", "loadtest", "run", "lag", "--modes", "threaded",
                           "--users", "4", "--duration", "9", "--lag-at", "2", "--lag-seconds", "3",
                           "--results", str(tmp_path)],
                          cwd=ROOT, env=native_stack, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 3), proc.stderr[-4000:] + proc.stdout[-4000:]
    out = tmp_path / "latest"
    summary = json.loads((out / "summary.json").read_text())
    figures = summary["scenarios"]["lag"]["targets"]["threaded"]
    assert list(figures["events_s"])[-3:] == ["paused", "resumed", "caught_up"]
    assert 3 <= figures["lag_window_s"] < 6
    off = figures["without_token"]
    assert off["read_backs"] > 0 and off["served_by_lagging"] > 0 and off["stale_during_lag"] > 0
    assert off["replica_share_during_lag"] is not None
    assert figures["writes_failed"] == 0 and off["reads_failed"] == 0
    assert_nothing_lost(figures)
    assert (out / "lag-threaded.png").stat().st_size > 10_000
    assert_run_files(out / "lag" / "threaded")
    logs = list((out / "lag" / "threaded").glob("requests-*.csv"))
    assert logs[0].read_text().splitlines()[0].endswith(",error,read_after,worker")
    assert proc.returncode == 0, (out / "summary.md").read_text()
    assert figures["tokens_missing"] == 0 and figures["with_token"]["stale_reads"] == 0
