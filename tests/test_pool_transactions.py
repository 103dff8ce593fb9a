"""Transactions, the read/write split and balancing, against a real primary and two replicas.

Every test runs in both modes (the `mode` fixture), over the same shared code paths.
"""

from __future__ import annotations

import collections
import contextlib

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest

import pool
from pgutil import (admin_sql, assert_a_block_is_one_transaction, count_items, node_of,
                    terminate_app_sessions, unique_name)

pytestmark = pytest.mark.db

INSERT = "INSERT INTO items (name) VALUES (%s) RETURNING id"


def test_leaving_the_block_commits(make_pool, db):
    p = make_pool()
    name = unique_name()
    with p.connection() as conn:
        conn.cursor().execute(INSERT, (name,))
    assert count_items(db, "primary", name) == 1


def test_an_exception_rolls_back_partial_work_and_propagates(make_pool, db):
    p = make_pool()
    name = unique_name()
    with pytest.raises(RuntimeError, match="boom"):
        with p.connection() as conn:
            cur = conn.cursor()
            cur.execute(INSERT, (name,))
            cur.execute(INSERT, (name,))
            raise RuntimeError("boom")
    assert count_items(db, "primary", name) == 0
    # The connection went back clean and serves the next caller.
    with p.connection() as conn:
        assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        conn.cursor().execute(INSERT, (name,))
    assert count_items(db, "primary", name) == 1


def test_a_swallowed_database_error_is_not_committed(make_pool, db):
    """Catching an error inside the block leaves an aborted transaction: the pool says so."""
    p = make_pool()
    name = unique_name()
    primary = p.stats()["endpoints"][0]["name"]
    with pytest.raises(pool.PoolError, match=f"^{primary}: .*rolled back"):  # (it said no where)
        with p.connection() as conn:
            cur = conn.cursor()
            cur.execute(INSERT, (name,))
            try:
                cur.execute("SELECT 1/0")
            except psycopg2.errors.DivisionByZero:
                pass
    assert count_items(db, "primary", name) == 0
    assert p.fetchone("SELECT 1") == (1,)


def test_a_block_that_closes_its_connection_mid_transaction_is_told_its_work_was_lost(make_pool,
                                                                                      db,
                                                                                      monkeypatch):
    """psycopg2's close() drops an open transaction. Leaving such a block normally cannot commit
    it, so it says so instead of reporting success (found by a red-team run: it said nothing).
    Closing with nothing open, or in a read-only block, loses nothing."""
    p = make_pool()
    name = unique_name()
    primary = p.stats()["endpoints"][0]["name"]
    with pytest.raises(pool.PoolError, match=f"^{primary}: .*closed the connection.*not committed"):
        with p.connection() as conn:
            conn.cursor().execute(INSERT, (name,))
            conn.close()
    assert count_items(db, "primary", name) == 0
    with pytest.raises(pool.PoolError, match="closed the connection.*not committed"):
        with p.connection() as conn:  # ...after an error it swallowed (a red-team run)
            cur = conn.cursor()
            cur.execute(INSERT, (name,))
            with contextlib.suppress(psycopg2.errors.DivisionByZero):
                cur.execute("SELECT 1/0")
            conn.close()
    assert count_items(db, "primary", name) == 0
    with p.connection() as conn:
        conn.cursor().execute(INSERT, (name,))
        conn.commit()
        conn.close()
    asked = []
    real = pool.connection.PoolConnection.wrote
    monkeypatch.setattr(pool.connection.PoolConnection, "wrote",
                        lambda self: (asked.append(self.label), real(self))[1])
    with p.connection(readonly=True) as conn:  # on a replica: not even asked (a red-team run)
        conn.cursor().execute("SELECT 1")
        conn.close()
    assert asked == []
    with p.connection() as conn:  # a write loan that only read: nothing lost (a red-team run)
        conn.cursor().execute("SELECT 1")
        conn.close()
    assert count_items(db, "primary", name) == 1
    assert p.fetchone("SELECT 1") == (1,)


def test_a_failed_commit_reaches_the_caller(make_pool, db):
    p = make_pool()
    with pytest.raises(psycopg2.errors.CheckViolation):
        with p.connection() as conn:
            cur = conn.cursor()
            cur.execute("SET CONSTRAINTS ALL DEFERRED")  # the check is immediate anyway
            cur.execute("INSERT INTO items (name) VALUES ('')")
    assert p.fetchone("SELECT 1") == (1,)


# Two-phase commit: psycopg2 refuses commit() and rollback() inside one, so the pool cannot end
# it as it ends a plain transaction. A block may leave it two ways.
def _xid(conn, name):
    return conn.xid(1, name, "pool-tests")


