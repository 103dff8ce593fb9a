"""The shared health board (pool/board.py) against real servers and real processes: an outage
found once, one prober per outage, a dead prober's lease taken over, and a board that is stale,
corrupt or cannot be created.

Worker processes are started with fork (the pool made in the parent first, and inherited) and
with spawn (each builds its own); they are driven over pipes (tests/boardworker.py).
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import random
import signal
import struct
import threading
import time

import pytest

import boardworker
import pool
from pool import board as boards
from conftest import APP_PASSWORD
from native.cluster import NODES
from pgutil import admin_sql, fork_replica2, proxied, stalled, throwaway_cluster, wait_until
from proxy import Proxy

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]


class Workers:
    """N processes, each with a pool over the same servers and the same board."""

    def __init__(self, n: int, spec: dict, method: str) -> None:
        ctx = multiprocessing.get_context(method)
        self.conns, self.procs = [], []
        inherited = boardworker.make_pool(spec) if method == "fork" else None
        for _ in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=boardworker.serve, args=(theirs, spec, inherited), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        if inherited is not None:
            inherited.close()

    def ask(self, i: int, cmd: str, timeout: float = 30) -> dict:
        self.conns[i].send(cmd)
        assert self.conns[i].poll(timeout), f"worker {i} did not answer {cmd!r}"
        return self.conns[i].recv()

    def kill(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].join(5)

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.is_alive():
                try:
                    self.ask(i, "quit", timeout=5)
                except (AssertionError, OSError, EOFError):
                    pass
                proc.join(5)
                if proc.is_alive():
                    proc.kill()


@pytest.fixture
def black_holable(db):
    proxy = Proxy(db.port("primary"))
    yield proxy
    proxy.close()


def spec_for(db, proxy, board_path, mode="process", **kw):
    return dict(primary=proxied(db, "primary", proxy), replicas=[db.dsn("replica1")], mode=mode,
                board=board_path, **kw)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_an_outage_is_found_once_and_a_recovery_seen_by_every_worker(db, black_holable, board_path, method):
    """The primary's host vanishes (a killed container: its address black-holes, and the pooled
    sessions to it go silent). Of several workers' writes, one pays a deadline, the next at most
    a probe's grace, and the rest fail fast; once it is back, every worker writes, including one
    that saw no request."""
    proxy = black_holable
    w = Workers(4, spec_for(db, proxy, board_path, query_timeout=1), method)
    try:
        for i in range(3):
            assert w.ask(i, "write")["ok"]
        proxy.freeze()
        first = w.ask(0, "write")  # its pooled session: no answer within query_timeout
        assert not first["ok"] and first["error"] == "QueryTimeout", first
        rest = [w.ask(i, "write") for i in (1, 2, 1, 2)]
        assert all(not r["ok"] for r in rest)
        # A statement past its deadline may be one slow query, so the board says "suspect": the
        # first of the others gives its own probe a suspect endpoint's grace (Endpoint.grace:
        # four logins, PROBE_GRACE_MAX at most; 0.27 s on a slow day). That probe going
        # unanswered makes the primary plainly down there and on the board: the rest fail at
        # once. None waits a query_timeout (1 s) of its own.
        seconds = [r["seconds"] for r in rest]
        assert seconds[0] < pool.endpoint.PROBE_GRACE_MAX + 0.2, seconds
        assert all(s < 0.2 for s in seconds[1:]), seconds
        assert all(w.ask(i, "read")["ok"] for i in range(3))  # reads carry on, on the replica
        proxy.cut()  # the host is back: the silent sessions are gone, new connections go through
        proxy.forward()
        for i in range(4):  # worker 3 had no request during the outage
            wait_until(lambda i=i: w.ask(i, "write")["ok"], timeout=10, interval=0.05,
                       what=f"worker {i} writing again")
        host = w.ask(3, "host")["value"]
        assert host["scope"] == "host" and host["processes"] >= 4
        primary = host["endpoints"][0]
        assert primary["workers_up"] >= 4 and primary["workers_down"] == 0
    finally:
        w.close()


@pytest.mark.parametrize("form", ["declared", "candidates"])
def test_a_worker_started_during_an_outage_takes_it_from_the_board(db, board_path, form):
    """gunicorn replaces a worker (max_requests, a crash) while the primary is stalled and
    another worker has already found it down: the new worker neither probes the stalled server
    at start nor waits on it, so it starts, and fails its writes, as fast as in a healthy
    cluster; and it writes again once the server is. One exception: having seen no login of
    its own, a new worker gives the probe of a suspicion it finds the longest grace (slow logins
    must not look like an outage to it), so its first write may wait that once."""
    if form == "declared":
        spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")])
    else:
        spec = dict(primary=[db.dsn("primary"), db.dsn("replica1")])
    spec.update(mode="process", board=board_path, connect_timeout=2, query_timeout=1)
    old = Workers(1, spec, "spawn")
    fresh = None
    try:
        assert old.ask(0, "write")["ok"]
        with stalled(db, "primary"):
            found = old.ask(0, "write")  # its pooled session: no answer within query_timeout
            assert not found["ok"] and found["error"] == "QueryTimeout", found
            fresh = Workers(2, spec, "spawn")
            born = [fresh.ask(i, "born")["value"] for i in range(2)]
            assert all(b < 1.0 for b in born), born  # connect_timeout is 2 s: nobody paid it
            writes = [fresh.ask(i, "write") for i in (0, 1, 0, 1)]
            assert all(not r["ok"] for r in writes), writes
            seconds = [r["seconds"] for r in writes]
            assert max(seconds[:2]) < pool.endpoint.PROBE_GRACE_MAX + 0.1, seconds
            assert max(seconds[2:]) < 0.2, seconds  # (the stall is confirmed: fast from here)
            assert all(fresh.ask(i, "read")["ok"] for i in range(2))  # reads carry on
        for i in range(2):
            wait_until(lambda i=i: fresh.ask(i, "write")["ok"], timeout=10, interval=0.05,
                       what=f"fresh worker {i} writing again")
    finally:
        old.close()
        if fresh is not None:
            fresh.close()


def test_a_worker_started_while_the_servers_are_watched_does_not_probe_them(db, board_path):
    """Another worker's monitor saw the servers a moment ago: a new worker takes that from the
    board and starts with no I/O at all; its first request opens its first connection."""
    proxy = Proxy(db.port("replica1"))
    spec = dict(primary=db.dsn("primary"), replicas=[proxied(db, "replica1", proxy)], mode="process",
                board=board_path, max_lag=10)  # lag is watched: a monitor per server
    old = Workers(1, spec, "spawn")
    fresh = None
    try:
        b = boards.Board(board_path)
        ident = pool.config.endpoint_config(spec["replicas"][0], "replica", "r", pool.config.Options()).identity
        slot = b.slot_for(ident)

        def watched():
            assert old.ask(0, "read")["ok"]
            entry = b.read(slot)
            return entry is not None and entry.lag_at > boards.monotonic() - 1.0
        wait_until(watched, timeout=10, interval=0.1, what="a monitor round on the board")
        before = proxy.accepted
        fresh = Workers(1, spec, "spawn")
        assert fresh.ask(0, "born")["ok"]
        assert proxy.accepted == before  # no probe of a server a monitor just saw
        assert fresh.ask(0, "read")["ok"]
        assert proxy.accepted > before  # the first read's own connection (its monitor's, too)
    finally:
        old.close()
        if fresh is not None:
            fresh.close()
        proxy.close()


def test_after_a_quiet_spell_a_request_waits_for_the_probe_and_finds_the_server_back(db, board_path):
    """Failing fast is for an outage someone confirmed just now. A worker that comes back to a
    down endpoint after nobody heard of it for a while (endpoint.QUIET) gives the probe its
    grace, so the first write after the server's recovery succeeds rather than failing."""
    spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")], mode="process",
                board=board_path, connect_timeout=1, query_timeout=1)
    w = Workers(2, spec, "spawn")
    try:
        for i in range(2):
            assert w.ask(i, "write")["ok"]
        with stalled(db, "primary"):
            assert w.ask(0, "write")["error"] == "QueryTimeout"
            assert not w.ask(1, "write")["ok"]
        time.sleep(pool.endpoint.QUIET + pool.endpoint.BACKOFF_CAP * 1.5)
        for i in range(2):
            r = w.ask(i, "write")
            assert r["ok"], r
    finally:
        w.close()


