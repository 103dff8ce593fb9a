"""Replication lag against the real native topology, with replay paused
(``pg_wal_replay_pause()``): a lagging replica leaves read rotation and comes back, every replica
lagging has an explicit fallback, and a read with a write token never sees the past, in both
modes and across processes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import subprocess
import sys
import textwrap
import threading
import time
import types

import psycopg2
import pytest

import pool
from pool import lag, monitor
from pool.lag import LagTracker, format_lsn, format_token, parse_lsn, parse_token
from pgutil import admin_sql, node_of, stalled, timed, unique_name, wait_until

pytestmark = [pytest.mark.db, pytest.mark.timeout(120)]

INSERT = "INSERT INTO items (name) VALUES (%s) RETURNING id"
SELECT = "SELECT name FROM items WHERE id = %s"
READ = "SELECT inet_server_port()"


@contextlib.contextmanager
def paused(db, *replicas):
    """Replay paused on these replicas (they keep receiving WAL, and fall behind)."""
    for r in replicas:
        admin_sql(db, r, "SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        for r in replicas:
            admin_sql(db, r, "SELECT pg_wal_replay_resume()")


def endpoint(p, db, node):
    port = db.port(node)
    return next(e for e in p.stats()["endpoints"] if e["name"].endswith(f":{port}"))


def write_some(p, n=3):
    for _ in range(n):
        p.fetchone(INSERT, (unique_name("lag"),))


def test_a_lagging_replica_leaves_read_rotation_and_comes_back(make_pool, db):
    p = make_pool(max_lag=1.0)
    with paused(db, "replica1"):
        def lagging():
            write_some(p, 1)
            p.fetchone(READ, readonly=True)  # process mode measures on checkouts
            return endpoint(p, db, "replica1")["state"] == "lagging"
        wait_until(lagging, timeout=15, interval=0.1, what="replica1 lagging")
        ep = endpoint(p, db, "replica1")
        assert ep["lag_s"] >= 1.0 and ep["lag_bytes"] > 0  # (stats rounds to the millisecond)
        for _ in range(10):
            assert p.fetchone(READ, readonly=True) is not None
            assert node_of(db, p.last_endpoint) == "replica2"
        assert p.stats()["reads_to"] == "replicas"
    db.wait_replayed()

    def back():
        write_some(p, 1)
        p.fetchone(READ, readonly=True)
        return endpoint(p, db, "replica1")["state"] == "up"
    wait_until(back, timeout=10, interval=0.1, what="replica1 back in rotation")
    assert endpoint(p, db, "replica1")["lag_s"] == 0.0


@pytest.mark.parametrize("read_fallback", [True, False])
def test_when_every_replica_lags_reads_fall_back_explicitly(make_pool, db, read_fallback):
    p = make_pool(max_lag=1.0, read_fallback=read_fallback)
    with paused(db, "replica1", "replica2"):
        time.sleep(0.3)  # replica2 a little less behind than replica1
        def all_lag():
            write_some(p, 1)
            p.fetchone(READ, readonly=True)
            return all(endpoint(p, db, r)["state"] == "lagging" for r in ("replica1", "replica2"))
        wait_until(all_lag, timeout=15, interval=0.1, what="every replica lagging")
        served = {node_of(db, (p.fetchone(READ, readonly=True), p.last_endpoint)[1]) for _ in range(6)}
        reads_to = p.stats()["reads_to"]
        if read_fallback:
            assert served == {"primary"} and reads_to == "primary (every replica lags)"
        else:
            assert len(served) == 1 and served <= {"replica1", "replica2"}
            assert "least-lagging" in reads_to


def test_lag_is_zero_while_the_primary_is_idle(make_pool, db):
    """now() - pg_last_xact_replay_timestamp() grows while nothing is written; equal WAL
    positions mean no lag, however long ago the last write was."""
    p = make_pool(max_lag=1.0)
    write_some(p, 1)
    db.wait_replayed()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        p.fetchone(READ, readonly=True)
        time.sleep(0.1)
    for r in ("replica1", "replica2"):
        ep = endpoint(p, db, r)
        assert ep["state"] == "up" and ep["lag_s"] == 0.0 and ep["lag_bytes"] == 0


def test_a_read_with_a_write_token_sees_the_write(make_pool, db):
    """POST then GET: the GET used to go to a replica that had not replayed the write (404)."""
    p = make_pool()
    with paused(db, "replica1"):
        for _ in range(10):
            name = unique_name("ryw")
            (item_id,) = p.fetchone(INSERT, (name,))
            token = p.write_token()
            assert p.fetchone(SELECT, (item_id,), readonly=True, after=token) == (name,)
            assert node_of(db, p.last_endpoint) in ("replica2", "primary")
        with paused(db, "replica2"):  # nobody has it: the primary does
            name = unique_name("ryw")
            (item_id,) = p.fetchone(INSERT, (name,))
            token = p.write_token()
            assert p.fetchone(SELECT, (item_id,), readonly=True, after=token) == (name,)
            assert node_of(db, p.last_endpoint) == "primary"
            with p.connection(readonly=True, after=token) as conn:  # blocks too
                cur = conn.cursor()
                cur.execute(SELECT, (item_id,))
                assert cur.fetchone() == (name,)
    # Without the token the paused replica would have answered None:
    assert p.fetchone(SELECT, (item_id,), readonly=True, after=None) in ((name,), None)



def test_a_read_with_a_token_asks_the_other_replica_before_falling_back_to_the_primary(
        make_pool, db):
    """A fresh write is known on no replica, so the read asks one. It used to ask only the
    balanced choice, and when that was the lagging replica, waited AFTER_WAIT (100 ms) for it and
    then went to the primary: half the reads, each 100 ms late, while replica2 had the write
    within a millisecond. It now asks the other replica rather than wait on one that lags."""
    p = make_pool(max_lag=None)  # replica1 stays in rotation however far behind
    for _ in range(2):  # a connection idle on each replica: the read moves only to one of those
        p.fetchone(READ, readonly=True)
    served = []
    with paused(db, "replica1"):
        for _ in range(20):
            name = unique_name("ryw")
            (item_id,) = p.fetchone(INSERT, (name,))
            assert p.fetchone(SELECT, (item_id,), readonly=True, after=p.write_token()) == (name,)
            served.append(node_of(db, p.last_endpoint))
    assert "replica1" not in served
    assert served.count("primary") <= 3, served  # (replica2 replays in about a millisecond)



def test_a_read_with_a_token_asks_each_replica_once_not_round_and_round(make_pool, db):
    """Every replica behind: each is asked, the most advanced one is then asked again until
    AFTER_WAIT, and the primary serves. A handful of checkouts, not one per poll (a red-team
    run counted 19 for one read)."""
    p = make_pool(max_lag=None)
    for _ in range(2):
        p.fetchone(READ, readonly=True)
    with paused(db, "replica1", "replica2"):
        p.fetchone(INSERT, (unique_name("ryw"),))
        token = p.write_token()
        before = p.stats()["checkouts"]
        assert p.fetchone(READ, readonly=True, after=token) is not None
        assert node_of(db, p.last_endpoint) == "primary"
        assert p.stats()["checkouts"] - before <= 4  # replica, other replica, back, primary


def test_a_read_with_a_token_never_fails_for_a_replica_it_did_not_need(make_pool, db):
    """replica1 lags, replica2 is stalled with no connection open: the read must not connect
    to replica2 against the clock and fail with it (it once raised EndpointUnavailable, 'no
    replica is up', in 0.5 s); the primary has the write."""
    p = make_pool(max_lag=None, connect_timeout=0.5)  # a fresh pool's first read: replica1
    with paused(db, "replica1"), stalled(db, "replica2"):
        p.fetchone(INSERT, (unique_name("ryw"),))
        token = p.write_token()
        assert p.fetchone(READ, readonly=True, after=token) is not None
        assert node_of(db, p.last_endpoint) in ("primary", "replica1")


def test_a_read_with_a_token_keeps_its_timeout(pool_factory, db):
    """with connection(readonly=True, after=token, timeout=...): the block's own timeout, not
    the pool's, bounds the wait for a replica's connection (it once waited the pool's 3 s)."""
    p = pool_factory(mode="threaded", max_size=1, timeout=3.0)
    token = p.write_token()
    # (a new pool's first token reads go to the primary, until the monitor has compared the
    # replicas with it: lag.py)
    wait_until(lambda: node_of(db, (p.fetchone(READ, readonly=True, after=token),
                                    p.last_endpoint)[1]) != "primary", timeout=3,
               what="a token read served by a replica")
    held = [p.connection(readonly=True) for _ in range(2)]
    for loan in held:
        loan.__enter__()
    try:
        elapsed, _, exc = timed(lambda: p.connection(readonly=True, after=token,
                                                     timeout=0.2).__enter__())
    finally:
        for loan in held:
            loan.__exit__(None, None, None)
    assert isinstance(exc, pool.PoolTimeout), exc
    assert elapsed < 2.0, elapsed


def test_a_read_with_a_token_and_no_read_fallback_waits_for_a_replica_never_the_primary(
        make_pool, db):
    """read_fallback=False: reads never reach the primary, a read after a token included (it
    once fell back to the primary after AFTER_WAIT). It waits for a replica to replay the
    write, up to the pool's timeout, and says so if none does."""
    p = make_pool(max_lag=None, read_fallback=False, timeout=1.0)
    with paused(db, "replica1", "replica2"):
        name = unique_name("ryw")
        (item_id,) = p.fetchone(INSERT, (name,))
        token = p.write_token()
        elapsed, _, exc = timed(lambda: p.fetchone(SELECT, (item_id,), readonly=True, after=token))
        assert isinstance(exc, pool.PoolTimeout) and "read_fallback" in str(exc), exc
        assert 0.9 < elapsed < 5, elapsed

        def resume_soon():
            time.sleep(0.3)
            admin_sql(db, "replica2", "SELECT pg_wal_replay_resume()")
        threading.Thread(target=resume_soon).start()
        assert p.fetchone(SELECT, (item_id,), readonly=True, after=token) == (name,)
        assert node_of(db, p.last_endpoint) == "replica2"


def test_a_read_with_a_token_and_no_read_fallback_asks_every_replica_again_while_it_waits(
        make_pool, db):
    """read_fallback=False, replica2 a little behind (its replay paused for a moment), replica1
    stuck further ahead: the read once settled on replica1, the most advanced when asked, and
    timed out while replica2 had the write. The replicas are asked again while it waits."""
    p = make_pool(max_lag=None, read_fallback=False, timeout=3.0)
    for _ in range(2):
        p.fetchone(READ, readonly=True)
    with paused(db, "replica2"):
        p.fetchone(INSERT, (unique_name("ryw"),))
        time.sleep(0.2)
        with paused(db, "replica1"):
            name = unique_name("ryw")
            (item_id,) = p.fetchone(INSERT, (name,))
            token = p.write_token()
            threading.Timer(0.3, admin_sql, (db, "replica2", "SELECT pg_wal_replay_resume()")).start()
            elapsed, row, exc = timed(lambda: p.fetchone(SELECT, (item_id,), readonly=True,
                                                         after=token))
            assert exc is None and row == (name,), exc
            assert node_of(db, p.last_endpoint) == "replica2"
            assert elapsed < 2.0, elapsed


def test_a_read_with_a_token_asks_the_other_idle_replica_even_with_no_time_to_wait(make_pool,
                                                                                   db):
    """timeout=0 means no waiting for a connection; asking a replica that has one idle takes
    none, so a read whose first choice lags is still served by the other (half of them once
    raised PoolTimeout, 'within 0.00s')."""
    p = make_pool(max_lag=None, read_fallback=False)
    for _ in range(2):
        p.fetchone(READ, readonly=True)
    served = []
    with paused(db, "replica1"):
        for _ in range(6):
            p.fetchone(INSERT, (unique_name("ryw"),))
            token = p.write_token()
            db.wait_replayed(timeout=10, nodes=["replica2"])  # (a fixed 20 ms was not always)
            with p.connection(readonly=True, after=token, timeout=0):
                served.append(node_of(db, p.last_endpoint))
    assert served == ["replica2"] * 6


def test_a_read_with_a_token_waits_at_most_its_timeout_in_all(pool_factory, db):
    """Every checkout a read after a token makes (its first replica, a move, the primary) gets
    what is left of one timeout, not a whole one each: a read that waited for a replica's
    connection, found it behind, then waited for the primary's, once took 0.85 s and could take
    three times its timeout."""
    p = pool_factory(mode="threaded", max_size=1, max_lag=None, timeout=0.5)
    for _ in range(2):
        p.fetchone(READ, readonly=True)
    with paused(db, "replica1", "replica2"):
        p.fetchone(INSERT, (unique_name("ryw"),))
        token = p.write_token()

        def hold(readonly, seconds):
            with p.connection(readonly=readonly, timeout=5):
                time.sleep(seconds)
        holders = [threading.Thread(target=hold, args=a)
                   for a in ((True, 0.4), (True, 0.4), (False, 3.0))]
        for t in holders:
            t.start()
        time.sleep(0.05)
        elapsed, _, exc = timed(lambda: p.connection(readonly=True, after=token,
                                                     timeout=0.5).__enter__())
        for t in holders:
            t.join()
    assert isinstance(exc, pool.PoolTimeout), exc  # the primary stayed busy
    assert elapsed < 0.9, elapsed  # 0.5 s and the 0.1 s of asking, not 0.5 s more


def _hold_a_connection_on(p, db, node, held, stop):
    """Borrow (for reading) until the loan lands on ``node``, and keep it until ``stop``."""
    while True:
        with p.connection(readonly=True):
            if node_of(db, p.last_endpoint) == node:
                held.set()
                stop.wait()
                return


def test_a_read_with_a_token_is_not_held_to_a_replica_known_to_have_it_that_is_full(make_pool,
                                                                                    db):
    """replica2 is known to have the write but its one connection is lent: the read once waited
    for it alone (PoolTimeout, at once in process mode, though the primary was idle). A replica
    known to have the write is a preference; without room there, the read goes on as usual."""
    p = make_pool(max_lag=None, max_size=1, timeout=0.5)
    with paused(db, "replica1"):
        (item_id,) = p.fetchone(INSERT, (unique_name("ryw"),))
        token = p.write_token()
        for _ in range(2):  # asking replica2 makes its position known
            assert p.fetchone(SELECT, (item_id,), readonly=True, after=token) is not None
        while True:  # replica2's only connection, lent (in this thread: process mode too)
            with p.connection(readonly=True):
                if node_of(db, p.last_endpoint) != "replica2":
                    continue
                assert p.fetchone(SELECT, (item_id,), readonly=True, after=token) is not None
                assert node_of(db, p.last_endpoint) == "primary"  # replica1 lags, replica2 is full
                break


def test_a_read_with_a_token_and_no_read_fallback_outlives_the_replica_it_was_asking(make_pool,
                                                                                     db):
    """read_fallback=False: the replica being asked is killed; the read once raised PoolTimeout
    then, with most of its timeout left. It asks the others until one has the write."""
    p = make_pool(max_lag=None, read_fallback=False, timeout=5.0, query_timeout=2.0)
    for _ in range(2):
        p.fetchone(READ, readonly=True)
    with paused(db, "replica2"):
        p.fetchone(INSERT, (unique_name("ryw"),))
        db.wait_replayed(nodes=["replica1"])  # replica1 ahead: the one the read stays with
        admin_sql(db, "replica1", "SELECT pg_wal_replay_pause()")
        name = unique_name("ryw")
        (item_id,) = p.fetchone(INSERT, (name,))
        token = p.write_token()
        threading.Timer(0.6, db.kill, ("replica1",)).start()
        threading.Timer(1.0, admin_sql, (db, "replica2", "SELECT pg_wal_replay_resume()")).start()
        elapsed, row, exc = timed(lambda: p.fetchone(SELECT, (item_id,), readonly=True,
                                                     after=token))
    assert exc is None and row == (name,), exc
    assert node_of(db, p.last_endpoint) == "replica2"


def test_a_read_with_a_token_and_no_read_fallback_waits_for_a_busy_replica(pool_factory, db):
    """read_fallback=False: replica1 lags, replica2's one connection is lent for a second. With
    no primary to go to, the read waits for replica2 (it once never asked it: no idle
    connection there) and is served when it is free."""
    p = pool_factory(mode="threaded", max_lag=None, read_fallback=False, max_size=1, timeout=3.0)
    with paused(db, "replica1"):
        name = unique_name("ryw")
        (item_id,) = p.fetchone(INSERT, (name,))
        token = p.write_token()
        held, stop = threading.Event(), threading.Event()
        holder = threading.Thread(target=_hold_a_connection_on,
                                  args=(p, db, "replica2", held, stop))
        holder.start()
        assert held.wait(5)
        threading.Timer(1.0, stop.set).start()
        elapsed, row, exc = timed(lambda: p.fetchone(SELECT, (item_id,), readonly=True,
                                                     after=token))
        holder.join()
    assert exc is None and row == (name,), exc
    assert node_of(db, p.last_endpoint) == "replica2"

def test_a_read_with_a_token_works_whatever_cursor_factory_configure_set(make_pool, db):
    """The pool reads the primary's WAL position (the token) and a replica's replay position
    whatever rows configure()'s cursor_factory makes: with a dict cursor both once raised
    KeyError (row[0])."""
    import psycopg2.extras

    def configure(conn):
        conn.cursor_factory = psycopg2.extras.RealDictCursor

    p = make_pool(configure=configure)
    name = unique_name("ryw")
    (item_id,) = p.fetchone(INSERT, (name,)).values()
    row = p.fetchone(SELECT, (item_id,), readonly=True, after=p.write_token())
    assert dict(row) == {"name": name}

def test_a_write_with_a_token_goes_to_the_primary(make_pool, db):
    """after= is about reads; on a write it changes nothing (the primary has every write). It
    once sent the write to a replica, which refused it."""
    p = make_pool()
    token = p.write_token()
    assert p.fetchone(INSERT, (unique_name(),), after=token) is not None
    assert node_of(db, p.last_endpoint) == "primary"
    assert p.fetchall(INSERT, (unique_name(),), after=token)
    assert node_of(db, p.last_endpoint) == "primary"


def test_a_token_from_one_process_is_honoured_in_another(make_pool, db):
    p = make_pool()
    name = unique_name("ryw-x")
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(sys.path[0])!r})
        import pool
        p = pool.Pool({db.dsn("primary")!r}, mode="process")
        (item_id,) = p.fetchone("INSERT INTO items (name) VALUES (%s) RETURNING id", ({name!r},))
        print(item_id, p.write_token())
    """)
    with paused(db, "replica1", "replica2"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=60, cwd=str(pool.__path__[0]) + "/..")
        assert out.returncode == 0, out.stderr
        item_id, token = out.stdout.split()
        assert len(token) < 20  # fits a header or a cookie
        assert p.fetchone(SELECT, (int(item_id),), readonly=True, after=token) == (name,)


def test_a_read_with_a_token_is_served_by_a_replica_while_the_primary_is_down(make_pool, db):
    """With no primary up nothing can be compared with it (lag.py): a pool started during the
    outage still serves reads with a token from the replicas that have its writes (they are of
    its history; a token from a newer one waits for the pool to find that primary)."""
    writer = make_pool()
    name = unique_name("ryw-down")
    (item_id,) = writer.fetchone(INSERT, (name,))
    token = writer.write_token()
    db.wait_replayed()
    db.kill("primary")
    p = make_pool(connect_timeout=0.5)  # a worker started meanwhile: it never saw the primary up
    assert p.fetchone(SELECT, (item_id,), readonly=True, after=token) == (name,)
    assert node_of(db, p.last_endpoint) != "primary"


def test_a_bad_token_is_a_value_error_that_does_not_echo_it(make_pool):
    p = make_pool()
    with pytest.raises(ValueError) as info:
        p.fetchone("SELECT 1", readonly=True, after="'; DROP TABLE items; --")
    assert "DROP" not in str(info.value)


@pytest.mark.parametrize("form", ["declared", "candidates"])
def test_a_token_from_a_timeline_no_server_has_is_a_value_error_at_once(pool_factory, db, mode,
                                                                        form):
    """A token from a newer timeline than the primary's makes the pool look for the promotion
    it has not seen, within the timeout. When every node answers and none is on that timeline,
    there is none to find: a forged token (or one from another cluster) held a worker for its
    whole timeout, then read as an outage (a new user's trial: 40 such requests made an
    ordinary one wait 9 s). Now it is the caller's bad token, within a survey's time."""
    if form == "candidates":
        p = pool.Pool(nodes=[db.dsn(n) for n in ("primary", "replica1", "replica2")], mode=mode,
                      timeout=3)
    else:
        p = pool_factory(mode=mode, timeout=3)
    token = p.write_token()
    assert p.fetchone(READ, readonly=True, after=token) is not None
    timeline = int(token.split(":")[0], 16)
    for forged in (f"{timeline + 1:X}:0/1", "999:0/1"):
        for _ in range(3):  # (the next ones within the surveys' throttle too)
            seconds, _, error = timed(lambda: p.fetchone(READ, readonly=True, after=forged))
            assert isinstance(error, ValueError) and "no server" in str(error), error
            assert seconds < 1.0, seconds
    assert p.fetchone(READ, readonly=True, after=token) is not None
    if form == "candidates":
        p.close()


def test_healthy_replicas_under_a_stream_of_writes_are_never_taken_for_diverged(
        make_pool, db, monkeypatch, caplog):
    """A replica is flagged diverged (lag.py) when its answer is above an answer the primary
    gave later. Under a stream of writes a healthy replica keeps replaying WAL that the primary
    wrote after its last answer, so any slip in ordering the samples (an answer timed before it
    was read, the primary's question timed after it was sent) flags a healthy one. The monitor
    asks every 20 ms here instead of every second, and the primary takes 50 ms to answer (a
    loaded primary): the replicas answer two or three times while one of its questions is out,
    with WAL it wrote after it took its position. About a hundred comparisons; none may flag."""
    monkeypatch.setattr(monitor, "MONITOR_INTERVAL", 0.02)
    for name in ("STATUS_SQL", "FLOOR_SQL"):  # (the monitor asks the latter)
        monkeypatch.setattr(monitor, name, (
            f"WITH s AS MATERIALIZED ({getattr(monitor, name)}), z AS MATERIALIZED (SELECT "
            f"pg_sleep(CASE WHEN pg_is_in_recovery() THEN 0 ELSE 0.05 END) FROM s) "
            f"SELECT s.* FROM s, z"))
    compared = []
    real_check = lag.check_diverged

    def check(p, primary, asked, lsn):
        compared.extend(r for r in p._endpoints if r.role == "replica" and r.answers
                        and r.answers[0][0] < asked)
        return real_check(p, primary, asked, lsn)

    monkeypatch.setattr(lag, "check_diverged", check)
    admin_sql(db, "primary", "CREATE TABLE IF NOT EXISTS write_stream (x int)")
    stop = threading.Event()

    def writer() -> None:
        conn = psycopg2.connect(db.dsn("primary", user="postgres"))
        conn.autocommit = True
        with conn, conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("INSERT INTO write_stream SELECT generate_series(1, 20)")
        conn.close()

    p = make_pool()
    writers = [threading.Thread(target=writer) for _ in range(3)]
    for t in writers:
        t.start()
    seen = set()
    try:
        with caplog.at_level(logging.WARNING, logger="pool"):
            end = time.monotonic() + 4
            while time.monotonic() < end:
                p.fetchone(READ, readonly=True)  # (process mode: the monitors advance on requests)
                seen |= {e["state"] for e in p.stats()["endpoints"]}
                time.sleep(0.002)
    finally:
        stop.set()
        for t in writers:
            t.join()
        admin_sql(db, "primary", "DROP TABLE write_stream")
    assert len(compared) > 60, len(compared)  # the check really ran, again and again
    assert "diverged" not in seen
    assert not [r.getMessage() for r in caplog.records if "primary's history" in r.getMessage()]
    name = unique_name("fp")
    (item,) = p.fetchone(INSERT, (name,))
    token = p.write_token()
    # Replayed there (after the stream, a loaded machine's replicas may take longer than a
    # token read waits, lag.AFTER_WAIT): what is left to decide is whether they are judged
    db.wait_replayed(timeout=10)
    assert p.fetchone(SELECT, (item,), readonly=True, after=token) == (name,)
    assert node_of(db, p.last_endpoint) != "primary"  # judged: tokens count on the replicas


# -- the measure itself, without a server ------------------------------------------------------

def test_lag_tracker_measures_time_since_the_primary_had_what_the_replica_lacks():
    t = LagTracker()
    t.primary_at(100.0, 1000)
    t.primary_at(101.0, 1000)  # idle: the first sample at a position is the one that counts
    t.primary_at(102.0, 2000)
    t.primary_at(103.0, 3000)
    assert t.lag(103.0, 3000) == (0.0, 0)
    assert t.lag(103.0, 1000) == (1.0, 2000)  # missing WAL the primary had at 102
    assert t.lag(107.0, 1500) == (5.0, 1500)
    assert t.lag(200.0, 3000) == (None, None)  # no word from the primary for long: unknown


def _node(name, role="replica", timeline=None):
    return types.SimpleNamespace(name=name, role=role, state="up", timeline=timeline,
                                 answers=collections.deque(maxlen=8), answers_since=0.0,
                                 floor=None, diverged=False, judged=False, monitor_at=float("inf"),
                                 status_at=0.0)


def _cluster(*replicas):
    """A primary on timeline 2 and these replicas, as lag.py sees them (no server needed)."""
    primary = _node("p", role="primary", timeline=2)
    woken = []
    pool = types.SimpleNamespace(_endpoints=[primary, *replicas], _primary=primary,
                                 _judgements=0, _fast_until=0.0,
                                 _hurry_housekeeper=lambda: woken.append(1))
    return pool, primary, woken


def test_a_replica_is_judged_only_on_evidence_from_before_the_primary_was_asked():
    r = _node("r1")
    pool, primary, _ = _cluster(r)
    lag.replica_answered(r, 9.9, 10.0, 5000, None)
    assert lag.check_diverged(pool, primary, 10.0, 6000) == []  # read as it was asked: nothing
    assert not r.judged
    lag.replica_answered(r, 10.4, 10.5, 5500, None)  # it received more: it streams
    lag.replica_answered(r, 10.7, 10.8, 9000, None)  # (read after the question below)
    lag.check_diverged(pool, primary, 10.6, 7000)
    assert r.judged and not r.diverged
    said = lag.check_diverged(pool, primary, 11.0, 8000)  # its 9000 (at 10.8) is past 8000
    assert r.diverged and not r.judged and said[0][0] == logging.WARNING
    assert "0/2328" in said[0][1] % said[0][2:]  # what it holds, 9000


def test_a_replica_stuck_behind_or_diverged_counts_only_once_it_shows_it_follows_the_primary():
    """Left behind by a failover by less than the new primary has written, or by exactly as
    much (both idle at a segment boundary): positions cannot tell it from a healthy one, but a
    healthy one streams. Diverged: out until its control file says it is on the primary's
    timeline (rewound, rebuilt); streaming more of the old WAL (from an old primary back
    unfenced) is not that."""
    stuck, ahead, idle = _node("stuck"), _node("ahead"), _node("idle")
    pool, primary, _ = _cluster(stuck, ahead, idle)
    for t in (1.0, 2.0):
        lag.replica_answered(stuck, t, t + 0.1, 7000, 1)
        lag.replica_answered(idle, t, t + 0.1, 9000, 1)
    lag.replica_answered(ahead, 1.0, 1.1, 9500, 1)
    lag.check_diverged(pool, primary, 3.0, 9000)
    assert not stuck.judged and not stuck.diverged  # behind, not moving
    assert not idle.judged and not idle.diverged  # at the primary's very position, not moving
    assert ahead.diverged and not ahead.judged
    lag.replica_answered(ahead, 3.1, 3.2, 9900, 1)  # more old WAL: still timeline 1
    lag.replica_answered(idle, 3.1, 3.2, 9800, 1)  # the primary wrote: it follows
    lag.check_diverged(pool, primary, 4.0, 12000)
    assert ahead.diverged and not ahead.judged and idle.judged and not stuck.judged
    lag.replica_answered(ahead, 4.1, 4.2, 11000, 2)  # rewound: on timeline 2 now
    said = lag.check_diverged(pool, primary, 5.0, 12000)
    assert not ahead.diverged and ahead.judged and said[0][0] == logging.INFO
    old = _node("old", role="candidate")
    old.state, old.status_at = "conflict", time.monotonic()  # another primary, answering
    pool._endpoints.append(old)
    lag.replica_answered(idle, 5.1, 5.2, 12000, 1)
    lag.check_diverged(pool, primary, 6.0, 13000)
    assert not idle.judged and ahead.judged  # positions are no evidence then; the floor is
    old.status_at -= lag.CONFLICT_LIVE + 1  # ...until that node has not answered for a while
    lag.check_diverged(pool, primary, 7.0, 13000)
    assert idle.judged
    for t in range(8, 20):  # the primary idle: every answer the same, for longer than kept
        lag.replica_answered(idle, t + 0.1, t + 0.2, 13000, 1)
        lag.check_diverged(pool, primary, t + 1.0, 13000)
    assert idle.judged  # seen to follow this primary: it still does


def test_a_new_primary_judges_the_replicas_only_on_what_they_answer_after_it_was_seen():
    """Before the promotion a replica's answers say nothing of whether it went on with the old
    primary's WAL after it: a judgement on one of them would be a false all-clear."""
    r = _node("r1")
    pool, primary, woken = _cluster(r)
    now = time.monotonic()
    lag.replica_answered(r, now - 1.2, now - 1.1, 5000, None)
    lag.replica_answered(r, now - 1.0, now - 0.9, 6000, None)
    lag.check_diverged(pool, primary, now - 0.5, 6000)
    assert r.judged
    lag.forget_judgements(pool)
    now = time.monotonic()
    assert not r.judged and not r.answers and pool._judgements == 1 and woken
    assert pool._fast_until > now  # every node asked often for a while
    assert r.monitor_at <= now < primary.monitor_at <= now + lag.RECHECK  # replicas asked first
    lag.replica_answered(r, now - 0.5, now + 0.2, 6500, None)  # asked before it was seen: ignored
    lag.replica_answered(r, now + 0.3, now + 0.4, 6000, None)
    lag.check_diverged(pool, primary, now + 1, 7000)
    assert not r.judged  # (one answer since: no sign yet that it streams)
    lag.replica_answered(r, now + 1.1, now + 1.2, 7000, None)
    lag.check_diverged(pool, primary, now + 2, 7000)
    assert r.judged


def test_tokens_round_trip_and_reject_garbage():
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert parse_token("2:0/3000148") == (0x3000148, 2) and parse_token(None) is None
    assert parse_token("1A:0/3000148") == (0x3000148, 0x1A)  # hex, as in WAL file names
    assert parse_token("0/3000148") == (0x3000148, None)  # a token from before timelines
    assert format_token(0x3000148, 0x1A) == "1A:0/3000148" and format_token(5, None) == "0/5"
    for bad in ("0/", "x/1", "1/2/3", "0/123456789", 42, "2:", ":0/1", "x:0/1", "1:2:0/1",
                "123456789:0/1", "2 :0/1"):
        with pytest.raises(ValueError):
            parse_token(bad)
