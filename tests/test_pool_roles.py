"""Every node a candidate: the pool finds the primary, follows a promotion, never writes to two
primaries, and treats a node that refuses writes as demoted. Against real servers.

Promotions change a cluster for good, so those tests get a throwaway primary and two replicas of
their own (about two seconds to start); the rest use the session's cluster and undo what they do.
"""

from __future__ import annotations

import logging
import time

import psycopg2
import pytest

import pool
from pool import health
from pool.endpoint import PROBE_GRACE_MAX
from conftest import APP_PASSWORD, heal
from native.cluster import NODES, Cluster
from pgutil import (admin_sql, fork_replica2, node_of, throwaway_cluster, timed, unique_name,
                    wait_until)

pytestmark = [pytest.mark.db, pytest.mark.timeout(180)]

READ = "SELECT inet_server_port()"
INSERT = "INSERT INTO items (name) VALUES (%s) RETURNING id"
SELECT_ID = "SELECT id FROM items WHERE id = %s"


@pytest.fixture
def fresh():
    """A cluster of its own, destroyed afterwards: promotion is one-way."""
    with throwaway_cluster("pool-roles-", env={"APP_PASSWORD": APP_PASSWORD}) as c:
        yield c


def candidates(c: Cluster, **kwargs) -> pool.Pool:
    kwargs.setdefault("connect_timeout", 1)
    kwargs.setdefault("query_timeout", 3)
    kwargs.setdefault("timeout", 2)
    return pool.Pool([c.dsn(n) for n in NODES], **kwargs)


def warmed(c: Cluster, mode: str) -> pool.Pool:
    """A candidate pool that has read from both replicas (an idle session on each)."""
    p = candidates(c, mode=mode)
    for _ in range(4):
        p.fetchone(READ, readonly=True)
    return p


def assert_replica2_stays_out(c: Cluster, p: pool.Pool, row_id: int, token: str) -> None:
    """For 3 s, while the monitor compares the nodes again and again: reads with the token see
    the row and never come from replica2, nor do plain reads; replica2 stays diverged."""
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert p.fetchone(SELECT_ID, (row_id,), readonly=True, after=token) == (row_id,)
        assert node_of(c, p.last_endpoint) != "replica2"
        assert node_of(c, (p.fetchone(READ, readonly=True), p.last_endpoint)[1]) != "replica2"
        time.sleep(0.02)
    assert states(p)[f"127.0.0.1:{c.port('replica2')}"] == ("replica", "diverged")


def states(p) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["role"], e["state"]) for e in p.stats()["endpoints"]}


def test_the_candidate_form_finds_the_primary_and_reads_from_the_others(db, mode):
    p = candidates(db, mode=mode)
    try:
        assert p.stats()["primary"] == f"127.0.0.1:{db.port('primary')}"
        assert p.stats()["roles"] == "discovered"
        assert p.fetchone("SELECT pg_is_in_recovery()") == (False,)
        assert node_of(db, p.last_endpoint) == "primary"
        served = {node_of(db, (p.fetchone(READ, readonly=True), p.last_endpoint)[1]) for _ in range(6)}
        assert served == {"replica1", "replica2"}
    finally:
        p.close()