def test_a_probe_in_flight_is_not_waited_for_once_another_process_confirms_the_outage(
        db, black_holable, board_path):
    """A statement past its deadline makes the endpoint suspect, and requests give its probe the
    grace. When another process's slow failure confirms the outage meanwhile (the board: down,
    one more failure, no longer suspect), this process's requests stop waiting for its own probe,
    which is as doomed: they fail fast while it runs on in the background."""
    p = pool.Pool(proxied(db, "primary", black_holable), mode="threaded", shared_state=board_path,
                  connect_timeout=3, query_timeout=0.3, timeout=5)
    try:
        assert p.fetchone("SELECT 1") == (1,)
        ep = p._endpoints[0]
        ep.login_s = 0.125  # a grace of 0.5 s: the probe stays young for the whole test
        black_holable.freeze()  # the host vanished: its live session and new ones get nothing
        with pytest.raises(pool.QueryTimeout):
            p.fetchone("SELECT 1")  # no answer: ejected as suspect, probed at once
        wait_until(lambda: ep.probe is not None, timeout=2, interval=0.001, what="the probe")
        assert ep.state == "down" and ep.suspect and ep.probe.awaited
        other = boards.Board(board_path)  # another worker's connect to the black hole timed out
        slot = other.slot_for(ep.config.identity)
        entry = other.read(slot)
        assert entry.state == boards.DOWN and entry.flags & boards.SUSPECT  # shared as suspect
        other.write(slot, state=boards.DOWN, flags=0, failures=entry.failures + 1,
                    retry_at=boards.monotonic() + 1.0, error="connect failed: timeout expired")
        with pytest.raises(pool.EndpointUnavailable):
            p.fetchone("SELECT 1")
        assert ep.probe is not None and not ep.probe.awaited  # its own probe: still running
        assert not ep.suspect and not ep.awaiting_probe(time.monotonic())
    finally:
        p.close()
        black_holable.forward()


@pytest.mark.parametrize("mode", ["process", "threaded"])
def test_one_slow_statement_costs_the_other_workers_no_failed_write(db, board_path, mode):
    """A statement that runs past query_timeout on a healthy primary (a slow report, a lock
    wait) is a hint, not proof: it used to go on the board as "down", and every other worker
    then failed its writes for up to a second. It is shared as suspect: another worker's next
    write gives its probe the grace, finds the server fine, and succeeds."""
    spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")], mode=mode,
                board=board_path, connect_timeout=2, query_timeout=1)
    w = Workers(2, spec, "spawn")
    try:
        for i in range(2):
            assert w.ask(i, "write")["ok"]
        slow = w.ask(0, "slow")
        assert not slow["ok"] and slow["error"] == "QueryTimeout", slow
        for i in (1, 0, 1):
            r = w.ask(i, "write")
            assert r["ok"], r
            assert r["seconds"] < 0.5, r["seconds"]
    finally:
        w.close()


