"""Every loan is clean: no slot lost to an interrupt, no transaction lost, no session state
carried to the next borrower, misuse made loud. Against real servers, in both modes.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import gc
import linecache
import signal
import sys
import threading
import time
from typing import Any, Callable

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import pytest

import pool
import pool.session
from pgutil import (admin_sql, assert_a_block_is_one_transaction, count_items, unique_name,
                    wait_until)

pytestmark = pytest.mark.db

INSERT = "INSERT INTO items (name) VALUES (%s) RETURNING id"


def settled(p):
    """The pool's counters once everything has been returned."""
    s = p.stats()
    return {k: s[k] for k in ("size", "idle", "in_use", "waiting", "connecting")}


# -- slots and transactions ---------------------------------------------------------------------

class Interrupt(Exception):
    """What a request timeout built on SIGALRM (or Celery's soft time limit, or ^C) raises."""


def interrupted_at(point: int, code: Any, call: Callable[[], Any]) -> bool:
    """Run ``call()`` with the ``point``-th event of ``code``'s frame raising Interrupt (0: its
    entry, then each line in turn), as a request timeout's signal handler may; True if it
    fired. Not counted: the line event CPython's tracer reports as a `with` block ends, before
    its __exit__ runs; a signal handler cannot run there (only once that C call returned)."""
    with_lines = {n for _, _, n in code.co_lines()
                  if n and linecache.getline(code.co_filename, n).lstrip().startswith("with ")}
    seen, entered, fired = [0], set(), []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        if event == "call":
            seen[0] = 0
            entered.clear()
        elif event == "line":
            if frame.f_lineno in with_lines:
                if frame.f_lineno in entered:
                    return tracer  # the block's end
                entered.add(frame.f_lineno)
            seen[0] += 1
        if seen[0] == point and event in ("call", "line") and not fired:
            fired.append(point)
            raise Interrupt()
        return tracer

    sys.settrace(tracer)
    try:
        call()
    except Interrupt:
        pass
    finally:
        sys.settrace(None)
    return bool(fired)


@pytest.fixture
def alarm():
    """A SIGALRM handler that raises Interrupt: fire(seconds) arms it once."""
    def handler(signum, frame):
        raise Interrupt()

    old = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_an_interrupt_anywhere_in_a_loan_never_loses_a_connection(make_pool, mode, db, alarm):
    """A signal handler raises at random points of checkout, wait, statement, commit and return,
    hundreds of times. Afterwards every connection is accounted for and idle, nobody waits, and
    the pool can still lend all of them at once."""
    p = make_pool(max_size=2, replicas=("replica1",), timeout=5)
    stop = threading.Event()
    helpers = []
    if mode == "threaded":  # others hold connections, so the main thread often waits in line
        def hog():
            while not stop.is_set():
                with p.connection() as conn:
                    conn.cursor().execute("SELECT 1")
                time.sleep(0.001)
        helpers = [threading.Thread(target=hog) for _ in range(2)]
        for t in helpers:
            t.start()
    rnd = random.Random(7)
    interrupted = 0
    ops = [
        lambda: p.fetchone("SELECT 1"),
        lambda: p.fetchone("SELECT 1", readonly=True),
        lambda: p.execute(INSERT, (unique_name("irq"),)),
    ]

    def block():
        with p.connection() as conn:
            conn.cursor().execute(INSERT, (unique_name("irq"),))

    def read_block():
        with p.connection(readonly=True) as conn:
            conn.cursor().execute("SELECT 1")

    ops += [block, read_block]
    try:
        for _ in range(400):
            try:
                try:
                    alarm(rnd.uniform(0.00001, 0.003))
                    rnd.choice(ops)()
                finally:
                    alarm(0)  # (the alarm may also go off here, or just before)
            except Interrupt:
                interrupted += 1
            except pool.PoolTimeout:
                pass  # threaded mode: waited past the deadline behind the hogs
    finally:
        stop.set()
        for t in helpers:
            t.join()
    assert interrupted > 50  # the handler really fired inside the pool, many times
    wait_until(lambda: settled(p)["in_use"] == 0, timeout=5, what="every loan returned")
    s = settled(p)
    assert s["size"] == s["idle"] and s["in_use"] == 0 and s["waiting"] == 0 and s["connecting"] == 0, s
    if mode == "threaded":  # every slot can be lent again: none was lost
        loans = [p.connection(timeout=2) for _ in range(2)]
        for loan in loans:
            loan.__enter__()
        for loan in loans:
            loan.__exit__(None, None, None)
    assert p.fetchone("SELECT 1") == (1,)