def test_the_pool_follows_a_promotion_without_a_failed_read(fresh, mode):
    """Kill the primary, promote replica1: writes come back on replica1 by themselves, with no
    restart and no configuration change, and no read fails meanwhile."""
    c = fresh
    p = candidates(c, mode=mode)
    try:
        assert p.fetchone(INSERT, (unique_name(),)) is not None
        for _ in range(4):
            p.fetchone(READ, readonly=True)
        c.kill("primary")
        failed_reads, first_write = [], None
        promoted_at = None
        start = time.monotonic()
        while time.monotonic() - start < 20:
            seconds, _, error = timed(lambda: p.fetchone(READ, readonly=True))
            if error is not None:
                failed_reads.append(error)
            if promoted_at is None and time.monotonic() - start > 1.0:
                admin_sql(c, "replica1", "SELECT pg_promote()")  # waits until it is done
                promoted_at = time.monotonic()
            if promoted_at is not None:
                _, row, error = timed(lambda: p.fetchone(INSERT, (unique_name(),)))
                if error is None:
                    first_write = time.monotonic() - promoted_at
                    break
            time.sleep(0.02)
        assert not failed_reads, failed_reads[:3]
        assert first_write is not None, "writes never came back after the promotion"
        assert first_write < 5.0  # the target (2 s) is measured by the load test
        assert node_of(c, p.last_endpoint) == "replica1"
        assert p.stats()["primary"] == f"127.0.0.1:{c.port('replica1')}"
        assert states(p)[f"127.0.0.1:{c.port('replica1')}"] == ("primary", "up")
        for _ in range(6):  # reads still work (replica2, or the new primary)
            assert p.fetchone(READ, readonly=True) is not None
    finally:
        p.close()


def test_an_old_primary_back_before_it_was_fenced_is_a_conflict_never_written(fresh, mode, caplog):
    """Two candidates claim to be primary: writes go only to the newest timeline."""
    c = fresh
    p = candidates(c, mode=mode)
    try:
        c.kill("primary")
        admin_sql(c, "replica1", "SELECT pg_promote()")
        wait_until(lambda: timed(lambda: p.fetchone(INSERT, (unique_name(),)))[2] is None,
                   timeout=10, interval=0.05, what="writes on the new primary")
        with caplog.at_level(logging.WARNING, logger="pool"):
            c.start_node("primary")  # timeline 1, still a primary: nobody fenced it
            old = f"127.0.0.1:{c.port('primary')}"
            wait_until(lambda: (p.fetchone(READ, readonly=True), states(p)[old][1] == "conflict")[1],
                       timeout=15, interval=0.1, what="the old primary reported as a conflict")
        for _ in range(10):
            assert p.fetchone(INSERT, (unique_name(),)) is not None
            assert node_of(c, p.last_endpoint) == "replica1"
            assert node_of(c, (p.fetchone(READ, readonly=True), p.last_endpoint)[1]) != "primary"
        assert any("two primaries" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records)
        ep = next(e for e in p.stats()["endpoints"] if e["name"] == old)
        assert ep["timeline"] == 1 and p.stats()["endpoints"][1]["timeline"] == 2
    finally:
        p.close()


@pytest.fixture
def read_only_primary(db):
    """The primary starts refusing writes (as a demoted node would), and is set right after."""
    def set_(on: bool) -> None:
        admin_sql(db, "primary", "ALTER SYSTEM SET default_transaction_read_only = %s" % ("on" if on else "off"))
        admin_sql(db, "primary", "SELECT pg_reload_conf()")
        time.sleep(0.3)  # every backend rereads the configuration at its next command
    yield set_
    admin_sql(db, "primary", "ALTER SYSTEM RESET default_transaction_read_only")
    admin_sql(db, "primary", "SELECT pg_reload_conf()")