@pytest.mark.parametrize("mode", ["process", "threaded"])
def test_one_slow_statement_costs_no_worker_its_sessions(db, board_path, mode):
    """The board's "suspect" used to count as an outage: a worker that read it, or that read
    only the "up" after it (the outage counter had moved), closed every session it had to the
    primary. A worker now keeps them through a suspicion, and pings them before it lends them
    once the server is back (or once it finds the counter moved). Both orders: the other worker
    hears of the suspicion first, or only of the re-admission."""
    spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")], mode=mode,
                board=board_path, connect_timeout=2, query_timeout=1)
    pid = ("fetchone", "SELECT pg_backend_pid()", None, {})
    w = Workers(2, spec, "spawn")
    try:
        assert w.ask(0, "write")["ok"]
        first = w.ask(1, pid)["value"][0][0]  # worker 1's one session to the primary
        for order in ((1, 0), (0, 1)):
            slow = w.ask(0, "slow")
            assert not slow["ok"] and slow["error"] == "QueryTimeout", slow
            for i in order:
                r = w.ask(i, pid)
                assert r["ok"], r
                if i == 1:
                    assert r["value"][0][0] == first, f"worker 1 opened a new session {order}"
        assert w.ask(1, "stats")["value"]["connects"] == 1
    finally:
        w.close()


@pytest.mark.parametrize("mode", ["process", "threaded"])
def test_a_worker_that_missed_a_suspicion_pings_its_sessions_before_lending_them(
        db, black_holable, board_path, mode):
    """A firewall forgot the flows to the primary (new logins pass). Worker 0 pays the deadline;
    its probe answers at once, so the suspicion lasts milliseconds and worker 1, with no request
    then (or a housekeeping thread that reads the board once a second), misses it. The outage
    counter did not move for a suspicion, so worker 1 lent its dead session: a QueryTimeout of
    its own (found by a red-team run). The counter moves, and a worker that finds it moved
    pings its sessions before it lends them."""
    proxy = black_holable
    w = Workers(2, spec_for(db, proxy, board_path, mode=mode, query_timeout=1), "spawn")
    try:
        for i in range(2):
            assert w.ask(i, "write")["ok"]
        proxy.lose_flows()
        assert w.ask(0, "write")["error"] == "QueryTimeout"
        assert w.ask(0, "write")["ok"]  # the probe answered: up again, on the board too
        r = w.ask(1, "write")
        assert r["ok"], r
    finally:
        w.close()


def test_a_worker_that_slept_through_the_first_outage_of_a_board_drops_its_sessions(
        db, black_holable, board_path):
    """A worker with no request during an outage learns of it from the board's outage counter
    once the server is back. The check was skipped while the counter it remembered was 0: on a
    new board, a process-mode worker idle through the first outage kept its sessions, and after
    a host that came back without them (its flows forgotten) its next write paid query_timeout
    (found by a red-team run). Process mode: a threaded worker reads the board within a second,
    outage or not."""
    proxy = black_holable
    w = Workers(2, spec_for(db, proxy, board_path, query_timeout=1), "spawn")
    try:
        for i in range(2):
            assert w.ask(i, "write")["ok"]
        proxy.freeze()
        assert w.ask(0, "write")["error"] == "QueryTimeout"
        assert not w.ask(0, "write")["ok"]  # its probe's grace passes unanswered: confirmed
        proxy.lose_flows()
        proxy.forward()
        wait_until(lambda: w.ask(0, "write")["ok"], timeout=10, interval=0.05,
                   what="worker 0 writing again")
        r = w.ask(1, "write")
        assert r["ok"], r
    finally:
        w.close()


def test_after_a_refusal_the_next_write_waits_for_its_probe_and_finds_the_server_back(
        db, black_holable, board_path):
    """A restart under load: the primary's port refuses for a moment (nothing listens yet), then
    it accepts. A refusal comes at once, so a probe after it costs a waiting write milliseconds:
    it is no reason to fail fast for a quiet second (endpoint.QUIET). It used to be one, so a
    process-mode worker under steady writes took the restarted primary back only up to a second
    after it accepted connections (1.16 s in `make loadtest-failover TARGET=primary`)."""
    proxy = black_holable
    w = Workers(1, spec_for(db, proxy, board_path, connect_timeout=2), "spawn")
    try:
        assert w.ask(0, "write")["ok"]
        proxy.refuse()
        proxy.cut()
        assert not w.ask(0, "write")["ok"]  # its session is gone: suspect, probe at once
        refused = w.ask(0, "write")  # that probe is refused (or reset) at once
        assert not refused["ok"] and refused["seconds"] < 0.5, refused
        time.sleep(pool.endpoint.BACKOFF_CAP * 1.3)  # the next probe is due; QUIET has not passed
        proxy.forward()
        back = w.ask(0, "write")
        assert back["ok"], back
    finally:
        w.close()


