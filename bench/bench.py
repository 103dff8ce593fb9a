"""Side-by-side benchmark: this project's pool against its peers, in one process, one run.

    python -m bench.bench [--seconds 2] [--rounds 3] [--threads 1,4,16,64] [--dsn DSN] [--no-pin]
                          [--halt-poll NS] [--sched-batch]   (the last two: diagnoses, see --help)

Each contender does "one read query per checkout" in its own natural idiom, against the same
local PostgreSQL (a throwaway server from the local binaries unless --dsn is given, run on CPUs
of its own: pin_apart), with a pool of 8 connections, at 1, 4, 16 and 64 threads. Cells run in
rounds (--rounds); within a round, the contenders at one thread count run back to back
(schedule), and a ratio is the median over the rounds of ours over the best peer in that round,
cells seconds apart. Each cell also records the client's CPU time per query and how busy the
client's and the server's CPUs were. A second table times checkout + return without a query
(and what the shared health board and the session reset add to it).

Results go to bench/results/<timestamp>/ (bench.csv, bench.md, bench.png) and bench/results/latest.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import Any, Callable

import psycopg2
import psycopg2.pool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pool  # noqa: E402  (the project's pool, from this checkout)

SIZE = 8
SQL = "SELECT id, name FROM items WHERE id = %s"
ROWS = 10_000


class Contender:
    """One pool in its natural idiom. `query` is one checkout with one read; `bare` is a
    checkout and return with no query (None if the pool has no such idiom)."""

    name = ""
    single_threaded = False  # process mode: one pool per single-threaded worker
    has_autocommit_variant = True  # can be configured to skip BEGIN/ROLLBACK round trips

    def __init__(self, dsn: str, autocommit: bool = False) -> None:
        self.dsn = dsn
        self.autocommit = autocommit
        self.name = self.label(autocommit)

    @classmethod
    def label(cls, autocommit: bool) -> str:
        return cls.name + " +autocommit" * autocommit

    def query(self, item_id: int) -> Any:
        raise NotImplementedError

    def bare(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OurThreaded(Contender):
    name = "pool (threaded)"
    mode = "threaded"
    has_autocommit_variant = False  # fetchone already runs one statement in autocommit

    def __init__(self, dsn: str, autocommit: bool = False) -> None:
        super().__init__(dsn, autocommit)
        self.p = pool.Pool(dsn, mode=self.mode, max_size=SIZE, min_size=0, timeout=30)

    def query(self, item_id: int) -> Any:
        return self.p.fetchone(SQL, (item_id,))

    def bare(self) -> None:
        with self.p.connection():
            pass

    def close(self) -> None:
        self.p.close()


class OurProcess(OurThreaded):
    name = "pool (process)"
    mode = "process"
    single_threaded = True


class Pgdbpool(Contender):
    """pgdbpool 1.0.2 as its README shows it: a global config, an autocommit group, Handler."""

    name = "pgdbpool"
    has_autocommit_variant = False  # its README's group is already autocommit

    def __init__(self, dsn: str, autocommit: bool = False) -> None:
        super().__init__(dsn, autocommit)
        from pgdbpool import pool as pgdbpool  # the README's `import pgdbpool` finds no Connection
        self.mod = pgdbpool
        p = psycopg2.extensions.parse_dsn(dsn)
        # pgdbpool has no port setting (libpq's PGPORT applies) and sets PGOPTIONS for the whole
        # process; keep both from leaking into the other contenders.
        saved = {k: os.environ.get(k) for k in ("PGPORT", "PGOPTIONS")}
        os.environ["PGPORT"] = p.get("port", "5432")
        try:
            pgdbpool.Connection.init({
                "type": "threaded",
                "db": {"host": p["host"], "name": p["dbname"], "user": p["user"], "pass": p["password"]},
                "groups": {"bench": {"connection_count": SIZE, "autocommit": True}},
            })
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def query(self, item_id: int) -> Any:
        with self.mod.Handler("bench") as db:
            for row in db.query(SQL, (item_id,)):
                return row

    def bare(self) -> None:
        with self.mod.Handler("bench"):
            pass


class Psycopg2Threaded(Contender):
    """psycopg2.pool.ThreadedConnectionPool raises PoolError when exhausted instead of waiting,
    so callers guard it with a semaphore of the pool's size: the usual idiom."""

    name = "psycopg2 ThreadedConnectionPool"

    def __init__(self, dsn: str, autocommit: bool = False) -> None:
        super().__init__(dsn, autocommit)
        self.p = psycopg2.pool.ThreadedConnectionPool(SIZE, SIZE, dsn)
        self.gate = threading.BoundedSemaphore(SIZE)
        if autocommit:
            conns = [self.p.getconn() for _ in range(SIZE)]
            for conn in conns:
                conn.autocommit = True
                self.p.putconn(conn)

    def query(self, item_id: int) -> Any:
        with self.gate:
            conn = self.p.getconn()
            try:
                with conn.cursor() as cur:
                    cur.execute(SQL, (item_id,))
                    return cur.fetchone()
            finally:
                self.p.putconn(conn)  # rolls back the implicit transaction

    def bare(self) -> None:
        with self.gate:
            self.p.putconn(self.p.getconn())

    def close(self) -> None:
        self.p.closeall()