@pytest.mark.parametrize("form", ["declared", "candidates"])
def test_a_primary_that_refuses_writes_is_treated_as_demoted(db, mode, form, read_only_primary):
    """SQLSTATE 25006 (read_only_sql_transaction) on a write: the node was demoted. It leaves
    write rotation at once (writes fail fast, reads go on) and is taken back once it writes."""
    p = candidates(db, mode=mode) if form == "candidates" else pool.Pool(
        db.dsn("primary"), replicas=[db.dsn("replica1"), db.dsn("replica2")], mode=mode,
        connect_timeout=1)
    try:
        assert p.fetchone(INSERT, (unique_name(),)) is not None
        read_only_primary(True)
        # Declared roles learn of the demotion from the write that fails; candidates have a
        # monitor that may see it first (during read_only_primary's 0.3 s), and then the write
        # is refused before it is sent.
        expected = (psycopg2.errors.ReadOnlySqlTransaction,) if form == "declared" else (
            psycopg2.errors.ReadOnlySqlTransaction, pool.EndpointUnavailable)
        with pytest.raises(expected):
            p.fetchone(INSERT, (unique_name(),))
        for _ in range(3):
            seconds, _, error = timed(lambda: p.fetchone(INSERT, (unique_name(),)))
            assert isinstance(error, (pool.EndpointUnavailable, psycopg2.errors.ReadOnlySqlTransaction)), error
        seconds, _, error = timed(lambda: p.fetchone(INSERT, (unique_name(),)))
        assert isinstance(error, pool.EndpointUnavailable) and seconds < 0.5, error
        assert p.fetchone(READ, readonly=True) is not None
        read_only_primary(False)
        wait_until(lambda: timed(lambda: p.fetchone(INSERT, (unique_name(),)))[2] is None,
                   timeout=10, interval=0.1, what="writes after the node writes again")
    finally:
        p.close()


@pytest.mark.parametrize("how", ["set_session", "sql_in_block", "session_sql_in_a_helper"])
def test_a_borrowers_own_read_only_transaction_does_not_eject_the_primary(db, mode, how, caplog):
    """SQLSTATE 25006 on a write can be the borrower's doing (a read-only transaction it asked
    for), not a demotion: the primary stays up for everyone, its other sessions stay open, and
    only the session that refused is replaced (a session-level SET may be why it refused). It
    was ejected as demoted: under a stream of such loans, 31 ejections and 222 connects in 3 s."""
    p = pool.Pool(db.dsn("primary"), replicas=[db.dsn("replica1"), db.dsn("replica2")],
                  mode=mode, connect_timeout=1)
    try:
        with p.connection() as a, p.connection() as b:  # two idle sessions on the primary
            a.cursor().execute("SELECT 1")
            b.cursor().execute("SELECT 1")
        before = p.stats()["endpoints"][0]
        caplog.set_level(logging.INFO, logger="pool")
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            if how == "session_sql_in_a_helper":  # (helpers leave the session as it is)
                p.execute("SET default_transaction_read_only = on")
                p.fetchone(INSERT, (unique_name(),))
            else:
                with p.connection() as conn:
                    if how == "set_session":
                        conn.set_session(readonly=True)
                    else:
                        conn.cursor().execute("SET TRANSACTION READ ONLY")
                    conn.cursor().execute(INSERT, (unique_name(),))
        primary = p.stats()["endpoints"][0]
        assert primary["state"] == "up", primary
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        for _ in range(4):  # on the session kept, then on the one in its place
            assert p.fetchone(INSERT, (unique_name(),)) is not None
            with p.connection() as conn:
                cur = conn.cursor()
                cur.execute(INSERT, (unique_name(),))
        after = p.stats()["endpoints"][0]
        assert after["discards"] == before["discards"] + 1  # the one that refused, and no other
        assert after["connects"] <= before["connects"] + 1
    finally:
        p.close()


def test_candidates_with_no_primary_up_serve_reads_and_find_it_when_it_starts(db, mode):
    db.kill("primary")
    try:
        p = candidates(db, mode=mode)
        try:
            assert p.stats()["primary"] is None
            with pytest.raises(pool.EndpointUnavailable, match="no primary among the candidates"):
                p.fetchone(INSERT, (unique_name(),))
            assert p.fetchone(READ, readonly=True) is not None
            db.start_node("primary")
            wait_until(lambda: timed(lambda: p.fetchone(INSERT, (unique_name(),)))[2] is None,
                       timeout=10, interval=0.1, what="writes once the primary started")
            assert node_of(db, p.last_endpoint) == "primary"
        finally:
            p.close()
    finally:
        heal(db)