def test_a_recovered_primary_is_taken_back_under_sparse_traffic(db, board_path):
    """Three workers, a write to one of them every 0.1 s in turn (each sees one every 0.3 s, as
    sync workers behind a proxy do under light load). The primary really stops, then starts:
    writes succeed again within 2 s, every time. They used to stay refused for 4 to 12 s, or
    for good: each worker's probe start counted as news of the outage for the others, so
    nobody waited on a probe, and a probe nobody waits on advanced one step per request and
    was dropped at connect_timeout."""
    spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")], mode="process",
                board=board_path, connect_timeout=0.5, query_timeout=1)
    w = Workers(3, spec, "spawn")
    turn = iter(range(10**6))

    def write_in_turn() -> tuple[float, bool]:
        at = time.monotonic()
        ok = w.ask(next(turn) % 3, "write")["ok"]
        time.sleep(max(0.0, at + 0.1 - time.monotonic()))
        return at, ok

    try:
        for i in range(3):
            assert w.ask(i, "write")["ok"]
        for _ in range(2):
            db.stop("primary", mode="immediate")
            down = time.monotonic()
            while time.monotonic() - down < 2.0:
                assert not write_in_turn()[1]
            db.start_node("primary")
            back = time.monotonic()
            while True:
                at, ok = write_in_turn()
                if ok or at - back > 10:
                    break
            assert ok and at - back < 2.0, f"first write {at - back:.1f}s after the primary started"
            for _ in range(6):  # and from then on, every worker
                assert write_in_turn()[1]
    finally:
        w.close()


def test_one_prober_per_outage(db, board_path, tmp_path):
    """While the primary is down, only the holder of its probe lease probes: with three
    threaded workers sharing a board the proxy sees one worker's attempts, not three."""
    def attempts(shared) -> int:
        proxy = Proxy(db.port("primary"))
        spec = spec_for(db, proxy, shared if shared else False, mode="threaded", connect_timeout=0.3)
        w = Workers(3, spec, "spawn")
        try:
            for i in range(3):
                assert w.ask(i, "write")["ok"]
            proxy.blackhole()
            proxy.cut()
            for i in range(3):
                w.ask(i, "write")  # each notices; each housekeeper would now probe
            before = proxy.accepted
            time.sleep(3.0)
            return proxy.accepted - before
        finally:
            w.close()
            proxy.close()

    alone = attempts(False)
    shared = attempts(str(tmp_path / "shared-board"))
    assert alone >= 9, alone  # three probers, each every connect_timeout + backoff
    assert shared <= alone / 2, (shared, alone)


def test_a_prober_killed_mid_probe_leaves_the_lease_to_another(db, black_holable, board_path):
    proxy = black_holable
    w = Workers(2, spec_for(db, proxy, board_path, mode="threaded", connect_timeout=2), "spawn")
    try:
        for i in range(2):
            assert w.ask(i, "write")["ok"]
        proxy.blackhole()
        proxy.cut()
        w.ask(0, "write")  # worker 0 finds it down: its housekeeper probes, holding the lease
        w.ask(1, "write")
        time.sleep(0.5)
        w.kill(0)  # mid-probe (a black-holed connect takes connect_timeout): the kernel frees the lease
        proxy.forward()
        wait_until(lambda: w.ask(1, "stats")["value"]["endpoints"][0]["state"] == "up",
                   timeout=10, interval=0.1, what="the other worker probing and re-admitting")
    finally:
        w.close()


def test_a_prober_that_stops_attending_its_probe_leaves_it_to_another(db, black_holable, board_path):
    """A threaded worker probing the black-holed primary is frozen mid-probe (SIGSTOP: a stopped
    or starved process). It is alive, so the kernel keeps its lease, and a worker that relied on
    the lease alone never probed: writes stayed refused for good after the primary was back.
    A probe overdue by connect_timeout past the board's next-probe time is left to whoever
    comes next."""
    proxy = black_holable
    prober = Workers(1, spec_for(db, proxy, board_path, mode="threaded", connect_timeout=1), "spawn")
    other = None
    b = boards.Board(board_path)
    ident = pool.config.endpoint_config(proxied(db, "primary", proxy), "primary", "p",
                                        pool.config.Options()).identity
    slot = b.slot_for(ident)
    pid = prober.procs[0].pid
    try:
        assert prober.ask(0, "write")["ok"]
        proxy.blackhole()
        proxy.cut()
        assert not prober.ask(0, "write")["ok"]  # down: its housekeeper probes, one each second
        deadline = time.monotonic() + 10
        while True:  # freeze it while it holds the lease, mid-probe
            assert time.monotonic() < deadline, "the prober never held the lease"
            if boards._locked_by_other(b.fd, boards._LEASE_LOCK + slot.index):
                os.kill(pid, signal.SIGSTOP)
                if boards._locked_by_other(b.fd, boards._LEASE_LOCK + slot.index):
                    break
                os.kill(pid, signal.SIGCONT)  # its probe ended just then: try again
            time.sleep(0.005)
        other = Workers(1, spec_for(db, proxy, board_path, mode="process", connect_timeout=1), "spawn")
        assert other.ask(0, "born")["ok"]
        proxy.forward()
        wait_until(lambda: other.ask(0, "write")["ok"], timeout=8, interval=0.1,
                   what="the other worker writing again while the prober is frozen")
        assert boards._locked_by_other(b.fd, boards._LEASE_LOCK + slot.index)  # frozen throughout
    finally:
        os.kill(pid, signal.SIGCONT)
        prober.close()
        if other is not None:
            other.close()


class _Interrupt(Exception):
    pass


def _interrupt(signum, frame):
    raise _Interrupt


def _write_under_interrupts(path: str, conn) -> None:
    """In a process of its own (a hang must fail the test, not hold it): board writes, each
    under a timer whose handler raises somewhere inside; then one write from a thread."""
    b = boards.Board(path)
    slot = b.slot_for("host=x port=1 dbname=d user=u")
    signal.signal(signal.SIGALRM, _interrupt)
    rnd = random.Random(11)
    interrupted = 0
    for n in range(4000):
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, rnd.uniform(0.000001, 0.0002))
                b.write(slot, failures=n)
                b.take_monitor(slot, boards.monotonic() + rnd.choice((0, 10)))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Interrupt:
            interrupted += 1
    conn.send(("interrupted", interrupted))
    done = threading.Event()
    threading.Thread(target=lambda: (b.write(slot, failures=1), done.set()), daemon=True).start()
    conn.send(("thread wrote", done.wait(5)))