class DBUtilsPooledDB(Contender):
    name = "DBUtils PooledDB"

    def __init__(self, dsn: str, autocommit: bool = False) -> None:
        super().__init__(dsn, autocommit)
        from dbutils.pooled_db import PooledDB

        def connect() -> Any:
            conn = psycopg2.connect(dsn)
            conn.autocommit = autocommit
            return conn

        connect.threadsafety = psycopg2.threadsafety  # DBUtils asks its creator
        self.p = PooledDB(connect, mincached=SIZE, maxcached=SIZE, maxconnections=SIZE,
                          blocking=True)

    def query(self, item_id: int) -> Any:
        conn = self.p.connection()
        try:
            cur = conn.cursor()
            cur.execute(SQL, (item_id,))
            row = cur.fetchone()
            cur.close()
            return row
        finally:
            conn.close()  # back to the pool, rolled back

    def bare(self) -> None:
        self.p.connection().close()

    def close(self) -> None:
        self.p.close()


class SQLAlchemyQueuePool(Contender):
    name = "SQLAlchemy QueuePool"

    def __init__(self, dsn: str, autocommit: bool = False) -> None:
        super().__init__(dsn, autocommit)
        import sqlalchemy
        self.text = sqlalchemy.text(SQL.replace("%s", ":id"))
        p = psycopg2.extensions.parse_dsn(dsn)
        url = sqlalchemy.engine.URL.create(
            "postgresql+psycopg2", username=p["user"], password=p["password"], host=p["host"],
            port=int(p["port"]), database=p["dbname"])
        self.engine = sqlalchemy.create_engine(
            url, pool_size=SIZE, max_overflow=0, pool_timeout=30,
            **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}))

    def query(self, item_id: int) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(self.text, {"id": item_id}).fetchone()

    def bare(self) -> None:
        with self.engine.connect():
            pass

    def close(self) -> None:
        self.engine.dispose()


class PsycopgPool(Contender):
    name = "psycopg_pool (psycopg 3)"

    def __init__(self, dsn: str, autocommit: bool = False) -> None:
        super().__init__(dsn, autocommit)
        import psycopg_pool
        self.p = psycopg_pool.ConnectionPool(dsn, min_size=SIZE, max_size=SIZE, timeout=30,
                                             open=True, kwargs={"autocommit": autocommit})
        self.p.wait()

    def query(self, item_id: int) -> Any:
        with self.p.connection() as conn:
            return conn.execute(SQL, (item_id,)).fetchone()

    def bare(self) -> None:
        with self.p.connection():
            pass

    def close(self) -> None:
        self.p.close()


CONTENDERS: list[type[Contender]] = [OurThreaded, OurProcess, Pgdbpool, Psycopg2Threaded,
                                     DBUtilsPooledDB, SQLAlchemyQueuePool, PsycopgPool]