def test_with_no_primary_a_silent_node_costs_a_token_read_a_moment_not_its_timeout(db, mode):
    """With no primary up, every read with a token asks every node where it stands (the
    survey: its primary may have been promoted where this pool cannot see it). The survey waited
    for every answer up to connect_timeout, so one stalled node (ejected already: nothing else
    waits on it) cost each token read 2 s here. Once the others have answered, a silent one
    gets a probe's grace more, no longer."""
    w = candidates(db, mode=mode)
    try:
        (rid,) = w.fetchone(INSERT, (unique_name(),))
        token = w.write_token()
    finally:
        w.close()
    db.wait_replayed(nodes=["replica1", "replica2"])
    db.kill("primary")
    p = candidates(db, mode=mode, connect_timeout=2, timeout=3)
    db.stall("replica2")
    try:
        replica2 = f"127.0.0.1:{db.port('replica2')}"
        wait_until(lambda: timed(lambda: p.fetchone(READ, readonly=True)) and next(
            e["state"] for e in p.stats()["endpoints"] if e["name"] == replica2) == "down",
            timeout=20, interval=0.05, what="the stalled replica found down")
        for _ in range(3):
            time.sleep(health.SURVEY_EVERY)  # (a survey at most every SURVEY_EVERY seconds)
            seconds, row, error = timed(lambda: p.fetchone(SELECT_ID, (rid,), readonly=True,
                                                           after=token))
            assert error is None and row == (rid,), (error, row)
            assert node_of(db, p.last_endpoint) == "replica1"
            assert seconds < PROBE_GRACE_MAX + 0.3, seconds
    finally:
        db.resume("replica2")
        p.close()
        heal(db)


def test_with_no_primary_a_read_out_of_time_does_not_say_no_replica_is_up(db, mode):
    """A read whose timeout (0.5 s) a connect to a stalled replica outlasted (connect_timeout
    1 s) said "no replica is up" while the other one was up and serving."""
    db.kill("primary")
    p = candidates(db, mode=mode, connect_timeout=1, timeout=0.5)
    db.stall("replica2")
    try:
        errors = []
        for _ in range(4):  # round robin: one of the first two reads goes to replica2
            errors.append(timed(lambda: p.fetchone(READ, readonly=True))[2])
        failed = [e for e in errors if e is not None]
        assert failed and all(isinstance(e, pool.EndpointUnavailable) for e in failed), errors
        assert "deadline passed" in str(failed[0]) and "no replica is up" not in str(failed[0])
        assert errors[-1] is None  # replica2 is down now: replica1 serves
    finally:
        db.resume("replica2")
        p.close()
        heal(db)


def test_a_replica_left_ahead_of_the_promoted_one_serves_no_read_until_it_rejoins(
        fresh, mode, caplog):
    """Positions carry no timeline: without the check, replica2 (timeline 1, ahead) counted as
    caught up, and every read with the new primary's token went to it and missed the write.
    Reads with a token never count on it, from the first one after the promotion; once the
    monitor has compared it with the new primary (a round trip later, or a few requests in
    process mode) it serves no read at all until it has been rewound onto the new timeline."""
    c = fresh
    p = warmed(c, mode)
    replica2 = f"127.0.0.1:{c.port('replica2')}"
    try:
        with caplog.at_level(logging.INFO, logger="pool"):
            row_id, token = fork_replica2(c, p)
            for _ in range(10):  # from the first read on: the token is the new primary's
                row = p.fetchone(SELECT_ID, (row_id,), readonly=True, after=token)
                assert row == (row_id,) and node_of(c, p.last_endpoint) == "replica1"
            wait_until(lambda: (p.fetchone(READ, readonly=True), states(p)[replica2])[1]
                       == ("replica", "diverged"), timeout=3, what="replica2 found diverged")
            for _ in range(10):
                assert node_of(c, (p.fetchone(READ, readonly=True), p.last_endpoint)[1]) != "replica2"
            assert "diverged" in p.stats()["reads_to"]
            assert any(r.levelno == logging.WARNING and replica2 in r.getMessage()
                       and "not on the primary's history" in r.getMessage() for r in caplog.records)
            c.rejoin("replica2")  # pg_rewind onto the new timeline: it follows the primary again
            # (back when its control file says it is on the new timeline: pg_rewind writes that)
            wait_until(lambda: states(p)[replica2] == ("replica", "up"), timeout=15,
                       interval=0.1, what="replica2 back in reads after its rewind")
        assert any("back in reads" in r.getMessage() for r in caplog.records)
        # (its restart may cost the pool the sessions it held there: reads go on elsewhere
        # until a probe takes it back)
        wait_until(lambda: node_of(c, (p.fetchone(READ, readonly=True), p.last_endpoint)[1])
                   == "replica2", timeout=10, what="a read served by replica2 again")
        row = p.fetchone(SELECT_ID, (row_id,), readonly=True, after=token)
        assert row == (row_id,)
    finally:
        p.close()


