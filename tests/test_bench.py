"""bench/bench.py: its CPU placement (the server and the benchmark on separate CPUs), and a
cut-down `make bench` run end to end, so the benchmark cannot break unnoticed.

Both run in a child interpreter, so pinning never touches the test process. In the first, a
`sleep` with a child of its own stands in for a postmaster and a backend it forked. The second
needs the PostgreSQL server binaries (a skip without them, a failure under CI).
"""

from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

from conftest import require
from bench.bench import client_ipis, cpu_steal
from bench.report import NOISY_STEAL_PCT, median_cells, steal_note, table
from native.cluster import find_bindir

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from bench.bench import pin_apart
parent = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
from native.cluster import _descendants
deadline = time.monotonic() + 10
while not (kids := _descendants(parent.pid)) and time.monotonic() < deadline:
    time.sleep(0.01)  # until it has forked its child
try:
    placement = pin_apart([parent.pid, None])
    print(placement)
    print(sorted(os.sched_getaffinity(0)))
    print(sorted(os.sched_getaffinity(parent.pid)))
    print([sorted(os.sched_getaffinity(k)) for k in kids])
finally:
    parent.kill()
    for k in kids:
        os.kill(k, 9)
"""


def test_pin_apart_splits_the_cpus_between_server_and_client() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        assert out[0] == "not pinned (one CPU)"
        return
    client, server = cpus[:len(cpus) // 2], cpus[len(cpus) // 2:]
    assert out[0] == (f"client on CPU {','.join(map(str, client))}, "
                      f"server on CPU {','.join(map(str, server))}")
    assert out[1] == str(client)
    assert out[2] == str(server)
    kids = ast.literal_eval(out[3])
    assert kids and all(k == server for k in kids)  # a backend forked before the pinning, too


def test_make_bench_runs_end_to_end(tmp_path: Path) -> None:
    """`python -m bench.bench` as `make bench` runs it, cut down: its own server, the pool's two
    modes (the peers' packages are not test requirements), every timing table, the report."""
    try:
        find_bindir()
    except Exception as exc:  # noqa: BLE001 - any reason means "no servers here"
        require(f"PostgreSQL server binaries not found: {exc}")
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--quick", "--seconds", "0.2", "--rounds", "2",
         "--threads", "1,4", "--only", "pool (threaded),pool (process)", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    latest = tmp_path / "latest"
    rows = list(csv.DictReader((latest / "bench.csv").read_text().splitlines()))
    # threaded at 1 and 4 threads, process at 1 (one thread per process), two rounds each
    assert sorted((r["contender"], r["threads"]) for r in rows) == sorted(
        [("pool (threaded)", "1"), ("pool (threaded)", "4"), ("pool (process)", "1")] * 2)
    assert all(int(r["ops"]) > 0 and r["errors"] == "0" for r in rows)
    if client_ipis() is not None:  # counted where /proc/interrupts has them (Linux, x86)
        assert all(float(r["client_ipis_per_query"]) >= 0 for r in rows)
    md = (latest / "bench.md").read_text()
    if cpu_steal() is not None:  # Linux
        assert all(0 <= float(r["steal_pct"]) <= 100 for r in rows)
        assert "CPU steal" in md
    placement = ("client on CPU" if len(os.sched_getaffinity(0)) > 1 else "not pinned")
    assert placement in md.splitlines()[0]
    for what in ("CPython floor", "shared health board on", "statement deadline off",
                 "session reset on (default)", "interrupts / query"):
        assert what in md
    assert (latest / "bench.png").stat().st_size > 0


def test_steal_note_calls_a_run_noisy_only_past_the_threshold() -> None:
    def row(rnd: int, steal: float) -> dict:
        return {"round": rnd, "contender": "pool (threaded)", "threads": 64, "steal_pct": steal}

    quiet = [row(1, 0.0), row(2, 0.4), row(3, NOISY_STEAL_PCT)]
    assert "0.4% of a cell's CPU time at the median" in steal_note(quiet)[0]
    assert "Noisy" not in steal_note(quiet)[0]
    noisy = steal_note([*quiet, row(4, 31.0)])[0]
    assert "**Noisy run:** 1 of 4 cells" in noisy
    assert "round 4 pool (threaded) at 64 threads 31%" in noisy
    assert steal_note([{"round": 1, "contender": "x", "threads": 1, "steal_pct": float("nan")}]) == []


def test_the_ratio_row_shows_its_spread_over_rounds() -> None:
    def row(rnd: int, name: str, ops: float) -> dict:
        return {"round": rnd, "contender": name, "threads": 16, "ops_per_s": ops, "p50_ms": 0.1,
                "p99_ms": 0.2, "errors": 0}

    peer = "psycopg2 ThreadedConnectionPool +autocommit"
    rows = [row(1, "pool (threaded)", 900), row(1, peer, 1000),
            row(2, "pool (threaded)", 1200), row(2, peer, 1000),
            row(3, "pool (threaded)", 1000), row(3, peer, 1000)]
    lines = table(median_cells(rows), rows, ["pool (threaded)", peer], [16], "t")
    assert "| **pool (threaded) / best peer** | 1.00x |" in lines
    assert "| the same ratio, lowest and highest round | 0.90x to 1.20x |" in lines
    one = [r for r in rows if r["round"] == 1]
    assert not any("lowest and highest" in line for line in table(
        median_cells(one), one, ["pool (threaded)", peer], [16], "t"))