def test_an_interrupt_anywhere_in_a_read_after_a_token_loses_no_connection(pool_factory, mode,
                                                                         db):
    """A read with a token asks one replica after another (replica1's replay is paused, so it
    is always behind, and is asked first), handing one connection back before taking the next.
    Each line event of that function (the search, and the call that wraps it) in turn raises,
    as a request timeout may: afterwards every connection is accounted for, none was returned
    twice, and the pool serves on."""
    admin_sql(db, "replica1", "SELECT pg_wal_replay_pause()")
    try:
        for target, lines in ((pool.statements.Statements._seek_after.__code__, 15),
                              (pool.statements.Statements._checkout_after.__code__, 3)):
            for point in range(400):
                p = pool_factory(mode=mode, max_size=1, max_lag=None, balance="round_robin")
                for _ in range(2):  # a connection idle on each replica (a read moves to one)
                    p.fetchone("SELECT 1", readonly=True)
                p.fetchone(INSERT, (unique_name("irq"),))
                token = p.write_token()  # known on no replica: the read asks them
                fired = interrupted_at(point, target,
                                       lambda: p.fetchone("SELECT 1", readonly=True, after=token))
                gc.collect()  # an interrupted frame's connection, if it held one, is freed with it
                s = settled(p)
                assert s["size"] == s["idle"] and s["in_use"] == 0 and s["connecting"] == 0, \
                    (target.co_name, point, s)
                for ep in p._endpoints:  # no connection went back twice
                    assert len(ep.idle) == len(set(map(id, ep.idle))) <= ep.max_size, point
                assert p.fetchone("SELECT 1", readonly=True, after=token) == (1,), point
                p.close()
                if not fired:
                    break  # past the last line
            assert point > lines, target.co_name  # every line was tried
    finally:
        admin_sql(db, "replica1", "SELECT pg_wal_replay_resume()")


@pytest.mark.parametrize("statement", [False, True], ids=["empty", "insert"])
def test_process_mode_gets_its_handle_back_after_an_interrupt_where_a_block_ends(pool_factory, db,
                                                                                 statement):
    """CPython runs a pending signal handler at a function's entry, among other points, so a
    request timeout can raise as a block's __exit__ begins, or anywhere in it. Process mode keeps
    its reusable handles: one left taken must not keep its connection for good (found by a
    red-team run). Each point of _Loan.__exit__ is tried in turn (0: its entry)."""
    p = pool_factory(replicas=(), mode="process", max_size=1)
    target = pool.modes._Loan.__exit__.__code__
    for point in range(12):
        name = unique_name()

        def block() -> None:
            with p.connection() as conn:
                if statement:
                    conn.cursor().execute(INSERT, (name,))
        interrupted_at(point, target, block)
        gc.collect()  # the interrupted frame let go of the connection: its slot is freed
        for _ in range(2):  # the connection, and then the handle, lent again
            with p.connection() as conn:
                conn.cursor().execute("SELECT 1")
        assert p.connection() is p._handles[False], point
        assert settled(p) == {"size": 1, "idle": 1, "in_use": 0, "waiting": 0, "connecting": 0}
        assert count_items(db, "primary", name) in (0, 1)  # committed, or rolled back: not open