def run_cell(c: Contender, threads: int, seconds: float, warmup: float = 0.3,
             server_cpus: set[int] | None = None) -> dict:
    """Hammer one contender from `threads` threads; count what finishes inside the window.

    Beside throughput and latency: the process's CPU time per query (`client_cpu_us`: what the
    pool costs the worker that runs it, kernel time included, whatever the server's speed), and
    how busy the client's and the server's CPUs were (`client_busy_pct`, `server_busy_pct`):
    where one of them was saturated, it, not the pool, set the throughput."""
    stop = threading.Event()
    window: list[float] = []
    results: list[list[int]] = [[] for _ in range(threads)]
    errors = [0] * threads

    def worker(i: int) -> None:
        rnd = random.Random(i)
        lat = results[i]
        clock = time.perf_counter_ns
        while not stop.is_set():
            t0 = clock()
            try:
                c.query(rnd.randint(1, ROWS))
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors[i] += 1
                continue
            t1 = clock()
            if window and t1 >= window[0]:
                lat.append(t1 - t0)

    pool_threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool_threads:
        t.start()
    time.sleep(warmup)
    ipis, steal, ticks = client_ipis(), cpu_steal(), cpu_ticks()
    cpu = time.process_time()
    window.append(time.perf_counter_ns())
    time.sleep(seconds)
    stop.set()
    end = time.perf_counter_ns()
    cpu = time.process_time() - cpu
    ipis = client_ipis() - ipis if ipis is not None else None
    steal = [b - a for a, b in zip(steal, cpu_steal())] if steal is not None else None
    busy = busy_pct(ticks, cpu_ticks())
    for t in pool_threads:
        t.join()
    lat = sorted(x for part in results for x in part)
    span = (end - window[0]) / 1e9
    per_thread = [len(part) for part in results]
    nan = float("nan")
    return {"ops": len(lat), "ops_per_s": len(lat) / span,
            "p50_ms": lat[len(lat) // 2] / 1e6 if lat else nan,
            "p99_ms": lat[int(len(lat) * 0.99)] / 1e6 if lat else nan,
            "max_ms": lat[-1] / 1e6 if lat else nan,
            # Request percentiles hide starvation (a starved thread contributes few requests):
            # the least-served thread's share of the most-served one's shows it. 1.0 = fair.
            "fairness": min(per_thread) / max(per_thread) if max(per_thread) else nan,
            "client_ipis_per_query": ipis / len(lat) if ipis is not None and lat else nan,
            "steal_pct": 100 * steal[0] / steal[1] if steal and steal[1] else nan,
            "client_cpu_us": cpu / len(lat) * 1e6 if lat else nan,
            "client_busy_pct": busy(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else nan,
            "server_busy_pct": busy(server_cpus) if server_cpus else nan,
            "errors": sum(errors)}


def cpu_ticks() -> dict[int, tuple[int, int]] | None:
    """Per CPU, (busy, total) clock ticks so far, from /proc/stat (busy: all but idle and
    iowait). None where /proc/stat does not say."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
        out = {}
        for f in lines:
            ticks = [int(x) for x in f[1:9]]  # user nice system idle iowait irq softirq steal
            out[int(f[0][3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
        return out
    except (OSError, ValueError, IndexError):
        return None


def busy_pct(before: dict[int, tuple[int, int]] | None,
             after: dict[int, tuple[int, int]] | None) -> Callable[[Any], float]:
    """A function of a set of CPUs: how busy they were between two cpu_ticks() readings, in %
    (NaN where unknown)."""

    def of(cpus: Any) -> float:
        if before is None or after is None:
            return float("nan")
        busy = sum(after[c][0] - before[c][0] for c in cpus if c in before and c in after)
        total = sum(after[c][1] - before[c][1] for c in cpus if c in before and c in after)
        return 100 * busy / total if total else float("nan")

    return of


def schedule(contenders: list[Any], thread_counts: list[int],
             rounds: int) -> list[tuple[int, int, Any]]:
    """The cells in the order they run, as (round, threads, contender): each round takes the
    thread counts in a shuffled order, and at each count runs every contender back to back, in
    a shuffled order too. So the cells a ratio compares are seconds apart, not minutes: on a
    virtual machine whose speed drifts by tens of percent over seconds, a contender's cell
    minutes away from its rival's measured the host's drift as much as the pools. Process mode
    runs at one thread only (one thread per process)."""
    out = []
    for rnd in range(1, rounds + 1):
        rng = random.Random(rnd)  # no contender always runs first, or last
        counts = thread_counts[:]
        rng.shuffle(counts)
        for n in counts:
            block = [c for c in contenders if n == 1 or not c.single_threaded]
            rng.shuffle(block)
            out += [(rnd, n, c) for c in block]
    return out


def cpu_steal() -> tuple[int, int] | None:
    """(steal, total) clock ticks of every CPU so far, from /proc/stat: steal is time the
    hypervisor ran something else while this VM had work. A cell with much of it measured the
    neighbours' load as well as the pools. None where /proc/stat does not say."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[7], sum(ticks[:8])  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None


def client_ipis() -> int | None:
    """Rescheduling and function-call interrupts received so far by this process's CPUs (the
    client's, once pinned). On one machine the server's CPU sends one whenever a reply wakes a
    client thread that must preempt the running one, or that sleeps on an idle CPU; in a VM each
    costs the sender an exit to the hypervisor. Separate machines would not charge the server
    for them, so the figure shows how much of a cell's cost is the benchmark's topology. None
    where /proc/interrupts does not say."""
    try:
        with open("/proc/interrupts") as f:
            lines = f.read().splitlines()
        mine = os.sched_getaffinity(0)
        cols = [i for i, name in enumerate(lines[0].split()) if int(name[3:]) in mine]
        rows = [f for f in map(str.split, lines[1:]) if f and f[0] in ("RES:", "CAL:")]
        return sum(int(f[1 + i]) for f in rows for i in cols) if len(rows) == 2 else None
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux on x86, say
        return None


# --quick scales every timing loop down (a smoke run: the code paths, not the figures).
SCALE = 1.0


def best_us(fn: Callable[[], Any], number: int) -> float:
    """Microseconds per call of `fn`, the best of 7 runs of `number` calls (times SCALE)."""
    number = max(1, int(number * SCALE))
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def time_bare(c: Contender) -> float:
    """Best-of-7 microseconds for one checkout + return with no query (1 thread)."""
    c.bare()
    return best_us(c.bare, 20000)


class _EmptyHandle:
    """The floor under any `with pool.connection():` in CPython: a handle and a with-block."""

    __slots__ = ("a", "b", "c")

    def __init__(self, a: Any, b: Any, c: Any) -> None:
        self.a, self.b, self.c = a, b, c

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def floor_rows(dsn: str) -> list[tuple[str, float]]:
    """Reference rows for the checkout table: the interpreter's floor and the pool's own
    bookkeeping without the handle (its private _checkout/_checkin pair)."""
    rows = []
    holder = object()

    def empty() -> None:
        with _EmptyHandle(holder, False, None):
            pass

    rows.append(("CPython floor: empty `with` + handle object",
                 best_us(empty, 50000)))
    for mode in ("threaded", "process"):
        p = pool.Pool(dsn, mode=mode, max_size=SIZE)

        def bookkeeping(p: pool.Pool = p) -> None:
            p._checkin(p._checkout(False, None), None)

        bookkeeping()
        rows.append((f"pool ({mode}): checkout + return bookkeeping, no handle",
                     best_us(bookkeeping, 50000)))
        p.close()
    return rows


def reset_rows(dsn: str) -> list[tuple[str, float]]:
    """What the session reset costs: a `connection()` block that runs one statement, with the
    server-side reset (the default) and without it (reset_session=False). The difference is the
    reset's one round trip; fetchone/fetchall/execute and blocks that run nothing pay none."""
    rows = []
    for mode in ("threaded", "process"):
        for reset in (True, False):
            p = pool.Pool(dsn, mode=mode, max_size=SIZE, reset_session=reset)

            def block(p: pool.Pool = p) -> None:
                with p.connection() as conn:
                    conn.cursor().execute("SELECT 1")

            block()
            us = best_us(block, 2000)
            rows.append((f"pool ({mode}): a block running one statement, session reset "
                         f"{'on (default)' if reset else 'off'}", us))
            p.close()
    return rows


def board_rows(dsn: str) -> list[tuple[str, float]]:
    """What the shared health board (pool/board.py) costs a checkout: `with p.connection()`
    with the board on and off in each mode, measured in alternation (best of 3 x 7 runs each),
    so the difference is the board's and not the machine's."""
    rows = []
    board = os.path.join(tempfile.mkdtemp(prefix="pool-bench-board-"), "board")
    for mode in ("threaded", "process"):
        pools = {shared: pool.Pool(dsn, mode=mode, max_size=SIZE, shared_state=shared and board)
                 for shared in (False, True)}
        best = {False: float("inf"), True: float("inf")}
        for _ in range(3):
            for shared, p in pools.items():

                def bare(p: pool.Pool = p) -> None:
                    with p.connection():
                        pass

                bare()
                best[shared] = min(best[shared], best_us(bare, 20000))
        default = mode == "process"
        for shared in (False, True):
            rows.append((f"pool ({mode}): shared health board {'on' if shared else 'off'}"
                         f"{' (default)' if shared == default else ''}", best[shared]))
            pools[shared].close()
    shutil.rmtree(os.path.dirname(board), ignore_errors=True)
    return rows


def watchdog_rows(dsn: str) -> list[tuple[str, float]]:
    """What the statement deadline (query_timeout, pool/watchdog.py) costs: `p.fetchone` with it
    on (30 s, the default) and off (None) in each mode, in alternation (best of 3 x 7 runs each):
    the watchdog's share of a statement is a clock read and two attribute writes."""
    rows = []
    for mode in ("threaded", "process"):
        pools = {on: pool.Pool(dsn, mode=mode, max_size=SIZE, query_timeout=30.0 if on else None)
                 for on in (True, False)}
        best = {True: float("inf"), False: float("inf")}
        for _ in range(3):
            for on, p in pools.items():

                def one(p: pool.Pool = p) -> None:
                    p.fetchone("SELECT 1")

                one()
                best[on] = min(best[on], best_us(one, 2000))
        for on in (True, False):
            rows.append((f"pool ({mode}): `fetchone`, statement deadline "
                         f"{'on (query_timeout=30, default)' if on else 'off (query_timeout=None)'}",
                         best[on]))
            pools[on].close()
    # The same difference with the server taken out (a round trip's noise is larger than it):
    # the wrapper every statement goes through, around a method that does nothing.
    from pool.connection import _armed

    class Stub:
        busy_since, timed_out = 0.0, False

    statement = _armed(lambda cursor: None)
    for timeout in (30.0, None):
        cursor = Stub()
        cursor.connection = Stub()
        cursor.connection.query_timeout = timeout
        us = best_us(lambda: statement(cursor), 200000)
        rows.append((f"the statement wrapper alone, deadline {'on' if timeout else 'off'}", us))
    return rows


def start_server(pin: bool = True) -> tuple[Callable[[], None], str, str, set[int] | None]:
    """A throwaway primary (and its replicas, unused here) from the local binaries; with `pin`,
    the server on one half of the CPUs and this process on the other (see pin_apart). Returns
    stop(), the DSN, the placement in words and the server's CPUs (None if they are shared)."""
    from native.cluster import Cluster
    base = tempfile.mkdtemp(prefix="pool-bench-", dir="/tmp")
    os.chmod(base, 0o755)
    cluster = Cluster(os.path.join(base, "c"), ports=Cluster.free_ports(3), durable=False)
    print("starting a local PostgreSQL ...", flush=True)
    cluster.start()
    restore = os.sched_getaffinity(0) if pin and hasattr(os, "sched_getaffinity") else None
    postmasters = [cluster.pid(node) for node in cluster.nodes]
    placement = pin_apart(postmasters) if pin else "not pinned (--no-pin)"
    server_cpus = None
    if restore is not None and postmasters[0] is not None:
        server_cpus = set(os.sched_getaffinity(postmasters[0]))
        if server_cpus & os.sched_getaffinity(0):  # one CPU: nothing was split
            server_cpus = None

    def stop() -> None:
        if restore is not None:
            os.sched_setaffinity(0, restore)
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)

    return stop, cluster.dsn("primary"), placement, server_cpus


def pin_apart(postmasters: list[int | None]) -> str:
    """Put the server's processes on the upper half of this process's CPUs and the calling
    thread (so every thread started after it: call it before making any pool) on the lower
    half, as if client and server were two machines.

    Unpinned, the result depended on where the kernel happened to place 8 backends and up to 64
    Python threads: on 2 CPUs the same pool at 64 threads ran at about 12,000 or about 30,000
    queries/s, cell after cell, by whether the threads and the backends had settled on separate
    CPUs or shared both. Backends forked later inherit the postmaster's CPUs."""
    from native.cluster import _descendants
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no CPU affinity on this system)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    client, server = set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])
    for pm in postmasters:
        if pm is not None:
            for pid in [pm, *_descendants(pm)]:
                try:
                    os.sched_setaffinity(pid, server)
                except OSError:  # a process that just exited
                    pass
    os.sched_setaffinity(0, client)
    return f"client on CPU {_cpu_list(client)}, server on CPU {_cpu_list(server)}"


HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def halt_polling() -> int | None:
    """How long an idle CPU of this virtual machine polls for work before it halts (Linux's
    haltpoll cpuidle driver, in KVM guests), or None where there is no such setting.

    It decides what a wake-up costs here. Waking a halted virtual CPU takes an interrupt, which
    costs the waking CPU an exit to the hypervisor; a polling one needs none. On one machine the
    server's CPU wakes a client thread with every reply, so with polling off (0, as on the
    machine this project is built on) a client that leaves its CPU idle between queries makes
    the server pay for it, and a client that keeps its CPU busy, even with wasted work, costs
    the server less. The kernel's default is 200,000 ns."""
    try:
        with open(HALT_POLL) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def set_halt_polling(ns: int) -> int:
    """Set guest_halt_poll_ns (root only); return the value it had."""
    before = halt_polling()
    if before is None:
        raise SystemExit(f"--halt-poll: no {HALT_POLL} here (not a KVM guest with haltpoll)")
    with open(HALT_POLL, "w") as f:
        f.write(str(ns))
    return before


def _cpu_list(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--threads", default="1,4,16,64")
    ap.add_argument("--dsn", help="use this server instead of starting one")
    ap.add_argument("--no-autocommit-peers", dest="autocommit_peers", action="store_false",
                    help="skip the peers configured for autocommit (one round trip, like ours)")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the "
                    "contenders whose name contains one (e.g. 'pool (,psycopg2')")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="leave the server and this process wherever the kernel puts them "
                    "(by default they get separate CPUs: see pin_apart)")
    ap.add_argument("--sched-batch", action="store_true",
                    help="run the client threads under SCHED_BATCH (no wake-up preemption): "
                    "a diagnosis of what waking client threads costs the server's CPU, not a "
                    "setting to compare pools by")
    ap.add_argument("--halt-poll", type=int, metavar="NS",
                    help="set the virtual machine's idle polling (guest_halt_poll_ns, see "
                    "halt_polling) to NS nanoseconds for the run, and put it back after: a "
                    "diagnosis of what waking an idle CPU costs here, like --sched-batch")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: timing loops a hundredth as long (the figures mean little)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    global SCALE
    SCALE = 0.01 if args.quick else 1.0
    thread_counts = [int(t) for t in args.threads.split(",")]

    stop = server_cpus = None
    dsn = args.dsn
    placement = "not pinned (--dsn)"
    if not dsn:
        stop, dsn, placement, server_cpus = start_server(args.pin)
    if args.sched_batch:  # after the server started (it must not inherit it); threads do
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        placement += "; client threads SCHED_BATCH"
    restore_polling = None
    if args.halt_poll is not None:
        restore_polling = set_halt_polling(args.halt_poll)
    polling = halt_polling()
    if polling is not None:
        placement += f"; idle CPUs poll for {polling:,} ns before they halt (guest_halt_poll_ns)"
    print(f"CPUs: {placement}", flush=True)
    try:
        # Chosen by name before any is made: a contender left out opens no connection and
        # needs none of its packages (`--only "pool (threaded),pool (process)"` runs with the
        # test requirements alone).
        kinds = [(cls, False) for cls in CONTENDERS]
        if args.autocommit_peers:
            kinds += [(cls, True) for cls in CONTENDERS if cls.has_autocommit_variant]
        wanted = [w for w in args.only.split(",") if w]
        contenders = [cls(dsn, autocommit) for cls, autocommit in kinds
                      if not wanted or any(w in cls.label(autocommit) for w in wanted)]
        print(f"{len(contenders)} contenders, pool size {SIZE}, threads {thread_counts}, "
              f"{args.rounds} rounds of {args.seconds:.1f}s cells", flush=True)
        rows = []
        order = schedule(contenders, thread_counts, args.rounds)
        for k, (rnd, n, c) in enumerate(order):
            r = run_cell(c, n, args.seconds, server_cpus=server_cpus)
            rows.append({"round": rnd, "contender": c.name, "threads": n, **r})
            print(f"  cell {k + 1}/{len(order)} (round {rnd}): "
                  f"{c.name:32s} {n:3d} threads {r['ops_per_s']:9.0f} ops/s "
                  f"p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms "
                  f"client {r['client_cpu_us']:.1f} µs/query"
                  + (f" errors {r['errors']}" if r["errors"] else ""), flush=True)
        print("timing checkout + return without a query ...", flush=True)
        bare = [(c.name, time_bare(c)) for c in contenders if not c.autocommit] + floor_rows(dsn)
        bare += board_rows(dsn)
        print("timing fetchone with and without the statement deadline ...", flush=True)
        bare += watchdog_rows(dsn)
        print("timing a block with one statement, with and without the session reset ...", flush=True)
        bare += reset_rows(dsn)
        for c in contenders:
            c.close()
    finally:
        if stop:
            stop()
        if restore_polling is not None:
            set_halt_polling(restore_polling)

    from bench.report import write_report
    outdir = write_report(rows, bare, thread_counts, [c.name for c in contenders], Path(args.out),
                          placement, polling)
    print((outdir / "bench.md").read_text())
    print(f"results in {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