def _write_once(path: str) -> None:
    b = boards.Board(path)
    b.write(b.slot_for("host=elsewhere port=1 dbname=d user=u"), failures=1)


def test_an_interrupt_inside_a_board_write_leaves_no_lock_behind(board_path):
    """A signal handler's exception (a request timeout, ^C) may land anywhere in a board write.
    It used to land between taking the board's locks and the block that releases them: the
    next write, by any thread of the process or by any other process, then waited forever."""
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    worker = ctx.Process(target=_write_under_interrupts, args=(board_path, theirs), daemon=True)
    worker.start()
    said = {}
    try:
        while len(said) < 2 and mine.poll(60):
            key, value = mine.recv()
            said[key] = value
    finally:
        worker.join(5)
        if worker.is_alive():
            worker.kill()
    assert "interrupted" in said, "the process writing under interrupts hung in a write"
    assert said["interrupted"] > 100, said  # the interrupts did land, often
    assert said.get("thread wrote"), "a thread of that process cannot write: a lock was left held"
    other = ctx.Process(target=_write_once, args=(board_path,))
    other.start()
    other.join(20)
    alive = other.is_alive()
    if alive:
        other.kill()
    assert not alive and other.exitcode == 0, "another process cannot write: a file lock was left held"


def _leftovers(board, monkeypatch, n=boards.SLOTS, age=3600.0):
    """Every slot claimed by servers of earlier runs (other clusters, other ports, long gone),
    last written ``age`` seconds ago: what a machine's /dev/shm board holds after many runs."""
    with monkeypatch.context() as m:
        m.setattr(boards, "monotonic", lambda real=boards.monotonic: real() - age)
        ghosts = [board.slot_for(f"host=ghost{i} port=5432 dbname=d user=u") for i in range(n)]
        for g in ghosts:
            board.write(g, state=boards.UP)
    return ghosts


def test_a_full_board_makes_room_and_never_mixes_servers_up(board_path, monkeypatch):
    """The board has a fixed number of slots and servers come and go (every test cluster, every
    redeploy on new ports). It used to fill up for good: a new server then got no slot, and its
    workers shared nothing. Leftovers nobody wrote for a while now make room, and a slot taken
    over by another server never passes its news off as the old one's."""
    b = boards.Board(board_path)
    ghosts = _leftovers(b, monkeypatch)
    prober = boards.Board(board_path)  # another process, probing the oldest leftover right now
    assert prober.try_lease(ghosts[0], 1)
    mine = b.slot_for("host=db port=5432 dbname=d user=u")
    assert mine.index is not None, "no room made on a board full of leftovers"
    assert mine.index != ghosts[0].index  # a slot somebody is probing is not given away
    b.write(mine, state=boards.DOWN, error="mine is down")
    evicted = next(g for g in ghosts if g.index == mine.index)
    assert b.read(evicted) is None  # that server's handle sees nothing, not another's outage
    assert b.read(mine).state == boards.DOWN
    b.write(evicted, state=boards.DOWN, error="the ghost is down")  # still in use after all
    assert evicted.index not in (None, mine.index)  # it made room for itself elsewhere
    assert b.read(evicted).error == "the ghost is down" and b.read(mine).error == "mine is down"
    other = boards.Board(board_path)  # another process finds each server by its key
    assert other.read(other.slot_for("host=db port=5432 dbname=d user=u")).error == "mine is down"


def test_a_board_full_of_live_servers_evicts_none_of_them(board_path, monkeypatch):
    """Slots written recently belong to servers somebody watches: a newcomer goes without a
    slot (its processes keep their own view) rather than push one out."""
    b = boards.Board(board_path)
    live = _leftovers(b, monkeypatch, age=1.0)
    newcomer = b.slot_for("host=new port=5432 dbname=d user=u")
    assert newcomer.index is None and b.read(newcomer) is None
    b.write(newcomer, state=boards.DOWN, error="new")  # skipped: there is no room
    assert b.read(newcomer) is None
    assert all(b.read(g).state == boards.UP and g.index == i for i, g in enumerate(live))


def test_workers_share_an_outage_on_a_board_full_of_leftovers(db, board_path, monkeypatch):
    """CI's outage smoke test failed this way: the service user's board in /dev/shm was full of
    earlier clusters' servers, so every worker paid the stalled primary's deadline itself."""
    _leftovers(boards.Board(board_path), monkeypatch)
    spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")], mode="process",
                board=board_path, connect_timeout=2, query_timeout=1)
    w = Workers(3, spec, "spawn")
    try:
        for i in range(3):
            assert w.ask(i, "write")["ok"]
        with stalled(db, "primary"):
            found = w.ask(0, "write")
            assert not found["ok"] and found["error"] == "QueryTimeout", found
            rest = [w.ask(i, "write") for i in (1, 2)]
            assert all(not r["ok"] for r in rest), rest
            assert all(r["seconds"] < 0.2 for r in rest), [r["seconds"] for r in rest]
    finally:
        w.close()


def _hold_write_lock(path: str, conn) -> None:
    b = boards.Board(path)
    assert boards._lock(b.fd, boards._WRITE_LOCK, fcntl.F_WRLCK)
    conn.send("held")
    time.sleep(120)  # as if stopped in the middle of a write