@pytest.mark.parametrize("reset_session", [True, False])
@pytest.mark.parametrize("how", ["left open", "prepare failed", "block raised"])
def test_a_two_phase_transaction_left_open_is_rolled_back_and_the_connection_kept(make_pool, db,
                                                                                  how,
                                                                                  reset_session):
    """tpc_begin() with no tpc_commit() or tpc_rollback(): nothing is committed, the caller
    hears it from the pool (or keeps its own exception) and the connection serves on, its
    configure() settings intact."""
    p = make_pool(max_size=1, reset_session=reset_session,
                  configure=lambda c: c.cursor().execute("SET application_name = 'tpc'"))
    name = unique_name()
    expected = RuntimeError if how == "block raised" else pool.PoolError
    primary = p.stats()["endpoints"][0]["name"]
    with pytest.raises(expected, match="boom" if how == "block raised" else f"^{primary}: .*two-phase"):
        with p.connection() as conn:
            pid = conn.get_backend_pid()
            conn.tpc_begin(_xid(conn, name))
            conn.cursor().execute(INSERT, (name,))
            if how == "prepare failed":  # prepared transactions are off on this cluster
                with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState):
                    conn.tpc_prepare()
            elif how == "block raised":
                raise RuntimeError("boom")
    assert count_items(db, "primary", name) == 0
    with p.connection() as conn:
        assert conn.get_backend_pid() == pid  # kept, not discarded
        cur = conn.cursor()
        cur.execute("SELECT current_setting('application_name')")
        assert cur.fetchone() == ("tpc",)
        cur.execute(INSERT, (name,))
    assert count_items(db, "primary", name) == 1
    assert p.stats()["endpoints"][0]["discards"] == 0


@pytest.fixture
def prepared_transactions(db):
    """Prepared transactions on (max_prepared_transactions > 0; a standby needs at least the
    primary's value, so the replicas go first), and off again afterwards (the primary first)."""
    def setting(value, order):
        for node in order:
            admin_sql(db, node, f"ALTER SYSTEM SET max_prepared_transactions = {value}")
            db.restart(node)
            db.wait_streaming(timeout=30)
            db.wait_replayed(timeout=30)  # a standby's own minimum is the last value it replayed

    setting(4, ("replica1", "replica2", "primary"))
    yield
    for (gid,) in admin_sql(db, "primary", "SELECT gid FROM pg_prepared_xacts"):
        admin_sql(db, "primary", f"ROLLBACK PREPARED '{gid}'")
    setting(0, ("primary", "replica1", "replica2"))


def test_a_prepared_transaction_stays_for_its_manager_and_the_connection_serves_on(
        make_pool, db, prepared_transactions):
    """tpc_prepare() and no tpc_commit(): by the protocol the prepared transaction outlives the
    session, for its transaction manager to commit later (tpc_recover()); the block's exit is
    not an error, and the connection goes back to the pool with configure()'s settings. With
    reset_session=False it is replaced instead: psycopg2's reset(), the one way to make it
    forget a prepared transaction, is a DISCARD ALL, which took configure()'s settings (and
    everything else a borrower kept there)."""
    for reset_session in (True, False):
        p = make_pool(max_size=1, reset_session=reset_session,
                      configure=lambda c: c.cursor().execute("SET application_name = 'tpc'"))
        name = unique_name()
        with p.connection() as conn:
            pid = conn.get_backend_pid()
            conn.tpc_begin(_xid(conn, name))
            conn.cursor().execute(INSERT, (name,))
            conn.tpc_prepare()
        assert count_items(db, "primary", name) == 0  # prepared, not yet committed
        reader = make_pool(replicas=())  # (reads on the primary: a replica cannot commit it)
        with pytest.raises(pool.PoolError, match="readonly=True"):
            with reader.connection(readonly=True) as conn:  # a read cannot commit it either
                [xid] = [x for x in conn.tpc_recover() if x.gtrid == name]
                conn.tpc_commit(xid)
        assert count_items(db, "primary", name) == 0
        with p.connection() as conn:
            assert (conn.get_backend_pid() == pid) is reset_session
            [xid] = [x for x in conn.tpc_recover() if x.gtrid == name]
            conn.tpc_commit(xid)  # the manager's second phase, from any session
            cur = conn.cursor()
            cur.execute("SELECT current_setting('application_name')")
            assert cur.fetchone() == ("tpc",), reset_session
        assert count_items(db, "primary", name) == 1
        assert p.stats()["endpoints"][0]["discards"] == (0 if reset_session else 1)