def test_a_replica_that_had_only_received_more_of_the_old_primary_stays_out_of_reads(
        fresh, mode):
    """replica2's replay is paused when the primary dies: it has received WAL the promoted
    replica1 never had, but replayed less than the new primary has written. Judged on its replay
    position it passed for on the new history, and once resumed it replayed the old WAL, past
    the new primary's tokens: a red-team run had 478 of 478 such token reads miss their row.
    What it received counts too: it is diverged from the start, and stays so as it replays the
    old WAL and after the primary has written past it."""
    c = fresh
    p = warmed(c, mode)
    replica2 = f"127.0.0.1:{c.port('replica2')}"
    try:
        row_id, token = fork_replica2(c, p, paused=True)
        assert p.fetchone(SELECT_ID, (row_id,), readonly=True, after=token) == (row_id,)
        wait_until(lambda: (p.fetchone(READ, readonly=True), states(p)[replica2])[1]
                   == ("replica", "diverged"), timeout=3, what="replica2 found diverged")
        admin_sql(c, "replica1", "CREATE TABLE filler2 AS SELECT g, repeat('x', 200) AS pad "
                                 "FROM generate_series(1, 150000) g")  # past all replica2 holds
        admin_sql(c, "replica2", "SELECT pg_wal_replay_resume()")
        wait_until(lambda: admin_sql(c, "replica2", "SELECT pg_last_wal_replay_lsn() >= "
                                     "pg_last_wal_receive_lsn()")[0][0], timeout=20,
                   what="replica2 replayed the old WAL it had")
        assert_replica2_stays_out(c, p, row_id, token)
    finally:
        p.close()


def test_with_the_new_primary_down_too_a_new_pool_serves_no_token_read_from_the_old_history(
        fresh, mode):
    """After the fork the new primary dies too, and a worker starts: it never saw a primary, so
    it has nothing to compare replica2 with. replica2 tells its timeline instead (its control
    file), older than the token's: the read fails rather than miss its row. A token of the old
    history is still served there."""
    c = fresh
    p = candidates(c, mode="threaded")
    old_name = unique_name()
    (old_id,) = p.fetchone(INSERT, (old_name,))
    old_token = p.write_token()
    c.wait_replayed()
    try:
        row_id, token = fork_replica2(c, p)
    finally:
        p.close()
    c.kill("replica1")
    q = candidates(c, mode=mode, timeout=1)
    try:
        for _ in range(3):
            _, row, error = timed(lambda: q.fetchone(SELECT_ID, (row_id,), readonly=True,
                                                     after=token))
            assert isinstance(error, pool.PoolError) and row is None, (row, error)
        assert q.fetchone("SELECT name FROM items WHERE id = %s", (old_id,), readonly=True,
                          after=old_token) == (old_name,)
        assert node_of(c, q.last_endpoint) == "replica2"
    finally:
        q.close()