def test_a_write_lock_left_held_costs_one_wait_not_one_per_write(board_path):
    """A process stopped inside a board write (SIGSTOP, a frozen container) keeps the write
    lock. Every write elsewhere used to wait WRITE_WAIT for it and give up, so each request that
    had news to share paid 0.1 s. Now the first write waits; those of the next second try once;
    and once the holder is gone, writes go through again."""
    b = boards.Board(board_path)
    slot = b.slot_for("host=x port=1 dbname=d user=u")
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    holder = ctx.Process(target=_hold_write_lock, args=(board_path, theirs), daemon=True)
    holder.start()
    try:
        assert mine.poll(30) and mine.recv() == "held"
        waited = []
        for n in range(10):
            start = time.monotonic()
            b.write(slot, failures=n)
            waited.append(time.monotonic() - start >= boards.WRITE_WAIT)
        assert waited[0] and not any(waited[1:]), waited
        assert b.read(slot).failures == 0  # skipped, all of them: the lock is the holder's
    finally:
        holder.kill()
        holder.join(5)
    b.write(slot, failures=42)
    assert b.read(slot).failures == 42


def _exit_at_once() -> None:
    pass


def test_a_slot_left_mid_write_by_a_killed_process_is_monitored_again(db, board_path):
    """A process SIGKILLed inside a board write leaves the slot's sequence odd ("a write is in
    progress") for good: readers skipped the slot, and nobody took its monitor lease again, so
    no process on the host watched that server's lag or role any more (found by a red-team run;
    1 kill in 30 lands there). The slot is left here as such a kill leaves it: odd, and half of
    its fields new (a monitor lease that runs for ages, held by a pid that is gone). A worker
    takes it over within a monitor round or two, and what is read from it then is sane."""
    spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")], mode="process",
                board=board_path, max_lag=10)  # lag is watched: a monitor per server
    w = Workers(2, spec, "spawn")
    try:
        b = boards.Board(board_path)
        ident = pool.config.endpoint_config(db.dsn("replica1"), "replica", "r",
                                            pool.config.Options()).identity
        slot = b.slot_for(ident)
        pids = {proc.pid for proc in w.procs}
        replica = f"127.0.0.1:{db.port('replica1')}"

        def monitored(since: float) -> bool:
            for i in range(2):
                assert w.ask(i, "read")["ok"]
            entry = b.read(slot)
            return entry is not None and entry.lag_at > since and entry.monitor_pid in pids
        wait_until(lambda: monitored(0.0), timeout=10, interval=0.05, what="a monitor round")
        gone = multiprocessing.get_context("fork").Process(target=_exit_at_once)
        gone.start()
        gone.join(5)
        at = boards.HEADER_SIZE + slot.index * boards.SLOT_SIZE
        values = list(boards._SLOT.unpack_from(b.map, at))
        values[0] |= 1  # the killed writer's "write in progress", never ended
        values[boards._FIELDS.index("monitor_pid")] = gone.pid
        values[boards._FIELDS.index("monitor_until")] = boards.monotonic() + 1e6
        boards._SLOT.pack_into(b.map, at, *values)
        assert b.read(slot) is None  # half written: no reader takes it
        torn = boards.monotonic()
        took = wait_until(lambda: monitored(torn), timeout=2 * boards.MONITOR_LEASE + 2,
                          interval=0.05, what="a worker monitoring the server again")
        entry = b.read(slot)
        assert entry.monitor_until < boards.monotonic() + boards.MONITOR_LEASE + 1, took
        assert any(replica in w.ask(i, "monitoring")["value"] for i in range(2))
    finally:
        w.close()


def test_a_write_to_a_slot_left_mid_write_starts_it_over(board_path):
    """The next write to a slot a killed writer left half written (odd, a time that is not a
    number, a lease that never ends) keeps none of those torn fields."""
    b = boards.Board(board_path)
    slot = b.slot_for("host=x port=1 dbname=d user=u")
    b.write(slot, state=boards.UP, failures=3)
    at = boards.HEADER_SIZE + slot.index * boards.SLOT_SIZE
    values = list(boards._SLOT.unpack_from(b.map, at))
    values[0] |= 1
    values[boards._FIELDS.index("changed")] = float("nan")
    values[boards._FIELDS.index("monitor_until")] = boards.monotonic() + 1e6
    boards._SLOT.pack_into(b.map, at, *values)
    other = boards.Board(board_path)  # another process
    assert other.read(other.slot_for("host=x port=1 dbname=d user=u")) is None
    b.write(slot, state=boards.DOWN, error="down")
    entry = other.read(other.slot_for("host=x port=1 dbname=d user=u"))
    assert entry is not None and entry.seq > values[0] and entry.state == boards.DOWN
    assert entry.changed == 0.0 and entry.monitor_until == 0.0 and entry.failures == 0
    assert entry.error == "down"

def test_a_slot_left_mid_write_is_not_given_away_while_its_probe_lease_is_held(board_path):
    """A half-written slot counts as free for a newcomer only if nobody holds its probe lease:
    given away while held, the holder could never release the lease (its server's slot gone),
    and nobody could ever take the newcomer's (found by a red-team run)."""
    b = boards.Board(board_path)
    a = b.slot_for("host=a port=1 dbname=d user=u")
    b.write(a, state=boards.DOWN, error="down")
    assert b.try_lease(a, 1)
    at = boards.HEADER_SIZE + a.index * boards.SLOT_SIZE
    struct.pack_into("<Q", b.map, at, struct.unpack_from("<Q", b.map, at)[0] | 1)  # torn
    other = boards.Board(board_path)  # another process
    newcomer = other.slot_for("host=b port=1 dbname=d user=u")
    assert newcomer.index is not None and newcomer.index != a.index
    assert other.try_lease(newcomer, 2)
    b.release_lease(a, 1)
    assert not b._leases


