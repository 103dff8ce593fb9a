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
import bench.bench
from bench.bench import (busy_pct, client_ipis, cpu_steal, cpu_ticks, halt_polling, schedule,
                         set_halt_polling)
from bench.report import (NOISY_STEAL_PCT, cpu_table, median_cells, polling_note, steal_note,
                          table)
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
    assert all(float(r["client_cpu_us"]) > 0 for r in rows)
    if cpu_ticks() is not None:
        assert all(0 <= float(r["client_busy_pct"]) <= 100 for r in rows)
        if len(os.sched_getaffinity(0)) > 1:  # pinned apart: the server's CPUs are known
            assert all(0 <= float(r["server_busy_pct"]) <= 100 for r in rows)
    if client_ipis() is not None:  # counted where /proc/interrupts has them (Linux, x86)
        assert all(float(r["client_ipis_per_query"]) >= 0 for r in rows)
    md = (latest / "bench.md").read_text()
    if cpu_steal() is not None:  # Linux
        assert all(0 <= float(r["steal_pct"]) <= 100 for r in rows)
        assert "CPU steal" in md
    placement = ("client on CPU" if len(os.sched_getaffinity(0)) > 1 else "not pinned")
    assert placement in md.splitlines()[0]
    for what in ("CPython floor", "shared health board on", "statement deadline off",
                 "session reset on (default)", "interrupts / query", "which CPU ran out"):
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


class _Fake:
    def __init__(self, name: str, single_threaded: bool = False) -> None:
        self.name, self.single_threaded = name, single_threaded


def test_schedule_runs_the_contenders_at_one_thread_count_back_to_back() -> None:
    """A ratio compares cells seconds apart: every (round, thread count) is one unbroken run of
    all its contenders; process mode only at one thread; nobody always first."""
    cs = [_Fake("a"), _Fake("b"), _Fake("c"), _Fake("process", single_threaded=True)]
    order = schedule(cs, [1, 4, 16, 64], 3)
    assert len(order) == 3 * (4 + 3 * 3)
    blocks = []
    for rnd, n, c in order:
        if not blocks or blocks[-1][:2] != (rnd, n):
            blocks.append((rnd, n, []))
        blocks[-1][2].append(c.name)
    assert sorted((rnd, n) for rnd, n, _ in blocks) == [(r, n) for r in (1, 2, 3) for n in (1, 4, 16, 64)]
    for rnd, n, names in blocks:
        assert sorted(names) == (["a", "b", "c", "process"] if n == 1 else ["a", "b", "c"])
    assert len({names[0] for _, n, names in blocks if n > 1}) > 1
    assert [rnd for rnd, _, _ in order] == sorted(rnd for rnd, _, _ in order)
    assert order == schedule(cs, [1, 4, 16, 64], 3)  # the same run every time


def test_busy_shares_come_from_each_side_s_own_cpus() -> None:
    before = {0: (100, 1000), 1: (500, 1000)}
    after = {0: (150, 1100), 1: (599, 1100)}
    busy = busy_pct(before, after)
    assert busy({0}) == 50.0
    assert busy({1}) == 99.0
    assert busy({0, 1}) == 74.5
    assert busy({7}) != busy({7})  # NaN: a CPU /proc/stat does not list
    assert busy_pct(None, after)({0}) != busy_pct(None, after)({0})


def test_the_cpu_table_says_what_a_query_cost_the_client_and_which_cpu_ran_out() -> None:
    def cell(us: float, client: float, server: float) -> dict:
        return {"client_cpu_us": us, "client_busy_pct": client, "server_busy_pct": server}

    cells = {("pool (threaded)", 4): cell(27.25, 68.0, 98.4),
             ("peer", 4): cell(30.5, 80.0, float("nan"))}
    lines = cpu_table(cells, ["pool (threaded)", "peer", "absent"], [4])
    assert "| pool (threaded) | 27.2 µs (68% / 98%) |" in lines
    assert "| peer | 30.5 µs (80% / ?) |" in lines
    assert "| absent | n/a |" in lines
    assert cpu_table({("x", 1): {"ops_per_s": 1.0}}, ["x"], [1]) == []  # an older CSV: no table


def test_halt_polling_is_read_and_put_back(tmp_path: Path, monkeypatch) -> None:
    """--halt-poll sets the VM's idle polling for a run and restores it (here on a stand-in
    file: the real one is the machine's, and root's)."""
    knob = tmp_path / "guest_halt_poll_ns"
    monkeypatch.setattr(bench.bench, "HALT_POLL", str(knob))
    assert halt_polling() is None  # no such setting: nothing said, nothing set
    knob.write_text("0\n")
    assert halt_polling() == 0
    assert set_halt_polling(200000) == 0
    assert halt_polling() == 200000
    assert set_halt_polling(0) == 200000
    assert knob.read_text() == "0"


def test_a_run_where_idle_cpus_halt_at_once_says_what_that_does_to_the_ratios() -> None:
    assert polling_note(None) == [] and polling_note(200000) == []
    note = polling_note(0)[0]
    assert "without polling" in note and "--halt-poll 200000" in note