def test_a_pool_started_after_the_fork_never_counts_the_diverged_replica_for_tokens(fresh, mode):
    """A pool that was not watching at the failover (an app restarted after it) first compares
    the nodes once the new primary has written past all replica2 holds: positions alone cannot
    tell replica2 from a replica that lags. A red-team run had 53 of 150 such token reads miss
    their row. A replica counts once it shows it follows the primary (it holds more than the
    primary had when first asked, or exactly as much), or its control file names the primary's
    timeline; replica2, stuck, does neither."""
    c = fresh
    p = candidates(c, mode="threaded")
    try:
        row_id, token = fork_replica2(c, p)
    finally:
        p.close()
    admin_sql(c, "replica1", "CREATE TABLE filler2 AS SELECT g, repeat('x', 200) AS pad "
                             "FROM generate_series(1, 150000) g")  # past all replica2 holds
    q = candidates(c, mode=mode)
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            assert q.fetchone(SELECT_ID, (row_id,), readonly=True, after=token) == (row_id,)
            assert node_of(c, q.last_endpoint) != "replica2"
            time.sleep(0.01)
    finally:
        q.close()



def test_a_diverged_replica_streaming_from_an_old_primary_back_unfenced_stays_out(fresh, mode):
    """After the fork the old primary comes back as it was (a conflict: two primaries), and
    replica2 streams more of its timeline-1 WAL. Once the new primary had written past it, that
    was taken for a rewind: a red-team run had 100 of 100 token reads miss their row. Only its
    control file naming the primary's timeline brings it back."""
    c = fresh
    p = warmed(c, mode)
    replica2 = f"127.0.0.1:{c.port('replica2')}"
    try:
        row_id, token = fork_replica2(c, p)
        wait_until(lambda: (p.fetchone(READ, readonly=True), states(p)[replica2])[1]
                   == ("replica", "diverged"), timeout=3, what="replica2 found diverged")
        c.start_node("primary", split_brain=True)  # unfenced: still a primary, timeline 1
        admin_sql(c, "primary", "CREATE TABLE tl1_only AS SELECT g FROM generate_series(1, 1000) g")
        (end,) = admin_sql(c, "primary", "SELECT pg_current_wal_lsn()")[0]
        wait_until(lambda: admin_sql(c, "replica2", "SELECT pg_last_wal_replay_lsn() >= %s",
                                     (end,))[0][0], timeout=30, interval=0.2,
                   what="replica2 streaming from the old primary")
        admin_sql(c, "replica1", "CREATE TABLE filler2 AS SELECT g, repeat('x', 200) AS pad "
                                 "FROM generate_series(1, 120000) g")  # past all replica2 holds
        assert_replica2_stays_out(c, p, row_id, token)
    finally:
        p.close()


def test_after_a_clean_switchover_token_reads_are_back_on_the_replica_at_once(fresh, mode):
    """`promote` stops the primary first, so no replica diverges. A pool that sees replica1 out
    of recovery before it notices the old primary stopped calls the old one a conflict, and it
    stays one (nothing goes to it any more). While a node is in conflict, positions are no
    evidence that a replica follows the primary; a conflict that no longer answers is no
    conflict: replica2, streaming from replica1, serves token reads again within a second."""
    c = fresh
    p = warmed(c, mode)
    try:
        c.promote("replica1")
        wait_until(lambda: timed(lambda: p.fetchone(INSERT, (unique_name(),)))[2] is None,
                   timeout=20, interval=0.05, what="writes on the new primary")

        def token_read_on_replica2() -> bool:
            (row_id,) = p.fetchone(INSERT, (unique_name(),))
            token = p.write_token()
            assert p.fetchone(SELECT_ID, (row_id,), readonly=True, after=token) == (row_id,)
            return node_of(c, p.last_endpoint) == "replica2"

        wait_until(token_read_on_replica2, timeout=6, interval=0.05,  # (lag.CONFLICT_LIVE: 3 s)
                   what="a token read served by replica2")
    finally:
        p.close()