def test_a_stale_down_entry_cannot_keep_an_endpoint_down(db, board_path):
    """A leftover file from crashed processes says the primary is down."""
    b = boards.Board(board_path)
    ident = pool.config.endpoint_config(db.dsn("primary"), "primary", "p", pool.config.Options()).identity
    slot = b.slot_for(ident)
    b.write(slot, state=boards.DOWN, error="down long ago", retry_at=boards.monotonic() + 3600)
    at = boards.HEADER_SIZE + slot.index * boards.SLOT_SIZE
    updated = struct.calcsize("<Q16sBBxxId")  # the slot's layout (board._SLOT) up to "updated"
    struct.pack_into("<d", b.map, at + updated, boards.monotonic() - 3600)  # an hour ago
    assert not b.read(slot).fresh(boards.monotonic())
    p = pool.Pool(db.dsn("primary"), mode="process", shared_state=board_path)
    try:
        assert p.stats()["endpoints"][0]["state"] == "up"
        assert p.fetchone("SELECT 1") == (1,)
        assert b.read(slot).state == boards.UP  # ...and the probe's result overwrote it
    finally:
        p.close()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other boot"])
def test_a_corrupt_board_is_rebuilt(db, board_path, damage, caplog):
    boards.Board(board_path)
    with open(board_path, "r+b") as f:
        if damage == "truncated":
            f.truncate(100)
        elif damage == "garbage":
            f.write(os.urandom(4096))
        else:
            f.seek(28)
            f.write(b"\x01" * 16)  # the boot id: monotonic times from another boot mean nothing
    boards.Board._open.clear()
    with caplog.at_level(logging.WARNING, logger="pool"):
        p = pool.Pool(db.dsn("primary"), mode="process", shared_state=board_path)
    try:
        assert any("rebuilding" in r.getMessage() for r in caplog.records)
        assert p.stats()["shared_state"] == board_path
        assert p.fetchone("SELECT 1") == (1,)
        assert os.path.getsize(board_path) == boards.FILE_SIZE
    finally:
        p.close()


def test_a_board_rebuilt_under_live_workers_kills_none_of_them(db, board_path, monkeypatch):
    """A process of another version of the library (another layout: here a smaller file) given
    the same path opens the board the workers have mapped, finds it is not its own, and
    rebuilds it. The rebuild truncated the file, and a worker that then touched a page past the
    new end died of SIGBUS (found by a red-team run). A rebuild is now made in place, never
    shorter; the workers go on, and share the board again once this version has rebuilt it."""
    spec = dict(primary=db.dsn("primary"), replicas=[db.dsn("replica1")], mode="process",
                board=board_path)
    w = Workers(2, spec, "spawn")
    fresh = None
    try:
        for i in range(2):
            assert w.ask(i, "write")["ok"]
        with monkeypatch.context() as m:  # the other version, in this process
            m.setattr(boards, "MAGIC", b"POOLBRD\x02")
            m.setattr(boards, "PROCS", 0)
            m.setattr(boards, "FILE_SIZE", boards.HEADER_SIZE + boards.SLOTS * boards.SLOT_SIZE)
            boards.Board(board_path)
        assert os.path.getsize(board_path) == boards.FILE_SIZE
        end = time.monotonic() + 2.5  # each worker publishes its summary once a second
        while time.monotonic() < end:
            for i in range(2):
                r = w.ask(i, "write")  # (a worker that died does not answer: EOFError)
                assert r["ok"], r
            time.sleep(0.05)
        assert all(proc.is_alive() for proc in w.procs)
        fresh = Workers(1, spec, "spawn")  # a worker of this version rebuilds the file for itself
        assert fresh.ask(0, "write")["ok"]
        pids = {fresh.procs[0].pid, *(proc.pid for proc in w.procs)}

        def shared() -> bool:
            for i in range(2):
                assert w.ask(i, "write")["ok"]
            return pids <= {x["pid"] for x in w.ask(0, "host")["value"]["workers"]}
        wait_until(shared, timeout=5, interval=0.1, what="the workers sharing the rebuilt board")
    finally:
        w.close()
        if fresh is not None:
            fresh.close()


def test_the_default_board_is_named_after_its_layout():
    """Two versions of the library with different layouts never map one default file."""
    assert boards.default_path("default").endswith(f"-default-v{boards.MAGIC[-1]}")


