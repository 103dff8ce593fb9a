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
from bench.bench import client_ipis
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
    placement = ("client on CPU" if len(os.sched_getaffinity(0)) > 1 else "not pinned")
    assert placement in md.splitlines()[0]
    for what in ("CPython floor", "shared health board on", "statement deadline off",
                 "session reset on (default)", "interrupts / query"):
        assert what in md
    assert (latest / "bench.png").stat().st_size > 0