def test_an_interrupt_anywhere_in_opening_a_connection_loses_no_slot(pool_factory, mode):
    """Each line of Pool._open in turn (0: its entry) raises, as a request timeout may while a
    checkout connects. The slot comes back, and the half-made connection is not left for the
    watchdog to look at for good."""
    target = pool.core.Pool._open.__code__
    for point in range(200):
        p = pool_factory(replicas=(), mode=mode, max_size=1)
        fired = interrupted_at(point, target, lambda: p.fetchone("SELECT 1"))
        gc.collect()  # an interrupted frame's connection, if it held one, is freed with it
        assert not p._endpoints[0].being_set_up(), point  # nor watched for good
        assert p.fetchone("SELECT 1") == (1,), point  # the one slot can be lent again
        assert settled(p) == {"size": 1, "idle": 1, "in_use": 0, "waiting": 0, "connecting": 0}
        p.close()
        if not fired:
            break  # past the last line
    assert point > 20  # every line of _open was tried


def test_process_mode_gets_back_a_handle_dropped_before_its_block(pool_factory):
    """An interrupt between connection() and the `with` leaves the handle taken (ISSUED) with
    nobody to free it; once nobody holds it, the pool takes it back."""
    p = pool_factory(replicas=(), mode="process", max_size=1)
    handle = p.connection()
    assert handle is p._handles[False]
    del handle
    with p.connection():  # the handle is reclaimed on this call, and lent from the next
        pass
    held = p.connection()
    assert held is p._handles[False]
    with held:
        inner = p.connection()  # taken by an open block: a handle of its own, nothing reclaimed
        assert inner is not held
    assert settled(p)["in_use"] == 0
    del held, inner  # (a variable holding the handle keeps it the caller's)
    # Entered by hand, keeping only the connection (a misuse): taking the handle back closes
    # that connection rather than lend it to someone else while it may still be in use.
    conn = p.connection().__enter__()
    backend = conn.get_backend_pid()
    with p.connection() as other:
        assert other.get_backend_pid() != backend
    assert conn.closed


def test_a_waiter_interrupted_in_the_queue_leaves_it_and_takes_nothing_with_it(pool_factory, alarm):
    p = pool_factory(mode="threaded", max_size=1, replicas=(), timeout=10)
    held = p.connection()
    held.__enter__()
    alarm(0.2)
    with pytest.raises(Interrupt):
        with p.connection():  # waits in line behind `held`, and is interrupted there
            pass
    assert p.stats()["waiting"] == 0
    held.__exit__(None, None, None)  # the returned connection must not go to the dead waiter
    with p.connection(timeout=1) as conn:
        conn.cursor().execute("SELECT 1")
    assert settled(p) == {"size": 1, "idle": 1, "in_use": 0, "waiting": 0, "connecting": 0}


def test_begin_under_autocommit_is_committed_not_dropped(make_pool, db):
    """psycopg2 says READY, but the server is inside a transaction: the pool used to discard the
    connection, losing the INSERT, and raise nothing."""
    p = make_pool(max_size=1)
    name = unique_name()
    with p.connection() as conn:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("BEGIN")
        cur.execute(INSERT, (name,))
    assert count_items(db, "primary", name) == 1
    with pytest.raises(RuntimeError):
        with p.connection() as conn:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("BEGIN")
            cur.execute(INSERT, (name + "-x",))
            raise RuntimeError("the block fails")
    assert count_items(db, "primary", name + "-x") == 0  # rolled back
    with p.connection() as conn:  # the connection is back, idle, with psycopg2's defaults
        assert conn.autocommit is False
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE


@pytest.mark.parametrize("tamper", ["autocommit", "readonly=False", "set_session",
                                    "READ WRITE, then commit()", "tpc_begin",
                                    "reset(), then autocommit"])