def test_a_board_that_cannot_be_created_means_per_process_state_and_one_warning(db, caplog):
    where = "/proc/pool-board-cannot-exist"
    with caplog.at_level(logging.WARNING, logger="pool"):
        p = pool.Pool(db.dsn("primary"), mode="process", shared_state=where)
    try:
        assert p.stats()["shared_state"] is None
        assert p.fetchone("SELECT 1") == (1,)
        warnings = [r for r in caplog.records if "no shared health board" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        p.close()


def test_the_board_file_is_private_and_holds_no_secret(db, board_path):
    p = pool.Pool(db.dsn("primary"), mode="process", shared_state=board_path)
    try:
        p.fetchone("SELECT 1")
        p.stats(scope="host")
        assert os.stat(board_path).st_mode & 0o777 == 0o600
        data = open(board_path, "rb").read()
        assert db.env["APP_PASSWORD"].encode() not in data
        assert b"password" not in data
    finally:
        p.close()
    os.chmod(board_path, 0o666)  # a file others may write is refused, not trusted
    boards.Board._open.clear()
    p = pool.Pool(db.dsn("primary"), mode="process", shared_state=board_path)
    try:
        assert p.stats()["shared_state"] is None
    finally:
        p.close()


def test_workers_that_do_not_monitor_the_primary_still_keep_tokens_off_a_diverged_replica(
        board_path):
    """A replica left ahead of a promoted one (lag.py): two process-mode workers share the
    board, and only one of them monitors the primary. The other judges the replicas from the
    positions on the board, so neither serves a read with the new primary's token from the
    diverged replica, and both take it out of reads."""
    with throwaway_cluster("pool-board-fork-", env={"APP_PASSWORD": APP_PASSWORD}) as c:
        # (timeout=1: less than the monitor lease, which the worker asked first cannot take
        # from the other, idle meanwhile; it asks every node itself: Pool._survey)
        spec = dict(nodes=[c.dsn(n) for n in NODES], mode="process", board=board_path,
                    max_lag=10, timeout=1)
        workers = Workers(2, spec, "spawn")
        p = pool.Pool(nodes=[c.dsn(n) for n in NODES], connect_timeout=1, timeout=2)
        try:
            for i in (0, 1):
                for _ in range(4):
                    assert workers.ask(i, "read")["ok"]
            row_id, token = fork_replica2(c, p)
            replica2 = f"127.0.0.1:{c.port('replica2')}"
            read = ("fetchone", "SELECT id FROM items WHERE id = %s", (row_id,),
                    dict(readonly=True, after=token))
            primary = f"127.0.0.1:{c.port('replica1')}"
            states: dict[int, set] = {0: set(), 1: set()}
            watchers = set()  # the workers seen monitoring the new primary
            end = time.monotonic() + 4
            while time.monotonic() < end:
                for i in (0, 1):
                    answer = workers.ask(i, read)
                    assert answer["ok"], answer
                    assert answer["value"][0] == (row_id,), (i, answer)  # never the diverged one
                    states[i] |= {e["state"] for e in workers.ask(i, "stats")["value"]["endpoints"]
                                  if e["name"] == replica2}
                    if primary in workers.ask(i, "monitoring")["value"]:
                        watchers.add(i)
                time.sleep(0.05)
            assert len(watchers) == 1, watchers  # the other one had only the board to go by
            assert states == {0: {"diverged"}, 1: {"diverged"}} or all(
                "diverged" in s for s in states.values()), states
        finally:
            p.close()
            workers.close()


def test_threaded_mode_shares_only_when_asked(db, tmp_path):
    p = pool.Pool(db.dsn("primary"), mode="threaded")
    try:
        assert p.stats()["shared_state"] is None
    finally:
        p.close()
    p = pool.Pool(db.dsn("primary"), mode="threaded", shared_state=str(tmp_path / "b"))
    try:
        assert p.stats()["shared_state"] == str(tmp_path / "b")
    finally:
        p.close()


def test_a_worker_that_monitors_a_replica_but_not_the_primary_still_enforces_max_lag(db, board_path):
    """One monitor per server per host: here one worker holds the primary's monitor lease and
    the other the only monitor of replica2 (their pools list different replicas, as two apps on
    one host may; or a restart moved one lease). The second measured replica2's lag against its
    own record of the primary's positions, which it never had: lag unknown, never lagging, and
    shared so with everyone. A replica paused for 8 s kept serving reads with max_lag=1 (found
    by a red-team run). The primary's positions on the board count now."""
    base = dict(primary=db.dsn("primary"), mode="process", board=board_path, max_lag=1,
                timeout=1, query_timeout=3)
    first = Workers(1, dict(base, replicas=[db.dsn("replica1")]), "spawn")
    second = None
    insert = ("fetchone", "INSERT INTO items (name) VALUES (%s) RETURNING id", ("lag",), {})
    replica2 = f"127.0.0.1:{db.port('replica2')}"
    primary = f"127.0.0.1:{db.port('primary')}"
    try:
        for _ in range(20):  # the first worker takes the primary's (and replica1's) lease
            assert first.ask(0, "write")["ok"] and first.ask(0, "read")["ok"]
            time.sleep(0.02)
        second = Workers(1, dict(base, replicas=[db.dsn("replica1"), db.dsn("replica2")]), "spawn")

        def tick():
            for w in (first, second):
                assert w.ask(0, insert)["ok"]
                assert w.ask(0, "read")["ok"]
            time.sleep(0.02)

        for _ in range(60):
            tick()
        assert primary in first.ask(0, "monitoring")["value"]
        assert second.ask(0, "monitoring")["value"] == [replica2]  # the case at hand
        admin_sql(db, "replica2", "SELECT pg_wal_replay_pause()")
        paused = time.monotonic()
        served_by_replica2 = []
        while time.monotonic() - paused < 6:
            tick()
            answer = second.ask(0, ("fetchone", "SELECT 1", None, dict(readonly=True)))
            assert answer["ok"], answer
            if answer["value"][1] == replica2:
                served_by_replica2.append(time.monotonic() - paused)
        state = {e["name"]: e for e in second.ask(0, "stats")["value"]["endpoints"]}[replica2]
        assert state["state"] == "lagging" and state["lag_s"] > 1, state
        assert not served_by_replica2 or served_by_replica2[-1] < 4.0, served_by_replica2[-5:]
    finally:
        admin_sql(db, "replica2", "SELECT pg_wal_replay_resume()")
        first.close()
        if second is not None:
            second.close()