def test_a_broken_connection_is_discarded_never_handed_out_again(make_pool, db):
    p = make_pool(max_size=1)
    with p.connection() as conn:
        first = conn.get_backend_pid()
    with pytest.raises(psycopg2.OperationalError):
        with p.connection() as conn:
            assert conn.get_backend_pid() == first
            terminate_app_sessions(db, "primary")
            conn.cursor().execute("SELECT 1")
    assert p.stats()["endpoints"][0]["discards"] >= 1
    with p.connection() as conn:  # a new session; the primary was not ejected for this
        assert conn.get_backend_pid() != first
        conn.cursor().execute("SELECT 1")
    assert p.stats()["endpoints"][0]["state"] == "up"


def test_connection_state_changed_in_the_block_is_restored(make_pool):
    p = make_pool(max_size=1)
    with p.connection() as conn:
        conn.autocommit = True
    with p.connection() as conn:
        assert conn.autocommit is False


def test_writes_go_to_the_primary_reads_to_replicas(make_pool, db):
    p = make_pool()
    assert p.fetchone("SELECT pg_is_in_recovery()") == (False,)
    assert node_of(db, p.last_endpoint) == "primary"
    seen = collections.Counter()
    for _ in range(20):
        assert p.fetchone("SELECT pg_is_in_recovery()", readonly=True) == (True,)
        seen[node_of(db, p.last_endpoint)] += 1
    assert seen == {"replica1": 10, "replica2": 10}  # round-robin: even


@pytest.mark.parametrize("balance", ["random", "least_busy"])
def test_other_balance_policies_use_every_replica(make_pool, db, balance):
    p = make_pool(balance=balance)
    seen = collections.Counter()
    for _ in range(40):
        with p.connection(readonly=True) as conn:
            seen[node_of(db, p.last_endpoint)] += 1
            conn.cursor().execute("SELECT 1")
    assert set(seen) == {"replica1", "replica2"}


def test_fetch_helpers_and_execute(make_pool, db):
    p = make_pool()
    name = unique_name()
    (item_id,) = p.fetchone(INSERT, (name,))
    assert p.execute("INSERT INTO items (name) VALUES (%s), (%s)", (name, name)) == 2
    assert len(p.fetchall("SELECT id FROM items WHERE name = %s", (name,))) == 3
    db.wait_replayed()
    assert p.fetchone("SELECT name FROM items WHERE id = %s", (item_id,), readonly=True) == (name,)
    assert p.fetchone("SELECT 1 WHERE false", readonly=True) is None


def test_helpers_switch_autocommit_once_per_run_not_twice_per_call(make_pool, monkeypatch):
    """fetchone & co run in autocommit and leave the connection so: psycopg2's switch sends
    nothing, but lets go of the GIL twice, which under load can cost two context switches.
    A run of helper calls switches once; the block that borrows the connection next, once."""
    switches = []
    real = pool.session.set_autocommit
    for module in ("pool.statements", "pool.returns"):
        monkeypatch.setattr(f"{module}.set_autocommit",
                            lambda raw, on: (switches.append(on), real(raw, on))[1])
    p = make_pool(max_size=1)
    with p.connection() as conn:
        conn.cursor().execute("SELECT 1")
    switches.clear()
    for _ in range(10):
        assert p.fetchone("SELECT 1") == (1,)
        assert p.fetchall("SELECT 1") == [(1,)]
        p.execute("SELECT 1")
    assert switches == [True]
    with p.connection() as conn:
        conn.cursor().execute("SELECT 1")
    assert switches == [True, False]


def test_a_block_after_a_helper_is_one_transaction_and_a_helper_after_a_block_runs_alone(
        make_pool, db):
    """One connection taking turns: a helper leaves it in autocommit, and the next block still
    gets a transaction (rolled back on an error); a helper after a block sends no BEGIN; a read
    that falls back to the primary still runs in BEGIN READ ONLY."""
    p = make_pool(max_size=1, replicas=())
    name = unique_name()
    for _ in range(2):  # the second turn starts from the state the first one left
        assert p.fetchone("SELECT 1") == (1,)
        assert_a_block_is_one_transaction(db, p)
        with p.connection() as conn:  # an empty block lends it as it is: autocommit off
            assert conn.autocommit is False
        # No BEGIN went before it: its transaction started with the statement.
        assert p.fetchone("SELECT now() = statement_timestamp()") == (True,)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            p.fetchone(INSERT, (name,), readonly=True)  # the fallback, from autocommit
        assert p.fetchone("SELECT now() = statement_timestamp()") == (True,)
        assert p.fetchone("SELECT 1", readonly=True) == (1,)
    assert count_items(db, "primary", name) == 0
    assert p.stats()["endpoints"][0]["discards"] == 0