def test_a_read_only_loan_cannot_write_on_the_primary_fallback(make_pool, db, tamper):
    """On the primary (no replica up), a block that switched autocommit on could write:
    psycopg2's per-transaction READ ONLY no longer applied. Nor could the pool see a write
    committed before the block's end: by the block's own commit() after SQL that made its
    transaction read-write, or through two-phase commit (prepared, then committed from
    tpc_recover(), found by a red-team run)."""
    p = make_pool(replicas=())
    name = unique_name()
    with pytest.raises((psycopg2.errors.ReadOnlySqlTransaction, pool.PoolError)):
        with p.connection(readonly=True) as conn:
            if tamper == "autocommit":
                conn.autocommit = True
            elif tamper == "readonly=False":
                conn.readonly = False
            elif tamper == "set_session":
                conn.set_session(readonly=False, autocommit=True)
            elif tamper == "tpc_begin":
                conn.tpc_begin(conn.xid(1, name, "pool-tests"))
            elif tamper == "reset(), then autocommit":  # DISCARD ALL took the read-only SET
                conn.reset()
                conn.autocommit = True
            if tamper in ("READ WRITE, then commit()", "tpc_begin"):
                conn.cursor().execute("SET TRANSACTION READ WRITE")
            conn.cursor().execute(INSERT, (name,))
            conn.tpc_prepare() if tamper == "tpc_begin" else conn.commit()
    assert count_items(db, "primary", name) == 0
    assert p.fetchone(INSERT, (name,)) is not None  # the same connection writes when lent to write
    assert count_items(db, "primary", name) == 1


@pytest.mark.parametrize("where", ["replica", "primary fallback"])
def test_a_read_only_loan_commits_a_failed_transaction_as_psycopg2_does(make_pool, where):
    """commit() of a transaction an error aborted rolls it back quietly, as psycopg2 does; the
    fallback's check for a write once ran a statement in the aborted transaction and failed."""
    p = make_pool(replicas=("replica1",) if where == "replica" else ())
    with p.connection(readonly=True) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg2.errors.DivisionByZero):
            cur.execute("SELECT 1/0")
        conn.commit()
        cur.execute("SELECT 3")
        assert cur.fetchone() == (3,)


# -- session state ------------------------------------------------------------------------------

@dataclasses.dataclass
class Leak:
    """One kind of session state: how a borrower leaves it behind, how the next one sees it."""

    leave: str | None  # SQL a borrower runs (None: a psycopg2 setting, see `setting`)
    probe: str | Callable[[Any], object]  # SQL (or a look at the connection) that shows the
    clean: object                         # state; must give `clean` on a fresh session
    setting: tuple[str, object] | Callable[[Any], object] | None = None  # attribute, or a call


