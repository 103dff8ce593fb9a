"""Failure behaviour, measured: what callers see when a server stalls, a statement runs past its
deadline on a healthy one, an address black-holes, a session is terminated under a queue, a
NOTIFY arrives, a login is refused, or the name server stalls (as root, with dnsmasq).

    python -m bench.failures [--query-timeout 2] [--out bench/results]

Against a throwaway primary and two replicas from the local binaries (native/cluster.py); the
stalls are SIGSTOP of every process of a node, the black hole is the test proxy's. Each scenario
runs in both modes where the mode matters. Writes failures.md and failures.csv beside the
benchmark's results; the README's failure table quotes them. The unit tests prove the
behaviour; this measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pool  # noqa: E402
from native.cluster import Cluster  # noqa: E402
from pgutil import (admin_sql, proxied, stalled, terminate_under_queue,  # noqa: E402  (test helpers)
                    throwaway_cluster)
from proxy import Proxy  # noqa: E402
import nameserver  # noqa: E402

READ = "SELECT inet_server_port()"
INSERT = "INSERT INTO items (name) VALUES ('failures-bench') RETURNING id"


def timed(fn: Any) -> tuple[float, Any]:
    t = time.monotonic()
    try:
        fn()
        return time.monotonic() - t, None
    except Exception as exc:  # noqa: BLE001 - reported
        return time.monotonic() - t, exc


def stalled_replica(c: Cluster, mode: str, qt: float) -> dict:
    """A read loop through fetchone(readonly=True) while replica1 is stalled for 4 s."""
    p = pool.Pool(c.dsn("primary"), replicas=[c.dsn("replica1"), c.dsn("replica2")], mode=mode,
                  query_timeout=qt, connect_timeout=0.5, shared_state=False)
    try:
        for _ in range(6):
            p.fetchone(READ, readonly=True)
        name = p.stats()["endpoints"][1]["name"]
        lat, failed, ejected_at, back_at = [], 0, None, None
        start = time.monotonic()
        with stalled(c, "replica1"):
            while time.monotonic() - start < 4 + qt:
                s, err = timed(lambda: p.fetchone(READ, readonly=True))
                lat.append(s)
                failed += err is not None
                if ejected_at is None and p.stats()["endpoints"][1]["state"] == "down":
                    ejected_at = time.monotonic() - start
        resumed = time.monotonic()
        while time.monotonic() - resumed < 10:
            s, err = timed(lambda: p.fetchone(READ, readonly=True))
            lat.append(s)
            failed += err is not None
            if next(e for e in p.stats()["endpoints"] if e["name"] == name)["state"] == "up":
                back_at = time.monotonic() - resumed
                break
            time.sleep(0.01)
        return {"scenario": "stalled replica (SIGSTOP), read loop", "mode": mode,
                "reads": len(lat), "failed": failed, "max_latency_s": round(max(lat), 3),
                "ejected_after_s": round(ejected_at, 3) if ejected_at is not None else None,
                "readmitted_after_sigcont_s": round(back_at, 3) if back_at is not None else None}
    finally:
        p.close()


def stalled_primary(c: Cluster, mode: str, qt: float) -> dict:
    p = pool.Pool(c.dsn("primary"), replicas=[c.dsn("replica1")], mode=mode, query_timeout=qt,
                  connect_timeout=0.5, shared_state=False)
    try:
        p.fetchone("SELECT 1")
        with stalled(c, "primary"):
            first, err = timed(lambda: p.fetchone(INSERT))
            later = [timed(lambda: p.fetchone(INSERT))[0] for _ in range(5)]
        return {"scenario": "stalled primary (SIGSTOP), writes", "mode": mode,
                "first_write_fails_after_s": round(first, 3), "error": type(err).__name__,
                "next_writes_max_s": round(max(later), 4)}
    finally:
        p.close()


def slow_statement(c: Cluster, mode: str, qt: float) -> dict:
    """A report runs past query_timeout on a healthy primary that has 8 pooled sessions: how
    long the next write waits, how many of the other 7 sessions survive, and when the server
    stops running the report (cancelled by the pool; it would otherwise sleep on for 60 s)."""
    p = pool.Pool(c.dsn("primary"), replicas=[c.dsn("replica1")], mode=mode, query_timeout=qt,
                  connect_timeout=0.5, shared_state=False)
    report = "SELECT pg_sleep(60) -- failures-bench report"
    running = "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'active'"

    def run_report() -> None:
        with p.connection() as conn:
            pids.remove(conn.info.backend_pid)  # the other 7 stay in pids
            conn.cursor().execute(report)

    try:
        with contextlib.ExitStack() as stack:
            pids = [stack.enter_context(p.connection()).info.backend_pid for _ in range(8)]
        failed_after, err = timed(run_report)
        start = time.monotonic()
        next_write, _ = timed(lambda: p.fetchone(INSERT))
        while admin_sql(c, "primary", running, (report,))[0][0] and time.monotonic() - start < 10:
            p.fetchone(INSERT)  # (process mode steps the cancel request on requests)
            time.sleep(0.01)
        gone = admin_sql(c, "primary", running, (report,))[0][0] == 0
        stopped = round(time.monotonic() - start, 3) if gone else None
        kept = admin_sql(c, "primary", "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                         (pids,))[0][0]
        return {"scenario": "a statement past query_timeout on a healthy primary (a slow report)",
                "mode": mode, "error": type(err).__name__, "fails_after_s": round(failed_after, 3),
                "next_write_s": round(next_write, 4), "other_sessions_kept": f"{kept}/7",
                "report_stopped_on_server_after_s": stopped}
    finally:
        p.close()


def black_hole(c: Cluster, mode: str) -> dict:
    proxy = Proxy(c.port("primary"))
    p = pool.Pool(proxied(c, "primary", proxy), mode=mode, connect_timeout=0.5, shared_state=False)
    try:
        proxy.blackhole()
        first, err = timed(lambda: p.fetchone("SELECT 1"))
        later = [timed(lambda: p.fetchone("SELECT 1"))[0] for _ in range(5)]
        return {"scenario": "black-holed address, connect_timeout=0.5", "mode": mode,
                "first_write_fails_after_s": round(first, 3), "error": type(err).__name__,
                "next_writes_max_s": round(max(later), 4)}
    finally:
        p.close()
        proxy.close()


def notify(c: Cluster, mode: str) -> dict:
    p = pool.Pool(c.dsn("primary"), mode=mode, max_size=1, reset_session=False, shared_state=False)
    try:
        with p.connection() as conn:
            conn.autocommit = True
            conn.cursor().execute("LISTEN bench")
        admin_sql(c, "primary", "NOTIFY bench, 'x'")
        time.sleep(0.3)
        s, err = timed(lambda: p.fetchone("SELECT 1"))
        ep = p.stats()["endpoints"][0]
        return {"scenario": "NOTIFY on an idle LISTENing connection", "mode": mode,
                "next_checkout_s": round(s, 4), "failed": err is not None,
                "ejections": ep["ejections"], "state": ep["state"]}
    finally:
        p.close()


def refused(c: Cluster, mode: str) -> dict:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("pool").addHandler(handler)
    dsn = c.dsn("primary").replace(f"password={c.env['APP_PASSWORD']}", "password=wrong")
    try:
        p = pool.Pool(dsn, mode=mode, connect_timeout=1, shared_state=False)
        try:
            s, err = timed(lambda: p.fetchone("SELECT 1"))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # 5 s of requests: how often is it logged?
                timed(lambda: p.fetchone("SELECT 1"))
                time.sleep(0.05)
            state = p.stats()["endpoints"][0]["state"]
        finally:
            p.close()
    finally:
        logging.getLogger("pool").removeHandler(handler)
    return {"scenario": "wrong password", "mode": mode, "error_after_s": round(s, 4),
            "error": type(err).__name__, "state": state,
            "log_lines_in_5s": len(records), "says_down": any("is down" in r.getMessage() for r in records)}


def terminated_under_queue(c: Cluster) -> dict:
    p = pool.Pool(c.dsn("primary"), mode="threaded", max_size=2, timeout=10, shared_state=False)
    try:
        errors = terminate_under_queue(c, p, lambda: time.sleep(0.3))
    finally:
        p.close()
    return {"scenario": "pg_terminate_backend x5 with 6 callers queued", "mode": "threaded",
            "failed_statements": len(errors),
            "failed_queued_callers": sum(isinstance(e, pool.PoolError) for e in errors)}


def name_server_stall(c: Cluster, mode: str) -> dict:
    """A name server that stalls (dnsmasq SIGSTOPped, seen by a child as its only one; see
    tests/nameserver.py): before the pool ever had an answer, and after (no longer fresh)."""
    why = nameserver.missing()
    if why:
        return {"scenario": "the name server stalls", "mode": mode, "skipped": why}
    with nameserver.name_server("127.0.0.75", "127.0.0.74") as ns:
        first = nameserver.run_scenario(ns, c, "first_lookup_stalled", mode)
        later = nameserver.run_scenario(ns, c, "later_lookup_stalled", mode)
    return {"scenario": "the name server stalls", "mode": mode,
            "no_answer_yet_pool_start_s": round(first["built_s"], 3),
            "no_answer_yet_write_s": round(first["write_s"], 4),
            "no_answer_yet_write_error": (first["write_error"] or "")[-90:],
            "writes_again_after_sigcont_s": round(first["back_s"], 3),
            "last_answer_new_connection_s": round(later["connect_s"], 3),
            "last_answer_pool_start_s": round(later["built_s"], 3),
            "last_answer_failed": later["connect_error"] or later["built_error"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--query-timeout", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    print("starting a local primary and two replicas ...", flush=True)
    rows = []
    with throwaway_cluster("pool-failures-") as c:
        for mode in ("threaded", "process"):
            for fn in (lambda: stalled_replica(c, mode, args.query_timeout),
                       lambda: stalled_primary(c, mode, args.query_timeout),
                       lambda: slow_statement(c, mode, args.query_timeout),
                       lambda: black_hole(c, mode), lambda: notify(c, mode), lambda: refused(c, mode),
                       lambda: name_server_stall(c, mode)):
                row = fn()
                print(row, flush=True)
                rows.append(row)
                c.wait_streaming(timeout=30)
        row = terminated_under_queue(c)
        print(row, flush=True)
        rows.append(row)
    outdir = Path(args.out) / ("failures-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    outdir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r} - {"scenario", "mode"})
    with open(outdir / "failures.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scenario", "mode", *keys])
        w.writeheader()
        w.writerows(rows)
    lines = [f"Failure behaviour, query_timeout={args.query_timeout:g}s (bench/failures.py)", ""]
    for r in rows:
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("scenario", "mode"))
        lines.append(f"- **{r['scenario']}** ({r['mode']}): {figures}")
    (outdir / "failures.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results in {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