def test_a_cursor_made_from_psycopg2s_own_class_is_still_committed_and_reset(make_pool, db):
    """RealDictCursor(conn) does not go through conn.cursor(), so the loan looks untouched. The
    server's transaction status still sends it the slow way: committed on a normal exit,
    rolled back on an error, and the session reset (nothing it SET reaches the next loan)."""
    p = make_pool(max_size=1, replicas=())
    name = unique_name()
    with p.connection() as conn:
        cur = psycopg2.extras.RealDictCursor(conn)
        cur.execute(INSERT, (name,))
        cur.execute("SET search_path = pg_catalog")
    assert count_items(db, "primary", name) == 1
    with pytest.raises(RuntimeError, match="undo"):
        with p.connection() as conn:
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
            psycopg2.extras.RealDictCursor(conn).execute(INSERT, (name,))
            raise RuntimeError("undo")
    assert count_items(db, "primary", name) == 1
    with p.connection() as conn:
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        assert cur.fetchone()[0] == '"$user", public'


def test_a_commit_sent_through_psycopg2s_own_cursor_class_leaves_nothing_behind(make_pool, db):
    """psycopg2's word counts as well as the server's: after its own COMMIT the server is idle
    while psycopg2 still thinks a transaction is open. The next block must still get a
    transaction (its INSERT rolled back with it), none of the block's SET, and a helper must work."""
    p = make_pool(max_size=1, replicas=())
    with p.connection() as conn:
        psycopg2.extensions.cursor(conn).execute("SET search_path = pg_catalog; COMMIT")
    with p.connection() as conn:
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        assert cur.fetchone()[0] == '"$user", public'
    assert_a_block_is_one_transaction(db, p)
    assert p.fetchone("SELECT 1") == (1,)
    assert p.execute(INSERT, (unique_name(),)) == 1


def test_a_helper_whose_sql_opens_a_transaction_leaves_none_open(make_pool, db):
    """execute("BEGIN; ...") commits, as execute() promises, instead of handing the next
    borrower an open transaction; a read that froze a snapshot on a replica does not keep it."""
    p = make_pool(max_size=1, replicas=("replica1",))
    name = unique_name()
    p.execute("BEGIN; INSERT INTO items (name) VALUES (%s)", (name,))
    assert count_items(db, "primary", name) == 1
    with pytest.raises(RuntimeError, match="its own"):
        with p.connection() as conn:
            conn.cursor().execute("SELECT 1")
            raise RuntimeError("a block of its own, rolled back alone")
    assert count_items(db, "primary", name) == 1
    assert p.fetchone("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1", readonly=True) == (1,)
    later = unique_name()
    p.execute(INSERT, (later,))
    token = p.write_token()
    assert p.fetchone("SELECT count(*) FROM items WHERE name = %s", (later,), readonly=True,
                      after=token) == (1,)
    assert p.stats()["endpoints"][1]["discards"] == 0


def test_a_statement_error_is_raised_not_retried(make_pool):
    p = make_pool()
    with pytest.raises(psycopg2.errors.UndefinedTable):
        p.fetchone("SELECT * FROM no_such_table", readonly=True)
    assert p.fetchone("SELECT 1", readonly=True) == (1,)


@pytest.mark.parametrize("replicas", [("replica1", "replica2"), ()], ids=["replica", "fallback"])
def test_a_write_in_a_read_session_fails_the_same_way_everywhere(make_pool, db, replicas):
    """Read sessions are read-only on a replica and on the primary (fallback) alike."""
    p = make_pool(replicas=replicas)
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        with p.connection(readonly=True) as conn:
            conn.cursor().execute(INSERT, (unique_name(),))
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        p.fetchone(INSERT, (unique_name(),), readonly=True)
    # ...and the same connection writes normally when lent for a write.
    assert p.fetchone(INSERT, (unique_name(),)) is not None


def test_reads_fall_back_to_the_primary_when_no_replica_is_up(make_pool, db):
    p = make_pool()
    db.stop("replica1")
    db.stop("replica2")
    for _ in range(4):
        assert p.fetchone("SELECT 1", readonly=True) == (1,)
        assert node_of(db, p.last_endpoint) == "primary"
    strict = make_pool(read_fallback=False)
    with pytest.raises(pool.EndpointUnavailable, match="read_fallback is off"):
        strict.fetchone("SELECT 1", readonly=True)


def test_checkout_in_the_steady_state_costs_no_round_trip(make_pool, db):
    """A connection used moments ago is lent without a query; one idle long gets a ping."""
    p = make_pool(max_size=1, ping_after=0.5)
    with p.connection() as conn:
        backend = conn.get_backend_pid()

    def last_activity():
        return admin_sql(db, "primary", "SELECT state_change FROM pg_stat_activity WHERE pid = %s",
                         (backend,))[0][0]

    before = last_activity()
    for _ in range(500):
        with p.connection():
            pass
    assert last_activity() == before  # 500 checkouts, not one statement on the server
    import time
    time.sleep(0.7)
    with p.connection() as conn:
        assert conn.get_backend_pid() == backend
    assert last_activity() > before  # idle past ping_after: pinged before being lent