LEAKS = {
    "search_path": Leak("SET search_path = pg_catalog", "SHOW search_path", '"$user", public'),
    "statement_timeout": Leak("SET statement_timeout = '1s'", "SHOW statement_timeout", "0"),
    "timezone": Leak("SET TimeZone = 'Asia/Tokyo'", "SHOW TimeZone", None),
    "temp_table": Leak("CREATE TEMP TABLE leaked (x int)",
                       "SELECT to_regclass('pg_temp.leaked') IS NOT NULL", False),
    "advisory_lock": Leak("SELECT pg_advisory_lock(4242)",
                          "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                          "AND pid = pg_backend_pid()", 0),
    "prepared": Leak("PREPARE leaked AS SELECT 1", "SELECT count(*) FROM pg_prepared_statements", 0),
    "with_hold": Leak("DECLARE leaked CURSOR WITH HOLD FOR SELECT 1",
                      "SELECT count(*) FROM pg_cursors", 0),
    "listen": Leak("LISTEN leaked", "SELECT count(*) FROM pg_listening_channels()", 0),
    "isolation": Leak(None, "SHOW transaction_isolation", "read committed",
                      ("isolation_level", ext.ISOLATION_LEVEL_SERIALIZABLE)),
    "deferrable": Leak(None, "SHOW transaction_deferrable", "off", ("deferrable", True)),
    "cursor_factory": Leak(None, "SELECT 1", (1,), ("cursor_factory", psycopg2.extras.RealDictCursor)),
    # psycopg2's other spellings of a setting, which once went unnoticed (no reset at all):
    "set_isolation_level": Leak(None, "SHOW transaction_isolation", "read committed",
                                lambda c: c.set_isolation_level(ext.ISOLATION_LEVEL_SERIALIZABLE)),
    # ...its 0 being autocommit: the next block must still be a transaction (BEGIN went first)
    "set_isolation_level_autocommit": Leak(None, "SELECT now() = statement_timestamp()", False,
                                           lambda c: c.set_isolation_level(0)),
    "client_encoding": Leak(None, lambda c: (c.encoding, _sql(c, "SHOW client_encoding")),
                            ("UTF8", "UTF8"), lambda c: c.set_client_encoding("LATIN1")),
    "notifies": Leak("LISTEN leaked; NOTIFY leaked, 'for me only'", lambda c: c.notifies, []),
    # RESET ALL leaves the role and the session user alone (found by a red-team run):
    "role": Leak("SET ROLE app", "SELECT current_user", "postgres"),
    "session_authorization": Leak("SET SESSION AUTHORIZATION app", "SELECT session_user", "postgres"),
    # a typecaster registered on the connection (then used), and psycopg2's suggested deque
    "typecaster": Leak(None, "SELECT 1", 1, lambda c: (
        ext.register_type(ext.new_type((23,), "INT4_AS_TEXT", lambda v, cur: f"text {v}"), c),
        _sql(c, "SELECT 1"))),
    # statements sent under the borrower's own autocommit by a cursor made from psycopg2's class:
    # no trace in psycopg2 or on the server, so a switched autocommit means a full reset
    "autocommit_direct_cursor": Leak(None, "SHOW search_path", '"$user", public', lambda c: (
        setattr(c, "autocommit", True),
        ext.cursor(c).execute("SET search_path = pg_catalog"))),
    "notices_deque": Leak(None, lambda c: len(c.notices), 0, lambda c: (
        setattr(c, "notices", collections.deque(maxlen=5)),
        c.cursor().execute("DO $$BEGIN RAISE NOTICE 'left behind'; END$$"))),
    # what the reset itself says, under the borrower's client_min_messages (a red-team run)
    "notices_of_the_reset": Leak("SET client_min_messages = debug5", lambda c: list(c.notices), []),
    # a cursor made from psycopg2's class, its transaction then ended by the connection: psycopg2
    # and the server both idle again (a red-team run; for `with conn:` too)
    "direct_cursor_commit": Leak(None, "SHOW search_path", '"$user", public', lambda c: (
        ext.cursor(c).execute("SET search_path = pg_catalog"), c.commit())),
    "direct_cursor_rollback": Leak(None, "SELECT count(*) FROM pg_locks WHERE locktype = "
                                   "'advisory' AND pid = pg_backend_pid()", 0, lambda c: (
        ext.cursor(c).execute("SELECT pg_advisory_lock(4242)"), c.rollback())),
    "direct_cursor_with_conn": Leak(None, "SHOW search_path", '"$user", public',
                                    lambda c: _within(c, "SET search_path = pg_catalog")),
}


def _within(conn, sql):
    with conn:  # psycopg2's own: commits at the end
        ext.cursor(conn).execute(sql)


def _sql(conn, sql):
    cur = conn.cursor()
    cur.execute(sql)
    return cur.fetchone()[0]


def superuser_pool(make_pool, db, **kwargs):
    # The app role may not create temp tables (least privilege); the superuser may.
    p = make_pool(max_size=1, replicas=(), **kwargs)
    p2 = pool.Pool(db.dsn("primary", user="postgres"), mode=p.options.mode, max_size=1, **kwargs)
    p.close()
    return p2


@pytest.mark.parametrize("kind", list(LEAKS))
def test_no_session_state_reaches_the_next_borrower(make_pool, db, kind):
    leak = LEAKS[kind]
    p = superuser_pool(make_pool, db)
    try:
        with p.connection() as conn:
            clean = leak.clean
            if clean is None:
                clean = _sql(conn, leak.probe)
            backend = conn.get_backend_pid()
            if callable(leak.setting):
                leak.setting(conn)
            elif leak.setting:
                setattr(conn, *leak.setting)
            else:
                conn.cursor().execute(leak.leave)
        with p.connection() as conn:
            assert conn.get_backend_pid() == backend  # reset, not discarded
            if callable(leak.probe):
                assert leak.probe(conn) == clean
            else:
                cur = conn.cursor()
                cur.execute(leak.probe)
                row = cur.fetchone()
                assert (tuple(row) if kind == "cursor_factory" else row[0]) == clean
            for name in ("isolation_level", "deferrable", "cursor_factory", "readonly"):
                assert getattr(conn, name) is None, name
            assert conn.autocommit is False
        if kind == "cursor_factory":
            assert p.fetchone("SELECT 1") == (1,)  # a tuple, not a dict row
    finally:
        p.close()


def test_a_block_that_raised_after_a_direct_cursor_ran_is_reset(make_pool, db):
    """A cursor made from psycopg2's class directly takes a session advisory lock, then the
    block raises: the rollback ends its transaction, not the lock, and the next borrower of
    the session held it (the pool's rollback had marked such loans, by accident, until a
    red-team run had it stop marking the helpers' own)."""
    p = superuser_pool(make_pool, db)
    try:
        with pytest.raises(KeyError):
            with p.connection() as conn:
                backend = conn.get_backend_pid()
                ext.cursor(conn).execute("SELECT pg_advisory_lock(4242)")
                raise KeyError
        with p.connection() as conn:
            assert conn.get_backend_pid() == backend
            assert _sql(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                              "AND pid = pg_backend_pid()") == 0
    finally:
        p.close()


def test_reset_session_off_keeps_server_state_but_still_restores_psycopg2_settings(make_pool, db):
    p = make_pool(max_size=1, replicas=(), reset_session=False)
    with p.connection() as conn:
        conn.isolation_level = ext.ISOLATION_LEVEL_SERIALIZABLE
        conn.cursor().execute("SET search_path = pg_catalog")
    with p.connection() as conn:
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        assert cur.fetchone()[0] == "pg_catalog"  # the user manages server-side state
        assert conn.isolation_level is None



def test_reset_session_off_still_puts_back_what_psycopg2s_reset_took_from_configure(make_pool,
                                                                                    db):
    """conn.reset() in a block is a DISCARD ALL: it takes configure()'s settings and prepared
    statements, which are part of every loan. With reset_session=False the pool restores
    nothing on the server, so it replaces such a connection with a freshly configured one."""
    def configure(conn):
        conn.cursor().execute("SET application_name = 'cfg'; PREPARE getone AS SELECT 1")

    p = make_pool(max_size=1, replicas=(), reset_session=False, configure=configure)
    with p.connection() as conn:
        conn.reset()
    with p.connection() as conn:
        cur = conn.cursor()
        cur.execute("SELECT current_setting('application_name')")
        assert cur.fetchone() == ("cfg",)
        cur.execute("EXECUTE getone")
        assert cur.fetchone() == (1,)

def test_a_reset_hook_that_leaves_autocommit_on_does_not_make_the_next_block_autocommit(make_pool, db):
    """The hook runs last, on a clean session, and may use autocommit to leave it idle; the next
    block is still one transaction (an INSERT before an exception is rolled back)."""
    def reset(conn):
        conn.autocommit = True
        conn.cursor().execute("SELECT set_config('app.user', '', false)")

    p = make_pool(max_size=1, replicas=(), reset=reset)
    for _ in range(2):
        with p.connection() as conn:  # ran a statement: the slow return, so the hook runs
            conn.cursor().execute("SELECT 1")
        assert_a_block_is_one_transaction(db, p)
        assert p.fetchone("SELECT now() = statement_timestamp()") == (True,)  # a helper: alone


def test_configure_settings_survive_the_reset_and_the_reset_hook_runs_last(make_pool, db):
    """Order on return: end the transaction, restore psycopg2's settings, reset the server
    session back to what configure() left, then the user's reset hook."""
    seen = []

    def configure(conn):
        conn.cursor().execute("SET statement_timeout = '7s'; SET ROLE app")

    def reset(conn):
        cur = conn.cursor()
        cur.execute("SHOW search_path")
        seen.append(cur.fetchone()[0])  # already reset when the hook runs
        cur.execute("SET application_name = 'after-reset'")
        conn.commit()

    p = superuser_pool(make_pool, db, configure=configure, reset=reset)
    try:
        with p.connection() as conn:
            cur = conn.cursor()
            cur.execute("SET statement_timeout = '1s'")
            cur.execute("SET search_path = pg_catalog")
            cur.execute("RESET ROLE")
        with p.connection() as conn:
            cur = conn.cursor()
            cur.execute("SELECT current_setting('statement_timeout'), "
                        "current_setting('application_name'), current_user")
            assert cur.fetchone() == ("7s", "after-reset", "app")  # configure()'s role, too
        assert seen[0] == '"$user", public'
    finally:
        p.close()


def test_the_reset_costs_no_round_trip_on_helpers_or_empty_blocks(make_pool, db, monkeypatch):
    calls = []
    real = pool.session.reset_server
    monkeypatch.setattr("pool.returns.reset_server", lambda raw, b: (calls.append(1), real(raw, b)))
    p = make_pool()
    fallback = make_pool(replicas=())  # reads on the primary, in BEGIN READ ONLY
    for _ in range(5):
        p.fetchone("SELECT 1")
        p.fetchall("SELECT 1", readonly=True)
        p.execute("SELECT 1")
        with p.connection():
            pass
        fallback.fetchone("SELECT 1", readonly=True)
        with pytest.raises(psycopg2.errors.DivisionByZero):  # (its ROLLBACK is the pool's own)
            fallback.fetchone("SELECT 1/0", readonly=True)
        with p.connection() as conn:  # ending no transaction: nothing ran
            conn.commit()
            conn.rollback()
            with conn:
                pass
    assert calls == []  # one statement the pool controls, or nothing at all: nothing to reset
    with p.connection() as conn:
        conn.cursor().execute("SELECT 1")
    assert calls == [1]  # a block that ran statements: one round trip, once


# -- misuse that must be loud -------------------------------------------------------------------

def test_process_mode_used_from_two_threads_is_refused(pool_factory):
    """It used to lend one connection twice, or fail with a misleading PoolTimeout."""
    p = pool_factory(mode="process", replicas=())
    inside, release = threading.Event(), threading.Event()

    def holder():
        with p.connection():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(5)
    try:
        with pytest.raises(pool.PoolError, match='mode="threaded"'):
            p.fetchone("SELECT 1")
    finally:
        release.set()
        t.join()
    assert p.fetchone("SELECT 1") == (1,)  # one thread at a time is fine (a hand-over)


def test_one_at_fork_hook_for_the_module_not_one_per_pool(db, monkeypatch):
    registered = []
    monkeypatch.setattr(os, "register_at_fork", lambda **kw: registered.append(kw))
    for _ in range(200):
        pool.Pool(db.dsn("primary"), mode="process").close()
    assert registered == []


# -- stats a user can read ----------------------------------------------------------------------

def test_stats_say_when_the_last_error_happened_and_what_max_size_means(make_pool, db):
    p = make_pool(max_size=3)
    before = time.time()
    db.kill("replica1")
    wait_until(lambda: p.fetchone("SELECT 1", readonly=True) and
               p.stats()["endpoints"][1]["state"] == "down", timeout=10, what="replica1 ejected")
    db.start_node("replica1")
    wait_until(lambda: p.fetchone("SELECT 1", readonly=True) and
               p.stats()["endpoints"][1]["state"] == "up", timeout=10, what="replica1 back")
    s = p.stats()
    ep = s["endpoints"][1]
    assert ep["last_error"] and before <= ep["last_error_at"] <= time.time()
    assert "max_size" not in s  # it was per endpoint, next to a larger pool-wide size
    assert s["max_size_per_endpoint"] == 3 and s["capacity"] == 9
